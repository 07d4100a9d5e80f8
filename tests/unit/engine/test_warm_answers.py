"""The pools' warm-up answers: decoded with continuous batching they are exactly single-request
greedy, are stored once per model and limit, and are reused instead of decoded again."""

from __future__ import annotations

import pytest
import torch

from common.drafting.pools import PoolRegistry
from common.modeling.loading import load_model
from common.workload.blocks import Block
from common.workload.prompts import Prompt
from services.decoder.engine import DecodingEngine, EngineSettings
from services.decoder.warm_answers import (
    answers_path,
    decode_greedy_batched,
    pick_warm_prompts,
    read_answers,
    stored_or_decoded_answers,
)
from tests.unit.engine.test_engine_batch_session import TIE_GAP, greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompt(i: int, split: str = "warm", pool_key: str = "home/kitchen", task: str = "item_knowledge") -> Prompt:
    blocks = (Block("instruction/item_knowledge/v1", "instruction", "Write ads.\n"),
              Block(f"I{i:06d}", "item", f"Item I{i:06d}: pan number {i}, cast iron.\n" * (1 + i % 3)),
              Block("question/item_knowledge/v1", "text", "Answer:\n"))
    return Prompt(f"p{i}", task, split, pool_key, (f"I{i:06d}",), (), blocks, "ref")


def test_batched_answers_are_single_request_greedy(tiny_llama_path):
    loaded = load_model(tiny_llama_path)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 200, (n,)).tolist() for n in (5, 17, 9, 30, 12, 7)]
    engine = DecodingEngine(loaded.model, EngineSettings(decoding_length=8, branch_length=4, learn_from_outputs=True))
    registry = PoolRegistry()
    got: dict[int, list[int]] = {}
    decode_greedy_batched(engine, prompts, [registry.get_or_create("k")] * len(prompts), 12, None, rows=3,
                          on_done=lambda i, ids: got.__setitem__(i, ids))
    assert sorted(got) == list(range(len(prompts)))
    for i, ids in got.items():
        expected, gaps = greedy(loaded.model, prompts[i], 12)
        first_diff = next((k for k, (a, b) in enumerate(zip(ids, expected)) if a != b), None)
        assert first_diff is None or gaps[first_diff] < TIE_GAP, (i, ids, expected)


def test_answers_are_stored_and_reused(tiny_llama_path, tmp_path):
    loaded = load_model(tiny_llama_path)
    prompts = [prompt(i) for i in range(4)] + [prompt(9, split="heldout")]
    wanted = pick_warm_prompts(prompts, per_segment=3)
    assert [p.prompt_id for p in wanted] == ["p0", "p1", "p2"]  # held-out prompts never enter
    answers, decoded = stored_or_decoded_answers(loaded, wanted, 6, rows=2, data_dir=tmp_path)
    assert decoded == 3 and [a.request_id for a in answers] == ["warm-p0", "warm-p1", "warm-p2"]
    assert answers[1].item_ids == ("I000001",) and answers[1].max_new_tokens == 6
    assert all(0 < len(a.token_ids) <= 6 for a in answers)
    stored = read_answers(answers_path(tmp_path, loaded.model_id))
    assert stored == answers
    again, decoded = stored_or_decoded_answers(loaded, wanted + [prompt(3)], 6, rows=2, data_dir=tmp_path)
    assert decoded == 1 and again[:3] == answers  # only the new prompt was decoded
    _, decoded = stored_or_decoded_answers(loaded, wanted, 8, rows=2, data_dir=tmp_path)
    assert decoded == 3  # another limit: answers cut at 6 tokens are not reused
    record = answers[0].record()
    assert list(record.token_ids) == list(answers[0].token_ids) and record.pool_key == "home/kitchen"
