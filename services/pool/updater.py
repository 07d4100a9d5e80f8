"""Kafka loop that keeps pools fresh: consume generated texts, apply n-grams, store the offset atomically.

Exactly-once effect with at-least-once delivery: a record's mutation and the next offset share one
RocksDB WriteBatch; on partition assignment the consumer seeks to the stored offset, and a
redelivered record below it is skipped. Malformed records go to the dead-letter topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaProducer
from kafka.errors import KafkaError

from adaccel.v1 import records_pb2
from common.kafka_io import ensure_topics, make_consumer, make_producer
from services.pool.ngram_records import PoolMutation, RejectedRecord
from services.pool.pool_store import PoolStore
from services.pool.settings import PoolSettings

log = logging.getLogger(__name__)


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, consumer, store: PoolStore):
        self.consumer = consumer
        self.store = store

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        for tp in assigned:
            stored = self.store.next_offset(tp.topic, tp.partition)
            if stored is not None:
                self.consumer.seek(tp, stored)


class PoolUpdater:
    def __init__(self, store: PoolStore, settings: PoolSettings,
                 transforms: dict[str, Callable[[bytes | None], PoolMutation]],
                 on_health: Callable[[bool], None]):
        self.store = store
        self.settings = settings
        self.transforms = transforms  # topic -> pure record transform
        self.on_health = on_health
        self.records_ingested = 0
        self.records_dead_lettered = 0
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
            consumer.subscribe(topics, listener=_SeekToStoredOffsets(consumer, self.store))
            self.on_health(True)
            while not self._stop.is_set():
                for tp, records in consumer.poll(timeout_ms=500).items():
                    for record in records:
                        self._apply(record, dead_letters)
        finally:
            consumer.close(autocommit=False)
            dead_letters.close(timeout=5)

    def _apply(self, record, dead_letters: KafkaProducer) -> None:
        stored = self.store.next_offset(record.topic, record.partition)
        if stored is not None and record.offset < stored:
            return  # redelivery of a record already applied
        next_offset = record.offset + 1
        try:
            mutation = self.transforms[record.topic](record.value)
        except RejectedRecord as exc:
            self._dead_letter(record, str(exc), dead_letters)
            self.store.store_offset(record.topic, record.partition, next_offset)
            return
        self.store.apply(mutation.pool_key, mutation.node_increments, (record.topic, record.partition, next_offset))
        self.records_ingested += 1
        if record.timestamp and record.timestamp > 0:
            self.last_lag_s = max(0.0, time.time() - record.timestamp / 1000)

    def _dead_letter(self, record, reason: str, dead_letters: KafkaProducer) -> None:
        letter = records_pb2.DeadLetter(topic=record.topic, partition=record.partition, offset=record.offset,
                                        reason=reason, key=record.key or b"", value=record.value or b"")
        try:
            # Synchronous: the offset must not move past a record whose dead letter was lost.
            dead_letters.send(self.settings.kafka_dead_letter_topic, key=record.key,
                              value=letter.SerializeToString()).get(timeout=10)
        except KafkaError:
            raise
        self.records_dead_lettered += 1
        log.warning("record dead-lettered", extra={"topic": record.topic, "offset": record.offset,
                                                   "reason": reason})
