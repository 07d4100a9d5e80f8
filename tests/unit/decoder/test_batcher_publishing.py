"""The batcher is the model's one owner: block assembly, prefill, steps and block publishing's KV."""

from __future__ import annotations

import threading

import pytest
import torch

from adaccel.v1 import common_pb2
from common.drafting.pools import PoolRegistry
from common.modeling.loading import load_model
from services.decoder.batcher import Batcher, KvAdmission
from services.decoder.block_cache import BlockCache, LocalBlockMemory, ReuseSettings
from services.decoder.engine import DecodingEngine, GenerationConfig
from services.decoder.intake import RequestIntake

INSTRUCTION = "Rank the best candidates for this user and say why.\n"
ITEMS = [f"Item I{n:06d}: Sample {n} widget, colour {c}.\n" for n, c in enumerate(["red", "blue", "green"])]


@pytest.fixture(scope="module")
def loaded(tiny_llama_path):
    return load_model(tiny_llama_path)


def rec_request(request_id: str, order) -> common_pb2.GenerateRequest:
    blocks = [common_pb2.PromptBlock(id="instr", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text=INSTRUCTION),
              *(common_pb2.PromptBlock(id=f"I{i}", kind=common_pb2.BLOCK_KIND_ITEM, text=ITEMS[i]) for i in order),
              common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text="Which fits best?\n")]
    return common_pb2.GenerateRequest(request_id=request_id, blocks=blocks,
                                      params=common_pb2.GenerationParams(max_new_tokens=6))


class ModelThreads:
    """Records which threads run the model's forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names: set[str] = set()
        self.handle = model.register_forward_pre_hook(lambda *_: self.names.add(threading.current_thread().name))


def serve(batcher: Batcher, intake: RequestIntake, request) -> list[int]:
    prepared = intake.prepare(request, request.request_id)
    ticket = batcher.admit(prepared.kv_tokens)
    try:
        batcher.submit(ticket, intake.with_blocks(prepared, request))
        return [t for step in ticket for t in step.token_ids]
    finally:
        batcher.close(ticket)


def test_only_the_batcher_thread_runs_the_model_and_missed_blocks_get_published(loaded):
    engine = DecodingEngine(loaded.model)
    cache = BlockCache(loaded.model, loaded.tokenizer, loaded.model_id, ReuseSettings(mode="cacheblend", recompute_ratio=1.0),
                       LocalBlockMemory(64 << 20, 16 << 20), None)
    admission = KvAdmission(budget_bytes=1 << 30, bytes_per_token=1, max_requests=8)
    batcher = Batcher(engine, admission, max_batch_size=4, block_cache=cache).start()
    intake = RequestIntake(loaded.tokenizer, PoolRegistry(), engine, max_prompt_tokens=4096, block_cache=cache)
    threads = ModelThreads(loaded.model)
    try:
        first = serve(batcher, intake, rec_request("a", [0, 1, 2]))
        for _ in range(200):  # the owner computes queued blocks while idle
            if not cache.publisher.pending:
                break
            threading.Event().wait(0.02)
        assert cache.publisher.pending == 0 and cache.publisher.published == 4  # instruction + 3 items
        assert cache.counters.misses == 4
        again = serve(batcher, intake, rec_request("b", [2, 0, 1]))  # every block a hit, at other positions
        # The instruction starts both prompts: its exact KV from prefix caching; the items reused.
        assert cache.counters.prefix_hits == 1 and cache.counters.local_hits == 3
    finally:
        batcher.stop()
        threads.handle.remove()
    assert threads.names == {"batcher"}
    # Recompute ratio 1.0: the assembled cache is exact, so reuse keeps greedy's answer.
    full = engine.generate_batch([intake.prepare(rec_request("c", [2, 0, 1]), "c").prompt_ids],
                                 [GenerationConfig(max_new_tokens=6, drafting=False)])[0]
    assert len(first) == 6 and again == full


def test_the_admission_reserves_the_request_s_own_tree(loaded):
    engine = DecodingEngine(loaded.model)
    intake = RequestIntake(loaded.tokenizer, PoolRegistry(), engine, max_prompt_tokens=4096)
    request = rec_request("a", [0])
    small = intake.prepare(request, "a").kv_tokens
    request.params.advanced.decoding_length = 100
    assert intake.prepare(request, "a").kv_tokens == small - engine.settings.decoding_length + 100


def test_a_request_that_fits_the_context_exactly_decodes_greedy_and_one_more_token_is_refused(loaded):
    """prompt + max_new_tokens == the model's positions: every step, drafts included, stays inside;
    one token more is INVALID_ARGUMENT up front, naming the field and the limit."""
    from common.drafting.trie import TokenTrie, TrieSettings
    from common.rpc.errors import InvalidArgument

    limit = loaded.model.config.max_position_embeddings
    engine = DecodingEngine(loaded.model)
    pools = PoolRegistry(TrieSettings(ngram_length=10))
    intake = RequestIntake(loaded.tokenizer, pools, engine, max_prompt_tokens=limit, context_limit=limit)
    request = rec_request("edge", [0, 1, 2])
    prompt_len = len(intake.prepare(request, "edge").prompt_ids)
    request.params.max_new_tokens = limit - prompt_len
    prepared = intake.prepare(request, "edge")
    # A pool that holds greedy's own continuation: drafts are long and accepted, up to the edge.
    greedy = engine.generate_batch([prepared.prompt_ids], [GenerationConfig(max_new_tokens=limit - prompt_len,
                                                                            drafting=False)])[0]
    pool: TokenTrie = pools.global_pool
    pool.insert(prepared.prompt_ids[-4:] + greedy, "output")
    out = [t for step in engine.generate(prepared.prompt_ids, prepared.config, prepared.pool) for t in step.token_ids]
    assert out == greedy and len(out) == limit - prompt_len
    request.params.max_new_tokens += 1
    with pytest.raises(InvalidArgument, match=f"params.max_new_tokens: .* context of {limit}"):
        intake.prepare(request, "edge")
