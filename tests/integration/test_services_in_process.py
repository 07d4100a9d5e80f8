"""Single services started in-process on 127.0.0.1:0 with real clients, real RocksDB and a real broker."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from adaccel.v1 import (
    common_pb2,
    kvstore_pb2,
    kvstore_pb2_grpc,
    pool_pb2,
    pool_pb2_grpc,
    records_pb2,
    router_pb2_grpc,
)
from common.blocks.kv_codec import checksum
from common.rpc.channels import health_status
from common.telemetry import null_telemetry
from services.kvstore.server import SERVICE_NAME as KV_SERVICE
from services.kvstore.server import create_kvstore_server
from services.kvstore.settings import KvStoreSettings
from services.pool.server import SERVICE_NAME as POOL_SERVICE
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings
from services.router.server import create_router_server
from services.router.settings import RouterSettings


@pytest.fixture
def kvstore(tmp_path):
    handle = create_kvstore_server(KvStoreSettings(data_dir=tmp_path, max_block_bytes=1 << 20, chunk_bytes=1024),
                                   null_telemetry())
    yield handle
    handle.stop(0)


def put_stream(header, data, chunk=1000):
    yield kvstore_pb2.KvChunk(header=header)
    for i in range(0, len(data), chunk):
        yield kvstore_pb2.KvChunk(data=data[i:i + chunk])


def test_kvstore_streams_blocks_both_ways(kvstore, channel_to):
    stub = kvstore_pb2_grpc.KvStoreStub(channel_to(kvstore.address))
    # 10 KiB of finite float16 values (the store refuses NaN/Inf): several chunks each way.
    data = np.linspace(-4, 4, 5120, dtype=np.float16).tobytes()
    header = kvstore_pb2.KvHeader(block_hash=b"\x01" * 16, model_id="m", dtype="float16", shape=[2, 2560],
                                  total_bytes=len(data), checksum=checksum(data), num_tokens=5)
    assert stub.Put(put_stream(header, data), timeout=5).stored
    chunks = list(stub.Get(kvstore_pb2.GetRequest(block_hash=b"\x01" * 16, model_id="m"), timeout=5))
    assert chunks[0].header.shape == [2, 2560] and len(chunks) > 2
    assert b"".join(c.data for c in chunks[1:]) == data
    assert stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=[b"\x01" * 16, b"x"], model_id="m"),
                         timeout=5).present == [True, False]


@pytest.mark.parametrize("header_fields, data, code", [
    (dict(dtype="float32", shape=[3], total_bytes=12), bytes(8), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(dtype="int128", shape=[2], total_bytes=8), bytes(8), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(dtype="float32", shape=[1 << 19], total_bytes=2 << 20), b"", grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_kvstore_rejects_bad_puts_and_stores_nothing(kvstore, channel_to, header_fields, data, code):
    stub = kvstore_pb2_grpc.KvStoreStub(channel_to(kvstore.address))
    header = kvstore_pb2.KvHeader(block_hash=b"bad", model_id="m", checksum=checksum(data), **header_fields)
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(put_stream(header, data), timeout=5)
    assert err.value.code() == code
    assert stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 0


def test_kvstore_get_of_unknown_block_is_not_found(kvstore, channel_to):
    stub = kvstore_pb2_grpc.KvStoreStub(channel_to(kvstore.address))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Get(kvstore_pb2.GetRequest(block_hash=b"nope", model_id="m"), timeout=5))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert health_status(channel_to(kvstore.address), KV_SERVICE) == "SERVING"


def test_pool_without_a_broker_reports_not_serving_and_keeps_running(tmp_path, channel_to):
    from common.broker import free_port

    handle = create_pool_server(PoolSettings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}"),
                                null_telemetry())
    try:
        channel = channel_to(handle.address)
        time.sleep(1.0)
        assert health_status(channel, POOL_SERVICE) == "NOT_SERVING"
        assert health_status(channel, "") == "SERVING"  # alive, just not ready
        stub = pool_pb2_grpc.PoolStub(channel)
        reply = stub.Insert(pool_pb2.InsertRequest(pool_key="p", sequences=[pool_pb2.TokenSequence(token_ids=[1, 2])]),
                            timeout=5)
        assert reply.version == 1
    finally:
        handle.stop(0)


def test_pool_updater_applies_records_once_and_dead_letters_garbage(tmp_path, broker, channel_to):
    settings = PoolSettings(data_dir=tmp_path, kafka_bootstrap=broker.bootstrap, vocab_size=100,
                            kafka_generated_topic="gen-t1", kafka_dead_letter_topic="dlq-t1",
                            ngram_length=3)
    broker.create_topics("gen-t1", "dlq-t1")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", allow_auto_create_topics=False)
    good = records_pb2.GeneratedRecord(pool_key="a/b", token_ids=[1, 2, 3, 1, 2])
    for value in (good.SerializeToString(), b"\x08\xff garbage",
                  records_pb2.GeneratedRecord(pool_key="a/b", token_ids=[500]).SerializeToString(),
                  good.SerializeToString()):
        producer.send("gen-t1", key=b"a/b", value=value).get(10)
    producer.close()
    handle = create_pool_server(settings, null_telemetry())
    stub = pool_pb2_grpc.PoolStub(channel_to(handle.address))
    try:
        deadline = time.monotonic() + 30
        while True:
            stats = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
            if stats.records_ingested + stats.records_dead_lettered >= 4:
                break
            assert time.monotonic() < deadline, f"updater stuck at {stats}"
            time.sleep(0.2)
        assert stats.records_ingested == 2 and stats.records_dead_lettered == 2
        assert stats.pools[0].version == 2
    finally:
        handle.stop(0)

    # A restart re-reads the topic but the stored offsets make the redelivery a no-op.
    handle = create_pool_server(settings, null_telemetry())
    try:
        stub = pool_pb2_grpc.PoolStub(channel_to(handle.address))
        time.sleep(4.0)
        assert stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5).pools[0].version == 2
    finally:
        handle.stop(0)
    from services.pool.pool_store import PoolStore

    store = PoolStore(tmp_path / "pool")
    assert store.node_count("a/b", (1, 2)) == 4  # twice per record, two good records
    store.close()

    consumer = KafkaConsumer("dlq-t1", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             allow_auto_create_topics=False, consumer_timeout_ms=5000)
    reasons = [records_pb2.DeadLetter.FromString(r.value).reason for r in consumer]
    consumer.close()
    assert len(reasons) == 2
    assert any("not a GeneratedRecord" in r for r in reasons) and any("token id 500" in r for r in reasons)


def test_router_without_live_decoders_fails_fast_with_unavailable(channel_to):
    from common.broker import free_port

    handle = create_router_server(RouterSettings(decoder_addrs=[f"127.0.0.1:{free_port()}"], heartbeat_s=0.2),
                                  null_telemetry())
    try:
        stub = router_pb2_grpc.RouterStub(channel_to(handle.address))
        request = common_pb2.GenerateRequest(
            blocks=[common_pb2.PromptBlock(id="t", kind=common_pb2.BLOCK_KIND_TEXT, text="hi")],
            params=common_pb2.GenerationParams(max_new_tokens=4))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
    finally:
        handle.stop(0)
