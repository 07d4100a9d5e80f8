"""The main job's pieces that need no stack: its figures from GenerationStats, the in-run
baseline request, and the warm-answers file it publishes from."""

from __future__ import annotations

import pytest

from adaccel.v1 import common_pb2
from common.warm_answers import WarmAnswer, answers_path, read_answers, write_answers
from services.main_job.job import add_stats, percentile, task_of, without_acceleration


def test_totals_count_draft_steps_hits_and_accepted_drafts():
    totals = dict.fromkeys(("steps", "tokens", "prompt_tokens", "cached_prompt_tokens", "draft_steps",
                            "draft_hit_steps", "drafted", "accepted_drafts"), 0)
    add_stats(totals, common_pb2.GenerationStats(
        steps=4, new_tokens=9, prompt_tokens=40, cached_prompt_tokens=30,
        accepted_per_step=[3, 1, 1, 4], drafted_per_step=[8, 8, 0, 6], accepted_drafts_per_step=[2, 0, 0, 3]))
    assert totals == {"steps": 4, "tokens": 9, "prompt_tokens": 40, "cached_prompt_tokens": 30,
                      "draft_steps": 3, "draft_hit_steps": 2, "drafted": 22, "accepted_drafts": 5}


@pytest.mark.parametrize(("values", "q", "expected"), [([], 0.5, 0.0), ([3.0], 0.99, 3.0),
                                                       ([4.0, 1.0, 3.0, 2.0, 5.0], 0.5, 3.0),
                                                       ([4.0, 1.0, 3.0, 2.0, 5.0], 0.99, 5.0)])
def test_percentile(values, q, expected):
    assert percentile(values, q) == expected


def test_the_baseline_is_the_same_request_without_acceleration_and_unpublished():
    request = common_pb2.GenerateRequest(
        request_id="r7", pool_key="home/kitchen", publish=True,
        blocks=[common_pb2.PromptBlock(id="instruction/item_knowledge/v1", kind=common_pb2.BLOCK_KIND_INSTRUCTION,
                                       text="Write.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=16))
    plain = without_acceleration(request)
    assert (plain.request_id, plain.publish, plain.params.advanced.disable_drafting,
            plain.params.advanced.disable_block_reuse) == (
        "r7-plain", False, True, True)
    assert plain.blocks == request.blocks and request.publish  # the original is untouched
    assert task_of(request) == "item_knowledge"


def test_warm_answers_round_trip_and_become_the_records_a_decoder_publishes(tmp_path):
    answer = WarmAnswer("warm-p1", "home/kitchen", "item_knowledge", ("I1",), (), (5, 6, 2), "Cast iron.",
                        "tiny", max_new_tokens=24)
    path = answers_path(tmp_path, "tiny")
    assert read_answers(path) == []
    write_answers(path, [answer])
    assert read_answers(path) == [answer]
    record = answer.record()
    assert (record.request_id, record.pool_key, list(record.item_ids), list(record.token_ids), record.text) == (
        "warm-p1", "home/kitchen", ["I1"], [5, 6, 2], "Cast iron.")
