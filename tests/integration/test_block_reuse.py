"""Block KV reuse across real servers in-process: a kv-store (real RocksDB) and decoders on loopback.

The decoders run CacheBlend at recompute ratio 1.0, which recomputes every reused token: output
must then equal full prefill token for token while the blocks still come from the caches, so
these tests check the plumbing (lookup, transfer, checks, positions) exactly.
"""

from __future__ import annotations

import time

import pytest
import torch

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc
from common.blocks.hashing import BlockKind, block_hash, tokenizer_fingerprint
from common.blocks.kv_codec import cache_model_key
from common.blocks.routing_keys import routing_key
from common.modeling.loading import load_model
from common.rpc.server import create_server
from common.telemetry import null_telemetry
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from services.kvstore.block_store import BlockStore, storage_key
from services.kvstore.server import SERVICE_NAME as KV_SERVICE
from services.kvstore.service import KvStoreService
from services.kvstore.settings import KvStoreSettings

INSTRUCTION = "Rank the best candidates for this user and say why.\n"
ITEMS = [f"Item I{n:06d}: Sample {n} widget, colour {c}.\n" for n, c in enumerate(["red", "blue", "green", "gold"])]
QUESTION = "Question: which fit best?\nAnswer:\n"


def start_kvstore(path, shard: int = 0):
    """A real kv-store server and its BlockStore (which the test may reach, to corrupt a block)."""
    settings = KvStoreSettings(data_dir=path, chunk_bytes=4096, shard=shard)
    store = BlockStore(path / "kvstore", settings.memory_budget_bytes, settings.max_block_bytes)
    handle = create_server(settings, null_telemetry(),
                           [(kvstore_pb2_grpc.add_KvStoreServicer_to_server,
                             KvStoreService(store, chunk_bytes=settings.chunk_bytes, shard=shard))], [KV_SERVICE])
    handle.on_stop.append(store.close)
    handle.set_serving(True)
    return handle, store


@pytest.fixture
def kvstore(tmp_path):
    handle, store = start_kvstore(tmp_path)
    yield handle, store
    handle.stop(0)


def start_decoder(tmp_path, model_path, kv_address: str | list[str], name: str, **settings):
    settings = DecoderSettings(
        data_dir=tmp_path / name, model_path=model_path, decoder_id=name,
        kvstore_addrs=[kv_address] if isinstance(kv_address, str) else kv_address,
        reuse_mode="cacheblend", recompute_ratio=1.0, reuse_gate_prompts=2, kvstore_timeout_s=0.5,
        torch_threads=1, telemetry_exporter="none", **settings,
    )
    return create_decoder_server(settings, null_telemetry())


def request(item_order, *, reuse=True, request_id="r"):
    blocks = [common_pb2.PromptBlock(id="instr", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text=INSTRUCTION)]
    blocks += [common_pb2.PromptBlock(id=f"I{i}", kind=common_pb2.BLOCK_KIND_ITEM, text=ITEMS[i]) for i in item_order]
    blocks.append(common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text=QUESTION))
    return common_pb2.GenerateRequest(request_id=request_id, blocks=blocks, params=common_pb2.GenerationParams(
        max_new_tokens=8,
        advanced=common_pb2.AdvancedParams(disable_drafting=True, disable_block_reuse=not reuse)))


def generate(stub, req) -> common_pb2.GenerationSummary:
    chunks = list(stub.Generate(req, timeout=60))
    return chunks[-1].summary


def wait_for(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_blocks_are_reused_across_positions_replicas_corruption_and_a_dead_store(
        tmp_path, kvstore, tiny_llama_path, channel_to):
    kv_handle, store = kvstore
    kv_stub = kvstore_pb2_grpc.KvStoreStub(channel_to(kv_handle.address))
    first = start_decoder(tmp_path, tiny_llama_path, kv_handle.address, "d1")
    second = None
    try:
        d1 = decoder_pb2_grpc.DecoderStub(channel_to(first.address))
        cold = generate(d1, request([0, 1, 2]))
        assert cold.stats.cached_prompt_tokens == 0
        assert cold.stats.computed_prompt_tokens == cold.stats.prompt_tokens
        # Published in the background: to this replica's memory (its Report) and to the kv-store.
        # Its report also lists the prefixes prefix caching keeps (under other keys): look for these 4.
        published = {routing_key(BlockKind.INSTRUCTION, INSTRUCTION),
                     *(routing_key(BlockKind.ITEM, ITEMS[i]) for i in (0, 1, 2))}
        wait_for(lambda: published <= set(d1.Report(decoder_pb2.DecoderReportRequest(), timeout=5).block_keys),
                 "the decoder to report its 4 blocks")
        wait_for(lambda: kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 4,
                 "4 blocks in the kv-store")

        moved = request([2, 3, 0])  # items 2 and 0 at new positions, item 3 new
        warm = generate(d1, moved)
        full = generate(d1, request([2, 3, 0], reuse=False))
        assert warm.stats.cached_prompt_tokens > 0
        assert full.stats.cached_prompt_tokens == 0 and full.stats.computed_prompt_tokens == full.stats.prompt_tokens
        assert warm.token_ids == full.token_ids
        wait_for(lambda: kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 5,
                 "item 3 published too")

        # Corrupt item 0's bytes on disk (and drop the store's memory copy): the store must not
        # serve it, the fresh replica recomputes it, and the output is unchanged.
        loaded = load_model(tiny_llama_path)
        model_key = cache_model_key(loaded.blocks_model_id, torch.float32)
        item0 = loaded.tokenizer(ITEMS[0], add_special_tokens=False)["input_ids"]
        key = storage_key(model_key, block_hash(model_id=model_key, tokenizer_fp=tokenizer_fingerprint(loaded.tokenizer),
                                                kind=BlockKind.ITEM, token_ids=item0))
        raw = bytearray(store._db[key])
        raw[-5] ^= 0xFF
        store._db[key] = bytes(raw)
        store._memory.clear()
        store._memory_bytes = 0

        second = start_decoder(tmp_path, tiny_llama_path, kv_handle.address, "d2")
        d2 = decoder_pb2_grpc.DecoderStub(channel_to(second.address))
        replica = generate(d2, moved)  # empty local memory: everything but item 0 from the store
        instr = len(loaded.tokenizer(INSTRUCTION)["input_ids"])
        assert replica.stats.cached_prompt_tokens == instr + sum(
            len(loaded.tokenizer(ITEMS[i], add_special_tokens=False)["input_ids"]) for i in (2, 3))
        assert replica.stats.computed_prompt_tokens == len(item0) + len(loaded.tokenizer(QUESTION)["input_ids"])
        assert replica.token_ids == full.token_ids
        # The replica computed item 0 itself and published it again.
        wait_for(lambda: kv_stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=[key[-32:]], model_id=model_key),
                                          timeout=5).present == [True], "item 0 re-published")

        # The kv-store goes away: replicas keep serving from local memory and compute the rest.
        kv_handle.stop(0)
        wait_for(lambda: len(d2.Report(decoder_pb2.DecoderReportRequest(), timeout=5).block_keys) >= 4,
                 "d2 holding its blocks")
        started = time.monotonic()
        down = generate(d2, request([3, 1, 2]))
        assert down.stats.cached_prompt_tokens > 0 and len(down.token_ids) == 8
        assert down.token_ids == generate(d2, request([3, 1, 2], reuse=False)).token_ids
        assert time.monotonic() - started < 30
    finally:
        first.stop(0)
        if second is not None:
            second.stop(0)


def test_items_are_sharded_by_learned_anchors_and_replicas_read_them_back(tmp_path, tiny_llama_path, channel_to):
    """Two kv-store shards: the instruction (a replicated kind) is on both, each item on exactly
    the shard the placement function names for it (anchors learned from these items, read by both
    decoders from one file), and a replica with empty memory gets every block from the shards."""
    import numpy as np

    from common.blocks.item_embedding import item_embedder
    from common.blocks.placement import AnchorBuckets, Placement

    items = [f"Item S{n:03d}: {kind} for {use}, {colour}.\n" for n, (kind, use, colour) in enumerate([
        ("Running shoes", "trail runs", "red"), ("Wool socks", "hiking", "grey"), ("Espresso maker", "kitchens", "steel"),
        ("Tea kettle", "kitchens", "white"), ("Trail backpack", "hiking", "green"), ("Coffee grinder", "kitchens", "black")])]
    embed = item_embedder("category")
    anchors_file = tmp_path / "anchors.npy"
    AnchorBuckets.from_sample(np.stack([embed(t) for t in items]), 3, seed=0).save(anchors_file)
    shards = [start_kvstore(tmp_path / f"shard-{i}", shard=i) for i in range(2)]
    addresses = [handle.address for handle, _ in shards]
    placement = Placement(addresses, AnchorBuckets.load(anchors_file, embed.dim))
    loaded = load_model(tiny_llama_path)
    model_key = cache_model_key(loaded.blocks_model_id, torch.float32)
    fp = tokenizer_fingerprint(loaded.tokenizer)

    def key_of(kind, text, special=False):
        ids = loaded.tokenizer(text, add_special_tokens=special)["input_ids"]
        return block_hash(model_id=model_key, tokenizer_fp=fp, kind=kind, token_ids=ids), len(ids)

    def sharded_request(order, reuse=True):
        blocks = [common_pb2.PromptBlock(id="instr", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text=INSTRUCTION)]
        blocks += [common_pb2.PromptBlock(id=f"S{i}", kind=common_pb2.BLOCK_KIND_ITEM, text=items[i]) for i in order]
        blocks.append(common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text=QUESTION))
        return common_pb2.GenerateRequest(request_id="s", blocks=blocks, params=common_pb2.GenerationParams(
            max_new_tokens=8,
            advanced=common_pb2.AdvancedParams(disable_drafting=True, disable_block_reuse=not reuse)))

    decoders = []
    try:
        decoders.append(start_decoder(tmp_path, tiny_llama_path, addresses, "s1", placement_embedder="category",
                                      placement_anchors_file=anchors_file))
        d1 = decoder_pb2_grpc.DecoderStub(channel_to(decoders[0].address))
        generate(d1, sharded_request(range(6)))
        stubs = [kvstore_pb2_grpc.KvStoreStub(channel_to(a)) for a in addresses]

        def present(stub, hash_):
            return stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=[hash_], model_id=model_key),
                                 timeout=5).present == [True]

        instr_hash, instr_tokens = key_of(BlockKind.INSTRUCTION, INSTRUCTION, special=True)
        wait_for(lambda: all(present(stub, instr_hash) for stub in stubs), "the instruction on every shard")
        item_tokens = 0
        for text in items:
            hash_, n = key_of(BlockKind.ITEM, text)
            item_tokens += n
            [home] = placement.shards_for(BlockKind.ITEM, hash_, embed(text))
            wait_for(lambda: present(stubs[addresses.index(home)], hash_), f"{text.strip()} on {home}")
            assert not present(stubs[1 - addresses.index(home)], hash_), f"{text.strip()} on both shards"

        decoders.append(start_decoder(tmp_path, tiny_llama_path, addresses, "s2", placement_embedder="category",
                                      placement_anchors_file=anchors_file))
        d2 = decoder_pb2_grpc.DecoderStub(channel_to(decoders[1].address))
        shuffled = [4, 0, 5, 2, 1, 3]
        replica = generate(d2, sharded_request(shuffled))
        assert replica.stats.cached_prompt_tokens == instr_tokens + item_tokens
        assert replica.token_ids == generate(d2, sharded_request(shuffled, reuse=False)).token_ids
    finally:
        for handle in decoders:
            handle.stop(0)
        for handle, _ in shards:
            handle.stop(0)
