"""Transcript: step results -> text deltas held at character boundaries, summary, Kafka record."""

from __future__ import annotations

import pytest

from adaccel.v1 import common_pb2
from common.modeling.tiny import byte_tokenizer
from services.decoder.batcher import PrefillStats
from services.decoder.engine import StepResult
from services.decoder.transcript import Transcript


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def steps_of(tokenizer, text: str, sizes: list[int]) -> list[StepResult]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, at = [], 0
    for size in sizes:
        out.append(StepResult(token_ids=ids[at:at + size], drafted=size + 1, accepted=size - 1))
        at += size
    assert at == len(ids)
    return out


def test_deltas_join_to_the_text_and_never_split_a_character(tokenizer):
    text = "Crème brûlée, 4€"
    ids = tokenizer.encode(text, add_special_tokens=False)
    transcript = Transcript(tokenizer, eos_token_id=tokenizer.eos_token_id, prompt_tokens=7)
    deltas = [transcript.add(step, seconds_since_arrival=0.1 * i, prefill=PrefillStats(3, 1))
              for i, step in enumerate(steps_of(tokenizer, text, [1] * len(ids)))]
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    # "è" is two bytes: the step carrying its first byte releases no text.
    assert [d.text for d in deltas[:4]] == ["C", "r", "", "è"]
    assert [t for d in deltas for t in d.token_ids] == ids


def test_summary_counts_steps_ttft_and_the_reused_prompt(tokenizer):
    transcript = Transcript(tokenizer, eos_token_id=tokenizer.eos_token_id, prompt_tokens=10)
    for i, step in enumerate(steps_of(tokenizer, "abcdef", [3, 2, 1])):
        transcript.add(step, seconds_since_arrival=0.5 + i, prefill=PrefillStats(cached_tokens=6, recomputed_tokens=2))
    summary = transcript.summary(request_id="r1", total_s=4.0, decoder_id="d", model_id="m")
    stats = summary.stats
    assert summary.text == "abcdef" and summary.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert stats.ttft_s == pytest.approx(0.5) and stats.total_s == 4.0
    assert list(stats.accepted_per_step) == [3, 2, 1] and stats.steps == 3 and stats.new_tokens == 6
    assert list(stats.drafted_per_step) == [4, 3, 2] and list(stats.accepted_drafts_per_step) == [2, 1, 0]
    assert (stats.prompt_tokens, stats.cached_prompt_tokens, stats.computed_prompt_tokens,
            stats.recomputed_prompt_tokens) == (10, 6, 4, 2)
    assert stats.mean_accepted_per_step == pytest.approx(2.0)


def test_eos_finishes_and_is_kept_in_the_tokens_but_not_the_text(tokenizer):
    eos = tokenizer.eos_token_id
    transcript = Transcript(tokenizer, eos_token_id=eos, prompt_tokens=1)
    ids = tokenizer.encode("ok", add_special_tokens=False)
    transcript.add(StepResult(token_ids=[*ids, eos], drafted=0, accepted=0), seconds_since_arrival=0.0,
                   prefill=PrefillStats())
    summary = transcript.summary(request_id="r", total_s=1.0, decoder_id="d", model_id="m")
    assert summary.finish_reason == common_pb2.FINISH_REASON_EOS
    assert summary.text == "ok" and list(summary.token_ids) == [*ids, eos]


def test_the_record_names_the_request_s_items_and_users(tokenizer):
    request = common_pb2.GenerateRequest(pool_key="shop/shoes", blocks=[
        common_pb2.PromptBlock(id="i", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text="Write.\n"),
        common_pb2.PromptBlock(id="U7", kind=common_pb2.BLOCK_KIND_USER_HISTORY, text="likes runs\n"),
        common_pb2.PromptBlock(id="I1", kind=common_pb2.BLOCK_KIND_ITEM, text="Item 1\n"),
        common_pb2.PromptBlock(id="I2", kind=common_pb2.BLOCK_KIND_ITEM, text="Item 2\n"),
    ])
    transcript = Transcript(tokenizer, eos_token_id=None, prompt_tokens=4)
    transcript.add(steps_of(tokenizer, "hi", [2])[0], seconds_since_arrival=0.0, prefill=PrefillStats())
    record = transcript.record(request, request_id="r9", model_id="m")
    assert (record.request_id, record.pool_key, record.text, record.model_id) == ("r9", "shop/shoes", "hi", "m")
    assert list(record.item_ids) == ["I1", "I2"] and list(record.user_ids) == ["U7"]


def test_ttft_is_split_into_the_waits_a_slow_request_can_be_blamed_on(tokenizer):
    """prepare + block lookup + queue + prefill + first step == TTFT, each from its own clock."""
    transcript = Transcript(tokenizer, eos_token_id=tokenizer.eos_token_id, prompt_tokens=4, prepare_s=0.01,
                            block_lookup_s=0.2)
    steps = steps_of(tokenizer, "abc", [2, 1])
    transcript.add(steps[0], seconds_since_arrival=1.5, prefill=PrefillStats(queue_s=0.6, prefill_s=0.4))
    transcript.add(steps[1], seconds_since_arrival=1.9, prefill=PrefillStats(queue_s=9.0, prefill_s=9.0))
    stats = transcript.summary(request_id="r", total_s=2.0, decoder_id="d", model_id="m").stats
    parts = (stats.prepare_s, stats.block_lookup_s, stats.queue_s, stats.prefill_s, stats.first_step_s)
    assert parts == pytest.approx((0.01, 0.2, 0.6, 0.4, 0.29))
    assert sum(parts) == pytest.approx(stats.ttft_s)
