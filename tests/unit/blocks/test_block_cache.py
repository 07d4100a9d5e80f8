"""The decoder's block cache without servers: codec checks, local memory tiers, prepare() against
full prefill through the real engine, reuse switched off, and a kv-store that cannot be reached."""

from __future__ import annotations

import time

import pytest

from adaccel.v1 import common_pb2
from common.blocks.assembly import compute_block_kv
from common.blocks.hashing import BlockKind
from common.blocks.placement import Placement
from common.modeling.loading import load_model
from common.prompt_tokens import BlockTokenizer, tokenize_blocks
from common.rpc.channels import open_channel
from services.decoder.block_cache import (
    BlockCache,
    KvStoreClient,
    LocalBlockMemory,
    ReuseSettings,
    WantedBlock,
)
from services.decoder.engine import DecodingEngine, GenerationConfig

INSTRUCTION = "Rank the best candidates for this user and say why.\n"
ITEMS = [f"Item I{n:06d}: Sample {n} widget, colour {c}, size {s}.\n"
         for n, (c, s) in enumerate([("red", "S"), ("blue", "M"), ("green", "L"), ("black", "XL")])]
QUESTION = "Question: which fit best?\nAnswer:\n"


@pytest.fixture(scope="module")
def loaded(tiny_llama_path):
    return load_model(tiny_llama_path)


def block(kind, text, id_="b"):
    return common_pb2.PromptBlock(id=id_, kind=kind, text=text)


def rec_request(item_order):
    return [block(common_pb2.BLOCK_KIND_INSTRUCTION, INSTRUCTION, "instr"),
            *(block(common_pb2.BLOCK_KIND_ITEM, ITEMS[i], f"I{i}") for i in item_order),
            block(common_pb2.BLOCK_KIND_TEXT, QUESTION, "q")]


def make_cache(loaded, mode="cacheblend", ratio=1.0, store=None, memory=None):
    memory = memory or LocalBlockMemory(64 << 20, 16 << 20)
    settings = ReuseSettings(mode=mode, recompute_ratio=ratio)
    return BlockCache(loaded.model, loaded.tokenizer, loaded.model_id, settings, memory, store)


def greedy(loaded, prepared, n=12):
    engine = DecodingEngine(loaded.model)
    config = GenerationConfig(max_new_tokens=n, drafting=False)
    out = []
    for step in engine.generate(prepared.prompt_ids, config, past_key_values=prepared.past_key_values):
        out.extend(step.token_ids)
    return out


def prepare(cache, loaded, blocks, reuse=True):
    tokenized = tokenize_blocks(loaded.tokenizer, [b.text for b in blocks])
    return cache.prepare(tokenized, blocks, reuse=reuse)


def test_local_memory_is_lru_by_bytes_and_items_never_evict_replicated_blocks(loaded):
    kv = compute_block_kv(loaded.model, [5, 6, 7, 8])
    size = sum(t.numel() * 4 for t in kv.keys + kv.values)
    memory = LocalBlockMemory(budget_bytes=2 * size, replicated_budget_bytes=size)
    memory.put(b"user", kv, BlockKind.USER_HISTORY, 1)
    for n in range(3):
        memory.put(b"item%d" % n, kv, BlockKind.ITEM, 10 + n)
    assert memory.get(b"user") is not None  # its own tier
    assert memory.get(b"item0") is None and memory.get(b"item2") is not None
    memory.get(b"item1")  # now the newest item
    hashes, keys = memory.summary(limit=10)
    assert keys == [1, 11, 12] and len(hashes) == 3
    assert memory.summary(limit=1)[1] == [1]


def test_second_prompt_reuses_items_at_new_positions_and_matches_full_prefill(loaded, one_torch_thread):
    cache = make_cache(loaded)  # cacheblend at ratio 1.0: every reused token recomputed = exact
    first = prepare(cache, loaded, rec_request([0, 1, 2]))
    assert first.past_key_values is None and first.cached_tokens == 0  # all missed: plain prefill
    assert cache.flush(30) and cache.counters.misses == 4
    second_blocks = rec_request([2, 3, 0])  # items 2 and 0 move, 3 is new
    second = prepare(cache, loaded, second_blocks)
    item_tokens = [len(loaded.tokenizer(ITEMS[i], add_special_tokens=False)["input_ids"]) for i in (2, 0)]
    instr_tokens = len(loaded.tokenizer(INSTRUCTION)["input_ids"])
    assert second.cached_tokens == instr_tokens + sum(item_tokens)
    assert second.cached_tokens + second.computed_tokens == len(second.prompt_ids)
    assert second.mode == "cacheblend" and second.past_key_values.get_seq_length() == len(second.prompt_ids)
    full = prepare(cache, loaded, second_blocks, reuse=False)
    assert full.past_key_values is None and full.computed_tokens == len(full.prompt_ids)
    assert greedy(loaded, second) == greedy(loaded, full)


def test_reuse_without_correction_runs_and_reports_no_recompute(loaded, one_torch_thread):
    cache = make_cache(loaded, mode="reuse")
    prepare(cache, loaded, rec_request([0, 1]))
    cache.flush(30)
    prepared = prepare(cache, loaded, rec_request([1, 0]))
    assert prepared.cached_tokens > 0 and prepared.recomputed_tokens == 0
    assert len(greedy(loaded, prepared, n=4)) == 4


def test_prompt_ending_with_a_cacheable_block_computes_it_as_the_tail(loaded, one_torch_thread):
    cache = make_cache(loaded)
    blocks = rec_request([0, 1])[:-1]  # no question: the last item is the tail
    prepare(cache, loaded, blocks)
    cache.flush(30)
    prepared = prepare(cache, loaded, blocks)
    last = len(loaded.tokenizer(ITEMS[1], add_special_tokens=False)["input_ids"])
    assert prepared.computed_tokens == last


def test_unreachable_kvstore_costs_one_timeout_then_is_skipped(loaded, one_torch_thread):
    from common.broker import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there: a kv-store that is down
    channel = open_channel(address)
    store = KvStoreClient(Placement([address]), {address: channel}, timeout_s=0.3, down_backoff_s=60)
    cache = make_cache(loaded, store=store)
    try:
        blocks = rec_request([0, 1])
        prepared = prepare(cache, loaded, blocks)
        assert prepared.computed_tokens == len(prepared.prompt_ids)
        assert store.errors == 1
        cache.flush(30)  # the publish skips the shard that is down
        started = time.monotonic()
        again = prepare(cache, loaded, rec_request([1, 0]))
        assert again.cached_tokens > 0 and store.errors == 1  # served from local memory, store not asked
        assert time.monotonic() - started < 5
        wanted = [WantedBlock(b"z" * 32, BlockKind.ITEM, "x")]
        assert store.fetch("m", wanted) == {} and store.errors == 1  # shard still backed off
    finally:
        cache.close()
        channel.close()


def test_block_tokenizer_memo_gives_the_same_ids(loaded):
    texts = [INSTRUCTION, ITEMS[0], ITEMS[0], QUESTION]
    memo = BlockTokenizer(loaded.tokenizer)
    assert tokenize_blocks(memo, texts) == tokenize_blocks(loaded.tokenizer, texts)
    assert tokenize_blocks(memo, texts) == tokenize_blocks(loaded.tokenizer, texts)
