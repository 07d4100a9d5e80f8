"""Prefix caching in the decoder's block cache, without servers: a prefilled prompt's blocks kept
under their prefix hashes, a later prompt starting from them exactly (greedy's tokens, in the mode
the accuracy gate leaves when it turns reuse off), the chain broken by a different earlier block,
the kept KV never written by the request that reads it, and the router's share of a held prefix."""

from __future__ import annotations

import doctest

import pytest
import torch

from adaccel.v1 import common_pb2
from common.blocks import routing_keys
from common.blocks.hashing import BlockKind, prefix_hash
from common.blocks.routing_keys import prefix_routing_keys, request_blocks
from common.modeling.loading import load_model
from common.prompt_tokens import tokenize_blocks
from common.rpc.block_kinds import kinds_and_texts
from services.decoder.block_cache import BlockCache, LocalBlockMemory, ReuseSettings
from services.decoder.engine import BatchSession, DecodingEngine, GenerationConfig
from services.router.scheduling import ReplicaView, held_share

INSTRUCTION = "Rank the best candidates for this user and say why.\n"
HISTORY = {"ann": "User history: bought hiking boots, a rain jacket and wool socks.\n",
           "bob": "User history: bought a road bike, gloves and a helmet light.\n"}
ITEMS = [f"Item I{n:06d}: Sample {n} widget, colour {c}.\n" for n, c in enumerate(["red", "blue", "green"])]
QUESTION = "Question: which fit best?\nAnswer:\n"


@pytest.fixture(scope="module")
def loaded(tiny_llama_path):
    return load_model(tiny_llama_path)


def request(user: str, items, instruction: str = INSTRUCTION) -> list[common_pb2.PromptBlock]:
    return [common_pb2.PromptBlock(id="instr", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text=instruction),
            common_pb2.PromptBlock(id=user, kind=common_pb2.BLOCK_KIND_USER_HISTORY, text=HISTORY[user]),
            *(common_pb2.PromptBlock(id=f"I{i}", kind=common_pb2.BLOCK_KIND_ITEM, text=ITEMS[i]) for i in items),
            common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text=QUESTION)]


def make_cache(loaded, mode: str = "full", prefix_caching: bool = True) -> BlockCache:
    return BlockCache(loaded.model, loaded.tokenizer, loaded.model_id,
                      ReuseSettings(mode=mode, recompute_ratio=1.0, prefix_caching=prefix_caching),
                      LocalBlockMemory(64 << 20, 16 << 20), None)


def serve(cache: BlockCache, loaded, blocks, n: int = 10):
    """The batcher's path for one request: lookup, assemble, prefill, remember, decode greedily."""
    tokenized = tokenize_blocks(loaded.tokenizer, [b.text for b in blocks])
    plan = cache.lookup(tokenized, blocks)
    prepared = cache.assemble(plan, tokenized.token_ids)
    session = BatchSession(DecodingEngine(loaded.model))
    pending = session.begin(prepared.prompt_ids, GenerationConfig(max_new_tokens=n, drafting=False),
                            past_key_values=prepared.past_key_values)
    session.advance(pending, pending.remaining)
    cache.remember(plan, pending.cache, pending.computed)
    session.finish(pending)
    tokens = [t for results in session.run() for _, result in results for t in result.token_ids]
    return prepared, tokens


def token_count(loaded, text: str) -> int:
    return len(tokenize_blocks(loaded.tokenizer, [text]).token_ids)


def test_a_returning_user_starts_from_the_exact_prefix_and_gets_greedy_s_tokens(loaded, one_torch_thread):
    cache = make_cache(loaded)  # "full": what the gate leaves when reuse does not keep the answer
    first, _ = serve(cache, loaded, request("ann", [0, 1]))
    assert first.past_key_values is None and first.cached_tokens == 0
    stored = cache.memory.stats()["blocks"]
    assert stored == 4  # instruction, history, two items; the question (the tail) is always computed

    again_blocks = request("ann", [2, 0])  # same user, other candidates
    again, tokens = serve(cache, loaded, again_blocks)
    shared = tokenize_blocks(loaded.tokenizer, [b.text for b in again_blocks]).spans[2][0]  # up to the items
    assert again.mode == "prefix" and again.cached_tokens == shared
    assert again.cached_tokens + again.computed_tokens == len(again.prompt_ids)
    assert cache.counters.prefix_hits == 2 and cache.counters.local_hits == 0  # nothing approximate in "full"
    _, plain = serve(make_cache(loaded, prefix_caching=False), loaded, again_blocks)
    assert len(tokens) == 10 and tokens == plain


def test_the_chain_breaks_at_the_first_different_block(loaded, one_torch_thread):
    cache = make_cache(loaded)
    serve(cache, loaded, request("ann", [0, 1]))
    other_user, _ = serve(cache, loaded, request("bob", [0, 1]))  # same instruction, items after another user
    assert other_user.cached_tokens == token_count(loaded, INSTRUCTION)
    other_instruction, _ = serve(cache, loaded, request("ann", [0, 1], instruction="Summarise this user.\n"))
    assert other_instruction.past_key_values is None  # the history's KV saw another instruction: not reused


def test_the_kept_prefix_is_never_written_by_the_request_reading_it(loaded, one_torch_thread):
    cache = make_cache(loaded)
    serve(cache, loaded, request("ann", [0]))
    tokenized = tokenize_blocks(loaded.tokenizer, [b.text for b in request("ann", [1])])
    plan = cache.lookup(tokenized, request("ann", [1]))
    kept = [kv for _, kv in plan.body[: plan.prefix_blocks]]
    before = [k.clone() for kv in kept for k in (*kv.keys, *kv.values)]
    serve(cache, loaded, request("ann", [1]), n=16)
    after = [k for kv in kept for k in (*kv.keys, *kv.values)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_prefix_caching_off_in_full_mode_reuses_nothing(loaded):
    cache = make_cache(loaded, prefix_caching=False)
    blocks = request("ann", [0])
    assert cache.lookup(tokenize_blocks(loaded.tokenizer, [b.text for b in blocks]), blocks) is None


def test_prefix_hashes_chain():
    a, b = bytes(32), bytes([1]) * 32
    assert prefix_hash(None, a) != prefix_hash(prefix_hash(None, b), a)
    assert prefix_hash(prefix_hash(None, a), b) != prefix_hash(prefix_hash(None, b), a)


def test_routing_keys_doctests():
    assert doctest.testmod(routing_keys).failed == 0


def test_the_router_counts_a_held_prefix_up_to_its_first_missing_block():
    blocks = request("ann", [0, 1])
    footprint = request_blocks(kinds_and_texts(blocks))
    keys = prefix_routing_keys(kinds_and_texts(blocks))
    total = sum(len(b.text) for b in blocks)

    def share(held) -> float:
        return held_share(ReplicaView("r", True, 0, 0, frozenset(held)), footprint)

    assert share(keys[:2]) == pytest.approx((len(INSTRUCTION) + len(HISTORY["ann"])) / total)
    assert share(keys[1:]) == 0.0  # the instruction's prefix evicted: nothing after it is usable
    other = prefix_routing_keys(kinds_and_texts(request("bob", [0, 1])))
    assert share(other) == pytest.approx(len(INSTRUCTION) / total)  # the same instruction only
    assert kinds_and_texts(blocks)[1][0] == BlockKind.USER_HISTORY
