"""The accuracy gate: decides by threshold, says so loudly, stores and re-uses its measurement."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from common.blocks.calibration import (
    CalibrationPrompt,
    GateSettings,
    calibrate,
    gate,
    load_results,
    serving_mode,
)
from tests.unit.blocks.conftest import build, llama_with_rope


def sample_prompts(n: int = 3) -> list[CalibrationPrompt]:
    g = torch.Generator().manual_seed(7)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 250, (k,), generator=g).tolist())

    return [CalibrationPrompt(blocks=(ids(6), ids(10), ids(10)), tail=ids(4)) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return build("llama", layers=3)


def test_threshold_above_one_disables_loudly_and_zero_enables(model, caplog):
    prompts = sample_prompts()
    with caplog.at_level(logging.INFO, logger="common.blocks.calibration"):
        off = gate(model, "tiny", prompts, GateSettings(mode="reuse", min_top1_agreement=1.01))
    assert not off.enabled and "agreement" in off.reason
    assert serving_mode(off, "reuse") == "full"
    assert any(r.levelno == logging.ERROR and "DISABLED" in r.getMessage() for r in caplog.records)
    on = calibrate(model, "tiny", prompts, GateSettings(mode="reuse", min_top1_agreement=0.0))
    assert on.enabled and serving_mode(on, "reuse") == "reuse"
    assert on.prompts == 3 and 0.0 <= on.top1_agreement <= 1.0 and on.mean_kl_nats > 0.0


def test_cacheblend_at_full_ratio_agrees_everywhere(model):
    settings = GateSettings(mode="cacheblend", recompute_ratio=1.0, min_top1_agreement=1.0)
    result = calibrate(model, "tiny", sample_prompts(2), settings)
    assert result.enabled and result.top1_agreement == 1.0 and result.max_kl_nats < 1e-6
    assert result.positions == 2 * (1 + settings.continuation_tokens) and result.first_token_agreement == 1.0


def test_continuation_is_teacher_forced_greedy_of_full_prefill(model):
    """The forced pass through the same cache must give the greedy steps' logits (else the
    continuation's agreement would measure the harness, not the reuse)."""
    from transformers import DynamicCache

    from common.blocks.calibration import _continuation_logits

    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))

    def prefill():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1].float()

    cache, first = prefill()
    greedy, continuation = _continuation_logits(model, cache, first, 20, 5)
    cache, first = prefill()
    forced, _ = _continuation_logits(model, cache, first, 20, 5, forced=continuation)
    assert greedy.shape == forced.shape == (6, model.config.vocab_size) and continuation.shape == (5,)
    assert torch.allclose(greedy, forced, atol=1e-4)
    assert torch.equal(greedy[:-1].argmax(-1), continuation)


def test_stored_result_is_keyed_by_model_and_knobs(model, tmp_path):
    store = tmp_path / "gate.json"
    settings = GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=0.0)
    first = gate(model, "tiny-a", sample_prompts(2), settings, store_path=store)
    assert set(json.loads(store.read_text())["results"]) == {"tiny-a"}
    # No prompts: a re-measurement would raise, so these must come from the store.
    again = gate(model, "tiny-a", [], settings, store_path=store)
    assert again == first
    stricter = gate(
        model,
        "tiny-a",
        [],
        GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=1.01),
        store_path=store,
    )
    assert not stricter.enabled  # threshold re-applied to the stored agreement
    with pytest.raises(ValueError, match="at least one prompt"):
        gate(model, "tiny-a", [], GateSettings(mode="epic", epic_tokens=8), store_path=store)  # other knobs
    gate(model, "tiny-b", sample_prompts(1), settings, store_path=store)
    assert set(load_results(store)) == {"tiny-a", "tiny-b"}


def test_unverified_rope_disables_the_model():
    model = llama_with_rope({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    result = calibrate(model, "tiny-dyn", sample_prompts(1), GateSettings(min_top1_agreement=0.0))
    assert not result.enabled and "unsupported rope" in result.reason
    assert serving_mode(result, "cacheblend") == "full"
