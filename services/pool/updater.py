"""Kafka loop that keeps pools fresh: consume generated texts and inventory events, apply them to
the pools, store the offset atomically.

Exactly-once effect with at-least-once delivery: a record's mutation and the next offset share one
RocksDB WriteBatch (PoolManager.apply); on partition assignment the consumer seeks to the stored
offset, and a redelivered record below it is skipped. Auto-commit is off and nothing is committed
to Kafka: RocksDB holds the offsets. Not covered: a producer that sends the same generation twice
(two records) counts it twice. Malformed records go to the dead-letter topic with the reason and
their offset moves on; the consumer never stops for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaProducer

from adaccel.v1 import records_pb2
from common.kafka_io import ensure_topics, make_consumer, make_producer
from services.pool.ngram_records import InsertSequences, Mutation, RejectedRecord
from services.pool.pool_manager import PoolManager
from services.pool.settings import PoolSettings

log = logging.getLogger(__name__)

Transform = Callable[[bytes | None], Mutation]


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, consumer, pools: PoolManager):
        self.consumer = consumer
        self.pools = pools

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        for tp in assigned:
            stored = self.pools.store.next_offset(tp.topic, tp.partition)
            if stored is not None:
                self.consumer.seek(tp, stored)


class PoolUpdater:
    def __init__(self, pools: PoolManager, settings: PoolSettings, transforms: dict[str, Transform],
                 on_health: Callable[[bool], None]):
        self.pools = pools
        self.settings = settings
        self.transforms = transforms  # topic -> pure record transform
        self.on_health = on_health
        self.records_ingested = 0
        self.records_dead_lettered = 0
        self.tokens_ingested = 0
        self.inventory_events = 0
        self.last_lag_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-updater", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # noqa: BLE001 - broker gone: report, back off, reconnect
                self.on_health(False)
                log.warning("updater lost the broker; retrying", extra={"error": repr(exc)})
                self._stop.wait(2.0)

    def _consume(self) -> None:
        settings = self.settings
        topics = list(self.transforms)
        ensure_topics(settings, [*topics, settings.kafka_dead_letter_topic])
        consumer = make_consumer(settings, settings.consumer_group)
        dead_letters = make_producer(settings)
        try:
            consumer.subscribe(topics, listener=_SeekToStoredOffsets(consumer, self.pools))
            self.on_health(True)
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        self.apply(record, dead_letters)
        finally:
            consumer.close(autocommit=False)
            dead_letters.close(timeout=5)

    def apply(self, record, dead_letters: KafkaProducer) -> None:
        """One record: skip a redelivery, else transform and apply with its next offset."""
        stored = self.pools.store.next_offset(record.topic, record.partition)
        if stored is not None and record.offset < stored:
            return  # redelivery of a record already applied
        offset = (record.topic, record.partition, record.offset + 1)
        try:
            mutation = self.transforms[record.topic](record.value)
        except RejectedRecord as exc:
            self._dead_letter(record, str(exc), dead_letters)
            self.pools.store.store_offset(*offset)
            return
        changed = self.pools.apply(mutation, offset)
        self.records_ingested += 1
        if record.topic == self.settings.kafka_inventory_topic:
            self.inventory_events += 1
        if isinstance(mutation, InsertSequences) and changed:
            self.tokens_ingested += mutation.tokens
        if record.timestamp and record.timestamp > 0:
            self.last_lag_s = max(0.0, time.time() - record.timestamp / 1000)

    def _dead_letter(self, record, reason: str, dead_letters: KafkaProducer) -> None:
        letter = records_pb2.DeadLetter(topic=record.topic, partition=record.partition, offset=record.offset,
                                        reason=reason, key=record.key or b"", value=record.value or b"")
        # Synchronous: the offset must not move past a record whose dead letter was lost (a
        # KafkaError propagates, the consumer reconnects and the record comes again).
        dead_letters.send(self.settings.kafka_dead_letter_topic, key=record.key,
                          value=letter.SerializeToString()).get(timeout=10)
        self.records_dead_lettered += 1
        log.warning("record dead-lettered", extra={"topic": record.topic, "offset": record.offset,
                                                   "reason": reason})
