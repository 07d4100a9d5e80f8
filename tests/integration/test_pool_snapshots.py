"""Decoder side of the pools: snapshots fetched once per version in the background, an LRU of
them, and decoding that never depends on the pool service being up."""

from __future__ import annotations

import time

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, pool_pb2_grpc
from common.broker import free_port
from common.drafting.pools import GLOBAL_POOL
from common.telemetry import null_telemetry
from services.decoder.pool_snapshots import PoolSnapshots, wait_for_version
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from tests.integration.conftest import insert


def test_snapshots_are_fetched_only_when_the_version_moves(pool, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
    snapshots = PoolSnapshots(stub, max_pools=4)
    snapshots.note("ads/shoes/running")
    assert snapshots.refresh() == 0 and snapshots.held() == {}  # only an empty global pool so far
    insert(stub, "ads/shoes", [1, 2, 3, 4])
    assert snapshots.refresh() == 1 and snapshots.held() == {"ads/shoes": 1}
    assert snapshots.registry.resolve("ads/shoes/running").count((1, 2, 3)) == 1
    assert snapshots.refresh() == 0 and snapshots.fetches == 1  # same version: no snapshot transfer
    insert(stub, "ads/shoes", [1, 2, 3])
    insert(stub, GLOBAL_POOL, [7, 7])
    assert snapshots.refresh() == 2 and snapshots.held() == {GLOBAL_POOL: 1, "ads/shoes": 2}
    assert snapshots.registry.resolve("ads/shoes/running").count((1, 2, 3)) == 2
    assert snapshots.registry.resolve("toys").count((7, 7)) == 1


def test_the_lru_holds_at_most_max_pools_most_recently_requested(pool, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
    snapshots = PoolSnapshots(stub, max_pools=2)
    for key in ("p1", "p2", "p3"):
        insert(stub, key, [1, 2])
        snapshots.note(key)
        snapshots.refresh()
    assert snapshots.held_keys() == ["p2", "p3"] and "p1" not in snapshots.registry
    snapshots.note("p2")  # touched: p3 is now the least recently requested
    snapshots.note("p1")
    snapshots.refresh()
    assert sorted(snapshots.held_keys()) == ["p1", "p2"] and "p3" not in snapshots.registry


def test_a_pool_service_outage_keeps_the_held_snapshots(pool, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
    snapshots = PoolSnapshots(stub, timeout_s=1.0)
    insert(stub, "p", [5, 6, 7])
    snapshots.note("p")
    assert wait_for_version(snapshots, "p", 1, timeout_s=5)
    pool.stop(0)
    assert snapshots.refresh() == 0 and snapshots.available is False and snapshots.failures == 1
    assert snapshots.held() == {"p": 1} and snapshots.registry.resolve("p").count((5, 6, 7)) == 1


def generate(stub, pool_key: str) -> common_pb2.GenerationSummary:
    request = common_pb2.GenerateRequest(
        request_id="r", pool_key=pool_key,
        blocks=[common_pb2.PromptBlock(id="t", kind=common_pb2.BLOCK_KIND_TEXT, text="Aurora headphones, 30 h.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=24))
    chunks = list(stub.Generate(request, timeout=60))
    return chunks[-1].summary


def test_the_decoder_drafts_from_pool_snapshots_and_reports_them(tmp_path, pool, channel_to, tiny_llama_path):
    decoder = create_decoder_server(DecoderSettings(
        data_dir=tmp_path, model_path=tiny_llama_path, pool_addr=pool.address, pool_refresh_s=0.1,
        decoding_length=8, branch_length=4), null_telemetry())
    try:
        stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
        pool_stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
        cold = generate(stub, "shop/audio")
        # What the pool service would learn from Kafka: this very generation, into the parent pool.
        insert(pool_stub, "shop", list(cold.token_ids))
        deadline = time.monotonic() + 10
        while "shop" not in stub.Report(decoder_pb2.DecoderReportRequest(), timeout=5).pool_keys:
            assert time.monotonic() < deadline, "the decoder never fetched the pool"
            time.sleep(0.05)
        warm = generate(stub, "shop/audio")
        assert list(warm.token_ids) == list(cold.token_ids)  # strict verification: same text
        assert warm.stats.steps < cold.stats.steps  # but fewer steps: drafts came from the snapshot
    finally:
        decoder.stop(0)


def test_the_decoder_keeps_decoding_with_the_pool_service_down(tmp_path, channel_to, tiny_llama_path):
    decoder = create_decoder_server(DecoderSettings(
        data_dir=tmp_path, model_path=tiny_llama_path, pool_addr=f"127.0.0.1:{free_port()}", pool_refresh_s=0.1),
        null_telemetry())
    try:
        stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
        summary = generate(stub, "shop/audio")
        assert summary.stats.new_tokens == 24
        assert list(stub.Report(decoder_pb2.DecoderReportRequest(), timeout=5).pool_keys) == []
    finally:
        decoder.stop(0)
