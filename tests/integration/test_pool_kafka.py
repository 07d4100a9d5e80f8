"""The pool service's Kafka loop against the embedded broker and a real RocksDB: exactly-once
effect across kill -9, inventory removals, dead letters."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from adaccel.v1 import pool_pb2, pool_pb2_grpc, records_pb2
from common.rpc.channels import open_channel
from common.telemetry import null_telemetry
from services.pool.pool_store import PoolStore
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings
from tests.fuzz.pool_model import naive_counts

VOCAB = 50
NGRAM = 4


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Into a topic that exists (made here if not): no client auto-creates (common/broker.py)."""
    from common.kafka_io import ensure_topics
    from common.settings import KafkaSettings

    ensure_topics(KafkaSettings(kafka_bootstrap=bootstrap), [topic])
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, allow_auto_create_topics=False)
    for value in values:
        producer.send(topic, key=b"k", value=value)
    producer.flush(30)
    producer.close()


def dead_letters(bootstrap: str, topic: str) -> list[records_pb2.DeadLetter]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             allow_auto_create_topics=False, consumer_timeout_ms=3000)
    letters = [records_pb2.DeadLetter.FromString(r.value) for r in consumer]
    consumer.close()
    return letters


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value and not isinstance(value, tuple):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {value!r})"
        time.sleep(0.05)


class PoolProcess:
    """`python -m services.pool` as a child process, configured by ADACCEL_* env."""

    def __init__(self, data_dir: Path, env: dict[str, str]):
        self.data_dir = data_dir
        self.env = env
        self.port_file = data_dir / "pool.port"
        self.process: subprocess.Popen | None = None
        self.channel = None

    def start(self) -> pool_pb2_grpc.PoolStub:
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "ADACCEL_PORT": "0", "ADACCEL_PORT_FILE": str(self.port_file),
               "ADACCEL_DATA_DIR": str(self.data_dir), "ADACCEL_TELEMETRY_EXPORTER": "none",
               **{f"ADACCEL_{k}": v for k, v in self.env.items()}}
        log = open(self.data_dir / "pool.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "services.pool"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self.port_file.exists() or self.process.poll() is not None, 30, "the pool's port")
        assert self.process.poll() is None, (self.data_dir / "pool.log").read_text()[-2000:]
        self.channel = open_channel(f"127.0.0.1:{int(self.port_file.read_text())}")
        return pool_pb2_grpc.PoolStub(self.channel)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def test_kill_9_mid_stream_then_restart_counts_every_record_exactly_once(tmp_path, broker):
    rng = random.Random(7)
    records = [records_pb2.GeneratedRecord(pool_key=f"shop/{i % 3}", item_ids=[f"it-{i % 11}"],
                                           token_ids=[rng.randrange(VOCAB) for _ in range(rng.randint(20, 50))])
               for i in range(1000)]
    values = [r.SerializeToString() for r in records]
    for i in range(0, len(values), 200):  # malformed records in the stream too
        values.insert(i, b"\xff\xfe not a record")
    produce(broker.bootstrap, "gen-kill", values)
    pool = PoolProcess(tmp_path, {
        "KAFKA_BOOTSTRAP": broker.bootstrap, "KAFKA_GENERATED_TOPIC": "gen-kill",
        "KAFKA_INVENTORY_TOPIC": "inv-kill", "KAFKA_DEAD_LETTER_TOPIC": "dlq-kill",
        "VOCAB_SIZE": str(VOCAB), "NGRAM_LENGTH": str(NGRAM),
        "POOL_CAPACITY": "1000000"})
    try:
        stub = pool.start()
        stats = wait_until(lambda: (s := stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)).records_ingested >= 100
                           and s, 40, "ingest to start")
        pool.stop(signal.SIGKILL)  # mid-stream: no chance to finish a batch or close anything
        assert stats.records_ingested < len(records)

        stub = pool.start()

        def all_applied():
            applied = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
            return sum(p.version for p in applied.pools) == len(records) and applied

        wait_until(all_applied, 60, "every record to be applied after the restart")
    finally:
        pool.stop()

    store = PoolStore(tmp_path / "pool")
    try:
        for key in ("shop/0", "shop/1", "shop/2"):
            expected = naive_counts([r.token_ids for r in records if r.pool_key == key], NGRAM)
            stored = {path: output for path, output, _ in store.rows(key)}
            assert stored == expected, key  # no record lost, none counted twice
            assert store.pool_info(key).version == sum(r.pool_key == key for r in records)
        assert store.next_offset("gen-kill", 0) == len(values)
    finally:
        store.close()
    assert len(dead_letters(broker.bootstrap, "dlq-kill")) >= 5  # each at least once (a kill may repeat one)


def topic_settings(tmp_path, broker, gen: str, inv: str, dlq: str) -> PoolSettings:
    return PoolSettings(data_dir=tmp_path, kafka_bootstrap=broker.bootstrap, kafka_generated_topic=gen,
                        kafka_inventory_topic=inv, kafka_dead_letter_topic=dlq, vocab_size=VOCAB, ngram_length=NGRAM)


def records_done(stub, count: int):
    """The pool's stats once `count` records are applied or dead-lettered (else the counts so far)."""
    s = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
    return s if s.records_ingested + s.records_dead_lettered >= count else (s.records_ingested, s.records_dead_lettered)


def test_inventory_removal_stops_drafts_and_bad_records_go_to_the_dead_letter_topic(tmp_path, broker, channel_to):
    gen, inv, dlq = "gen-inv", "inv-inv", "dlq-inv"
    added, removed = records_pb2.INVENTORY_ACTION_ADDED, records_pb2.INVENTORY_ACTION_REMOVED
    generated = [records_pb2.GeneratedRecord(pool_key="shop", item_ids=["shoe-1"], token_ids=[1, 2, 3, 4, 5]),
                 records_pb2.GeneratedRecord(pool_key="shop", item_ids=["shoe-1", "bag-2"], token_ids=[1, 2, 6, 6]),
                 records_pb2.GeneratedRecord(pool_key="shop", item_ids=["bag-2"], token_ids=[1, 2, 7, 8])]
    produce(broker.bootstrap, gen, [r.SerializeToString() for r in generated] + [b"\x08\xff garbage"])
    events = [records_pb2.InventoryEvent(item_id="hat-3", action=added, pool_key="shop", token_ids=[1, 2, 9, 9]),
              records_pb2.InventoryEvent(item_id="shoe-1", action=removed, pool_key="shop"),
              records_pb2.InventoryEvent(item_id="", action=removed)]
    produce(broker.bootstrap, inv, [e.SerializeToString() for e in events] + [b"\xff\xff"])
    handle = create_pool_server(topic_settings(tmp_path, broker, gen, inv, dlq), null_telemetry())
    try:
        stub = pool_pb2_grpc.PoolStub(channel_to(handle.address))
        stats = wait_until(lambda: records_done(stub, 8), 30, "all records")
        assert (stats.records_ingested, stats.records_dead_lettered, stats.inventory_events) == (5, 3, 2)
        tree = stub.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(pool_key="shop", context=[1, 2],
                                                                  branch_length=2), timeout=5)
        firsts = {tree.tokens[i] for i, p in enumerate(tree.parents) if p == -1}
        assert firsts == {7, 9}  # shoe-1's texts (3 4 5; 6 6, also about bag-2) are gone; hat-3's text is in
        assert stats.pools[0].sequences == 2
    finally:
        handle.stop(0)
    letters = dead_letters(broker.bootstrap, dlq)
    reasons = sorted((letter.topic, letter.reason.split(":")[0]) for letter in letters)
    assert reasons == [(gen, "value"), (inv, "item_id"), (inv, "value")]


def test_answers_naming_their_task_fill_the_task_pool_across_pool_keys(tmp_path, broker, channel_to):
    gen, inv, dlq = "gen-task", "inv-task", "dlq-task"
    generated = [records_pb2.GeneratedRecord(pool_key="shop/shoes", task="rec", item_ids=["shoe-1"], token_ids=[1, 2, 3]),
                 records_pb2.GeneratedRecord(pool_key="shop/bags", task="rec", item_ids=["bag-2"], token_ids=[1, 2, 4]),
                 records_pb2.GeneratedRecord(pool_key="shop/bags", token_ids=[1, 2, 5]),  # no task
                 records_pb2.GeneratedRecord(pool_key="shop/bags", task="bad task", token_ids=[1, 2, 6])]
    produce(broker.bootstrap, gen, [r.SerializeToString() for r in generated])
    removal = records_pb2.InventoryEvent(item_id="shoe-1", action=records_pb2.INVENTORY_ACTION_REMOVED)
    handle = create_pool_server(topic_settings(tmp_path, broker, gen, inv, dlq), null_telemetry())
    try:
        stub = pool_pb2_grpc.PoolStub(channel_to(handle.address))

        def firsts(pool_key: str) -> set[int]:
            tree = stub.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(pool_key=pool_key, context=[1, 2],
                                                                      branch_length=1, exact=True), timeout=5)
            return {tree.tokens[i] for i, p in enumerate(tree.parents) if p == -1}

        stats = wait_until(lambda: records_done(stub, 4), 30, "the generated records")
        assert (stats.records_ingested, stats.records_dead_lettered) == (3, 1)
        assert firsts("task/rec") == {3, 4}  # both keys' answers of the task; not the one without a task
        assert firsts("shop/shoes") == {3} and firsts("shop/bags") == {4, 5}
        produce(broker.bootstrap, inv, [removal.SerializeToString()])
        wait_until(lambda: records_done(stub, 5), 30, "the removal")
        assert firsts("task/rec") == {4}  # the removed item's answer left the task pool too
        assert firsts("shop/shoes") == set()
    finally:
        handle.stop(0)


def random_records(count: int, seed: int) -> list[records_pb2.GeneratedRecord]:
    rng = random.Random(seed)
    return [records_pb2.GeneratedRecord(pool_key="shop/0", token_ids=[rng.randrange(VOCAB) for _ in range(20)])
            for _ in range(count)]


def assert_pool_holds(data_dir: Path, records: list[records_pb2.GeneratedRecord], topic: str, next_offset: int):
    """The pool on disk counts every record's n-grams once, and the topic's stored offset is as given."""
    store = PoolStore(data_dir / "pool")
    try:
        expected = naive_counts([r.token_ids for r in records], NGRAM)
        assert {path: output for path, output, _ in store.rows("shop/0")} == expected
        assert store.next_offset(topic, 0) == next_offset
    finally:
        store.close()


def test_restart_against_a_fresh_broker_reads_its_topics_from_the_start(tmp_path):
    """An in-memory broker that restarted while the pool service was down starts its offsets
    again at 0: offsets stored from the old log must not hide the new records."""
    from common.broker import EmbeddedBroker

    env = {"KAFKA_GENERATED_TOPIC": "gen-reset", "KAFKA_INVENTORY_TOPIC": "inv-reset",
           "KAFKA_DEAD_LETTER_TOPIC": "dlq-reset",
           "VOCAB_SIZE": str(VOCAB), "NGRAM_LENGTH": str(NGRAM), "POOL_CAPACITY": "1000000"}
    first, second = random_records(12, 1), random_records(3, 2)
    for batch in (first, second):
        with EmbeddedBroker() as broker:
            produce(broker.bootstrap, "gen-reset", [r.SerializeToString() for r in batch])
            pool = PoolProcess(tmp_path, {**env, "KAFKA_BOOTSTRAP": broker.bootstrap})
            try:
                stub = pool.start()
                wait_until(lambda: stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5).records_ingested
                           >= len(batch), 40, "the records of this broker to be applied")
            finally:
                pool.stop()
    assert_pool_holds(tmp_path, first + second, "gen-reset", len(second))


def test_broker_restart_under_a_running_pool_service_loses_no_record(tmp_path):
    """The pool service stays up while its in-memory broker restarts (same port, empty log): the
    new log's offsets start below the stored one, and its records must be applied, not skipped as
    redeliveries, whoever recreates the topic (the pool service here, as no client auto-creates)."""
    from common.broker import EmbeddedBroker

    first, second = random_records(12, 7), random_records(3, 8)
    broker = EmbeddedBroker().start()
    env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "KAFKA_GENERATED_TOPIC": "gen-live", "KAFKA_INVENTORY_TOPIC":
           "inv-live", "KAFKA_DEAD_LETTER_TOPIC": "dlq-live",
           "VOCAB_SIZE": str(VOCAB), "NGRAM_LENGTH": str(NGRAM), "POOL_CAPACITY": "1000000"}
    pool = PoolProcess(tmp_path, env)
    try:
        stub = pool.start()
        produce(broker.bootstrap, "gen-live", [r.SerializeToString() for r in first])
        ingested = lambda: stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5).records_ingested  # noqa: E731
        wait_until(lambda: ingested() >= len(first), 40, "the first log's records")
        broker.stop()
        time.sleep(2.0)
        broker.start()
        time.sleep(4.0)  # the consumer finds the new broker before anything is produced
        produce(broker.bootstrap, "gen-live", [r.SerializeToString() for r in second])
        wait_until(lambda: ingested() >= len(first) + len(second), 40, "the restarted log's records")
    finally:
        pool.stop()
        broker.stop()
    assert_pool_holds(tmp_path, first + second, "gen-live", len(second))
