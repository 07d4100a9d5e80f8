"""The accuracy gate: decides by threshold, says so loudly, encodes its measurement and decides
again on a stored one (the file itself is services/decoder/reuse_setup.py's, tests/unit/blocks/test_reuse_gate.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

from common.blocks.calibration import (
    RESULTS_FORMAT_VERSION,
    CalibrationPrompt,
    GateSettings,
    calibrate,
    decode_results,
    encode_results,
    log_decision,
    serving_mode,
    stored_decision,
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
    strict = GateSettings(mode="reuse", min_top1_agreement=1.01)
    off = calibrate(model, "tiny", prompts, strict)
    with caplog.at_level(logging.INFO, logger="common.blocks.calibration"):
        log_decision(off, strict, "measured here")
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

    from common.blocks.calibration import continuation_logits

    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))

    def prefill():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1].float()

    cache, first = prefill()
    greedy, continuation = continuation_logits(model, cache, first, 20, 5)
    cache, first = prefill()
    forced, _ = continuation_logits(model, cache, first, 20, 5, forced=continuation)
    assert greedy.shape == forced.shape == (6, model.config.vocab_size) and continuation.shape == (5,)
    assert torch.allclose(greedy, forced, atol=1e-4)
    assert torch.equal(greedy[:-1].argmax(-1), continuation)


def test_results_encode_round_trip_and_an_older_format_is_re_measured(model):
    settings = GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=0.0)
    results = {name: calibrate(model, name, sample_prompts(1), settings) for name in ("tiny-b", "tiny-a")}
    text = encode_results(results)
    assert list(json.loads(text)["results"]) == ["tiny-a", "tiny-b"]  # sorted: stable diffs
    assert decode_results(text) == results
    assert decode_results(json.dumps({"format": RESULTS_FORMAT_VERSION - 1, "results": {}})) == {}


def test_a_stored_result_is_used_only_with_the_same_knobs_and_its_threshold_re_applied(model):
    settings = GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=0.0)
    stored = calibrate(model, "tiny-a", sample_prompts(2), settings)
    assert stored_decision(stored, settings) == stored
    stricter = stored_decision(stored, GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=1.01))
    assert stricter is not None and not stricter.enabled  # no re-run needed to change the threshold
    assert stored_decision(stored, GateSettings(mode="epic", epic_tokens=8)) is None  # other knobs
    assert stored_decision(replace(stored, prompts=0), settings) is None  # measured nothing
    assert stored_decision(None, settings) is None


def test_unverified_rope_disables_the_model():
    model = llama_with_rope({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    result = calibrate(model, "tiny-dyn", sample_prompts(1), GateSettings(min_top1_agreement=0.0))
    assert not result.enabled and "unsupported rope" in result.reason
    assert serving_mode(result, "cacheblend") == "full"
