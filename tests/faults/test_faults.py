"""Faults during a steady request stream through the whole stack (real processes; a tiny model,
or the one `--faults-model` names, as `make test-faults` does with the default model):
kill -9 of each service and its restart, a broker restart, a full kv-store memory tier, a pool
service that stops answering for seconds.

For each: requests succeed or fail fast with a clear status, none runs past its deadline, and
the stream recovers. At the end, the pools on disk equal the n-gram counts of every generated
record the broker carried (computed here, from the records), and every KV block on disk verifies.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer
from rocksdict import Options, Rdict

from adaccel.v1 import kvstore_pb2, kvstore_pb2_grpc, pool_pb2, pool_pb2_grpc, records_pb2
from common.blocks.kv_codec import checksum
from common.rpc.channels import health_status, open_channel
from services.kvstore.block_store import validate_block
from services.stack import SERVICE_NAMES, Stack
from tests.faults.traffic import RequestLog, SteadyStream
from tests.fuzz.pool_model import PoolModel, mismatched_pools
from tests.reliability_report import FaultFigures

DEADLINE_S = 10.0
NGRAM = 10  # the pool service's default ngram_length
KV_MEMORY_BUDGET = 64 << 10
GENERATED_TOPIC = "adaccel.generated"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, faults_model_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        s = Stack(data_dir=tmp_path_factory.mktemp("faults"), model_path=faults_model_path, decoders=2, extra_env={
            "decoder": {"TORCH_THREADS": "1"},
            "kvstore": {"MEMORY_BUDGET_BYTES": str(KV_MEMORY_BUDGET)},
        })
        with s:
            yield s


@pytest.fixture(scope="module")
def stream(stack):
    with SteadyStream(stack.address("router"), clients=2, deadline_s=DEADLINE_S) as s:
        assert s.wait_for_successes(4, 0.0, 60), RequestLog.summary(s.log.results, DEADLINE_S)
        yield s


@pytest.fixture(scope="module")
def archived_records() -> list[records_pb2.GeneratedRecord]:
    """Generated records of brokers that were restarted (memory storage: a restart loses the topic)."""
    return []


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60) -> list[records_pb2.GeneratedRecord]:
    """Every record of every partition (call it while nothing is produced; else what came in timeout_s)."""
    from kafka import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, allow_auto_create_topics=False)
    deadline = time.monotonic() + timeout_s
    try:
        partitions = None
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                consumer.topics()  # refresh metadata
                time.sleep(0.2)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        # Read until nothing new comes for a while: the stream is paused, so the topic is still.
        # (The embedded broker's end offsets count batches, not records: no use as a stop mark.)
        records, idle_since = [], time.monotonic()
        while time.monotonic() - idle_since < 3.0 and time.monotonic() < deadline:
            polled = [r for batch in consumer.poll(timeout_ms=500).values() for r in batch]
            if polled:
                records.extend(polled)
                idle_since = time.monotonic()
        return [records_pb2.GeneratedRecord.FromString(r.value) for r in records]
    finally:
        consumer.close()


def pool_versions(stack: Stack) -> int:
    """Records applied so far: each bumps its pool's version by one, across restarts."""
    channel = open_channel(stack.address("pool"))
    try:
        stats = pool_pb2_grpc.PoolStub(channel).Stats(pool_pb2.PoolStatsRequest(), timeout=5)
        return sum(p.version for p in stats.pools)
    finally:
        channel.close()


def wait_pool_caught_up(stack: Stack, records: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    applied = -1
    while time.monotonic() < deadline:
        try:
            applied = pool_versions(stack)
        except grpc.RpcError:
            applied = -1
        if applied == records:
            return
        if applied > records:
            channel = open_channel(stack.address("pool"))
            stats = pool_pb2_grpc.PoolStub(channel).Stats(pool_pb2.PoolStatsRequest(), timeout=5)
            channel.close()
            raise AssertionError(f"the pool applied {applied} records, the broker carried {records}: {stats}")
        time.sleep(0.2)
    raise AssertionError(f"the pool applied {applied} of {records} records; its threads:\n{thread_dump(stack, 'pool')}")


def thread_dump(stack: Stack, name: str) -> str:
    """Every thread's stack of a service (SIGUSR1, common/rpc/server.py), from the end of its log."""
    log_path = stack.data_dir / "logs" / f"{name}.log"
    size = log_path.stat().st_size
    os.kill(stack.process(name).process.pid, signal.SIGUSR1)
    time.sleep(1.0)
    with open(log_path, errors="replace") as f:
        f.seek(size)
        return f.read()[-6000:]


def survive(stack: Stack, stream: SteadyStream, reliability_report, name: str, inject, *, recover=None,
            detail: dict | None = None) -> None:
    """Injects a fault during the stream, recovers, and checks how the requests in between fared."""
    t_fault = time.monotonic()
    inject()
    if recover is not None:
        recover()
    t_recovered = time.monotonic()
    recovered = stream.wait_for_successes(4, t_recovered, 60)
    summary = RequestLog.summary(stream.log.since(t_fault), DEADLINE_S)
    healthy = {p.name: health_status_of(p) for p in stack.processes}
    survived = recovered and summary["hung"] == 0 and not summary["unclear"] and \
        all(h == "SERVING" for h in healthy.values())
    reliability_report.fault(FaultFigures(
        name=name, survived=survived, requests=summary["requests"], failed_cleanly=summary["failed_cleanly"],
        hung=summary["hung"], detail={"ok": summary["ok"], "max_elapsed_s": round(summary["max_elapsed_s"], 3),
                                      "max_failure_s": round(summary["max_failure_s"], 3),
                                      "recovery_s": round(t_recovered - t_fault, 3), **(detail or {})}))
    assert survived, (name, summary, healthy)


def health_status_of(proc) -> str:
    channel = open_channel(proc.address)
    try:
        return health_status(channel, SERVICE_NAMES[proc.kind], timeout_s=5)
    finally:
        channel.close()


@pytest.mark.parametrize("name", ["kvstore", "pool", "decoder-0", "router"])
def test_kill_9_and_restart(stack, stream, reliability_report, name):
    time.sleep(1.0)  # steady traffic before the fault
    survive(stack, stream, reliability_report, f"kill -9 {name}",
            inject=lambda: stack.kill(name, signal.SIGKILL), recover=lambda: stack.restart(name))


def test_broker_stop_and_restart(stack, stream, reliability_report, archived_records):
    # The embedded broker keeps records in memory only: what it carried is archived here first, and
    # the pool must have applied all of it (a real cluster keeps its log across a broker restart).
    stream.pause()
    records = read_topic(stack.broker.bootstrap, GENERATED_TOPIC)
    wait_pool_caught_up(stack, len(archived_records) + len(records))
    archived_records.extend(records)

    def outage():
        stack.broker.stop()  # with nothing published since the archive: the archive is the whole log
        stream.resume()
        time.sleep(3.0)  # requests go on while the broker is gone
        stack.broker.start()

    survive(stack, stream, reliability_report, "broker stop and restart", inject=outage)
    # Recovered means publishing again too: decoders replace a producer the restart left broken.
    deadline = time.monotonic() + 30
    while len(read_topic(stack.broker.bootstrap, GENERATED_TOPIC, timeout_s=5)) < 10:
        assert time.monotonic() < deadline, "no generated record reached the restarted broker"
        time.sleep(0.5)


def test_kv_store_memory_budget_filled(stack, stream, reliability_report):
    channel = open_channel(stack.address("kvstore"))
    stub = kvstore_pb2_grpc.KvStoreStub(channel)
    rng = np.random.default_rng(5)
    blocks = {}

    def fill():
        # Ten times the memory tier's budget: older blocks move to the disk tier, none is refused.
        for i in range(160):
            data = rng.standard_normal(1024, dtype=np.float32).tobytes()
            header = kvstore_pb2.KvHeader(block_hash=b"fill-%04d" % i, model_id="fault-fill", dtype="float32",
                                          shape=[1024], total_bytes=len(data), checksum=checksum(data), num_tokens=8)
            chunks = [kvstore_pb2.KvChunk(header=header), kvstore_pb2.KvChunk(data=data)]
            assert stub.Put(iter(chunks), timeout=5).stored
            blocks[header.block_hash] = data

    try:
        survive(stack, stream, reliability_report, "kv-store memory budget filled (10x)", inject=fill,
                detail={"blocks_put": 160, "budget_bytes": KV_MEMORY_BUDGET})
        stats = stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5)
        assert stats.memory_bytes <= KV_MEMORY_BUDGET and stats.disk_blocks >= len(blocks)
        for block_hash, data in blocks.items():  # every one reads back, from either tier
            chunks = list(stub.Get(kvstore_pb2.GetRequest(block_hash=block_hash, model_id="fault-fill"), timeout=5))
            assert b"".join(c.data for c in chunks[1:]) == data
    finally:
        channel.close()


def test_pool_service_stops_answering_for_seconds(stack, stream, reliability_report):
    pool = stack.process("pool")

    def stall():
        # SIGSTOP: the process holds its port but answers nothing (a GC pause, a stuck disk).
        os.kill(pool.process.pid, signal.SIGSTOP)
        try:
            time.sleep(5.0)
        finally:
            os.kill(pool.process.pid, signal.SIGCONT)

    survive(stack, stream, reliability_report, "pool service stalled 5 s (SIGSTOP)", inject=stall)


def test_after_all_faults_pools_are_exact_and_blocks_verify(stack, stream, reliability_report, archived_records):
    stream.pause()
    records = archived_records + read_topic(stack.broker.bootstrap, GENERATED_TOPIC)
    assert len(records) > 20
    wait_pool_caught_up(stack, len(records))
    data_dir = stack.data_dir
    stack.stop()
    model = PoolModel(ngram_length=NGRAM)
    for record in records:
        model.insert(record.pool_key or "global", [list(record.token_ids)], "output", tuple(record.item_ids))
    mismatched = mismatched_pools(data_dir / "pool", model)
    reliability_report.pool_mismatches += len(mismatched)
    corrupt = verify_kv_blocks(data_dir / "kvstore" / "shard-0")
    reliability_report.corrupt_blocks += corrupt
    assert not mismatched and corrupt == 0


def verify_kv_blocks(path) -> int:
    """Corrupt blocks on a kv-store shard's disk: a header that does not parse or data that fails it."""
    db = Rdict(str(path), Options(raw_mode=True))
    corrupt = 0
    try:
        for _key, raw in db.items():
            try:
                n = int.from_bytes(raw[:4], "big")
                header = kvstore_pb2.KvHeader.FromString(raw[4:4 + n])
                validate_block(header, raw[4 + n:], 1 << 40)
            except Exception:  # noqa: BLE001 - whatever fails, the block is corrupt
                corrupt += 1
    finally:
        db.close()
    return corrupt
