"""Fuzzing the pool's Kafka input: garbage and mutated records on the generated and inventory topics
between valid ones. Every rejected record reaches the dead-letter topic, the consumer keeps going,
and the pools on disk equal an independent model of the accepted records."""

from __future__ import annotations

import functools
import time

from kafka import KafkaConsumer, KafkaProducer

from adaccel.v1 import pool_pb2, pool_pb2_grpc, records_pb2
from common.rpc.channels import health_status, open_channel
from common.telemetry import null_telemetry
from services.pool.ngram_records import (
    InsertSequences,
    NoChange,
    RejectedRecord,
    RemoveItem,
    generated_record_mutation,
    inventory_event_mutation,
)
from services.pool.server import SERVICE_NAME, create_pool_server
from services.pool.settings import PoolSettings
from tests.fuzz.pool_model import PoolModel, mismatched_pools
from tests.fuzz.wire import Mutator

VOCAB = 200
NGRAM = 4
MAX_TOKENS = 512
RECORDS_PER_TOPIC = 250


def generated_values(rng) -> list[bytes]:
    valid = [records_pb2.GeneratedRecord(pool_key=f"gen/{i % 3}", item_ids=[f"gen-{i % 5}"],
                                         token_ids=[rng.randrange(VOCAB) for _ in range(rng.randint(3, 20))])
             for i in range(8)]
    mutate = Mutator([v.SerializeToString() for v in valid], rng)
    values = []
    for i in range(RECORDS_PER_TOPIC):
        roll = rng.random()
        if roll < 0.3:
            values.append(valid[i % len(valid)].SerializeToString())
        elif roll < 0.35:
            values.append(b"")  # an empty value (a tombstone)
        else:
            values.append(mutate())
    return values


def inventory_values(rng) -> list[bytes]:
    added, removed = records_pb2.INVENTORY_ACTION_ADDED, records_pb2.INVENTORY_ACTION_REMOVED
    seeds = [records_pb2.InventoryEvent(item_id=f"inv-{i}", action=added if i % 3 else removed, pool_key=f"inv/{i % 2}",
                                        token_ids=[rng.randrange(VOCAB) for _ in range(6)]) for i in range(6)]
    mutate = Mutator([s.SerializeToString() for s in seeds], rng)
    return [seeds[i % 6].SerializeToString() if rng.random() < 0.3 else mutate() for i in range(RECORDS_PER_TOPIC)]


def replay(model: PoolModel, transform, values: list[bytes]) -> int:
    """Applies the accepted records to the model in topic order; returns how many must be rejected."""
    rejected = 0
    for value in values:
        try:
            mutation = transform(value)
        except RejectedRecord:
            rejected += 1
            continue
        if isinstance(mutation, InsertSequences):
            model.insert(mutation.pool_key, mutation.sequences, mutation.kind, mutation.item_ids,
                         mutation.replace_item_input)
        elif isinstance(mutation, RemoveItem):
            model.remove_item(mutation.item_id, mutation.pool_key)
        else:
            assert isinstance(mutation, NoChange)
    return rejected


def test_garbage_records_are_dead_lettered_and_pools_stay_exact(tmp_path, broker, rng, tally, reliability_report):
    topics = {"generated": "fz-generated", "inventory": "fz-inventory", "dead": "fz-dead"}
    values = {"generated": generated_values(rng), "inventory": inventory_values(rng)}
    broker.create_topics(*topics.values())
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5,
                             allow_auto_create_topics=False)
    for kind in ("generated", "inventory"):
        for value in values[kind]:
            producer.send(topics[kind], key=b"k", value=value)
    producer.flush(30)
    producer.close()

    model = PoolModel(ngram_length=NGRAM)
    # The two topics touch disjoint items and pools, so the order between them does not matter.
    rejected = replay(model, functools.partial(generated_record_mutation, vocab_size=VOCAB, max_tokens=MAX_TOKENS),
                      values["generated"])
    rejected += replay(model, functools.partial(inventory_event_mutation, vocab_size=VOCAB, max_tokens=MAX_TOKENS,
                                                tokenize=None), values["inventory"])
    total = 2 * RECORDS_PER_TOPIC
    assert 0.3 * total < rejected < total  # garbage and valid records both in the stream

    settings = PoolSettings(data_dir=tmp_path, kafka_bootstrap=broker.bootstrap,
                            kafka_generated_topic=topics["generated"], kafka_inventory_topic=topics["inventory"],
                            kafka_dead_letter_topic=topics["dead"], vocab_size=VOCAB,
                            ngram_length=NGRAM, max_tokens_per_insert=MAX_TOKENS, pool_capacity=10**8)
    handle = create_pool_server(settings, null_telemetry())
    t = tally("kafka.records")
    try:
        channel = open_channel(handle.address)
        stub = pool_pb2_grpc.PoolStub(channel)
        deadline = time.monotonic() + 60
        while True:
            stats = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
            if stats.records_ingested + stats.records_dead_lettered >= total:
                break
            assert time.monotonic() < deadline, (stats.records_ingested, stats.records_dead_lettered)
            time.sleep(0.2)
        t.inputs = total
        assert (stats.records_ingested, stats.records_dead_lettered) == (total - rejected, rejected)
        assert health_status(channel, SERVICE_NAME) == "SERVING"  # the consumer never stopped
        channel.close()
    finally:
        handle.stop(0)
    consumer = KafkaConsumer(topics["dead"], bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             allow_auto_create_topics=False, consumer_timeout_ms=3000)
    letters = [records_pb2.DeadLetter.FromString(r.value) for r in consumer]
    consumer.close()
    assert len(letters) == rejected and all(letter.reason for letter in letters)
    mismatched = mismatched_pools(tmp_path / "pool", model)
    reliability_report.pool_mismatches += len(mismatched)
    assert not mismatched
    assert sum(bool(model.expected_rows(k)) for k in model.pools) >= 3
