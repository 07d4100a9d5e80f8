"""Kafka loop that keeps pools fresh: consume generated texts and inventory events, apply them to
the pools, store the offset atomically.

Exactly-once effect with at-least-once delivery: a record's mutation and the next offset share one
RocksDB WriteBatch (PoolManager.apply); on partition assignment the consumer seeks to the stored
offset, and a redelivered record below it is skipped. Auto-commit is off and nothing is committed
to Kafka: RocksDB holds the offsets. Not covered: a producer that sends the same generation twice
(two records) counts it twice. Malformed records go to the dead-letter topic with the reason and
their offset moves on; the consumer never stops for them.

Tracing: each record is a CONSUMER span whose parent is the producer's span, taken from the
record headers (so a generation's pool update is part of the request's trace), with a child span
for the RocksDB write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaProducer
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from adaccel.v1 import records_pb2
from common.kafka_io import current_topic_ids, ensure_topics, make_consumer, make_producer, trace_context, trace_headers
from services.pool.metrics import PoolMetrics
from services.pool.ngram_records import InsertSequences, Mutation, RejectedRecord
from services.pool.pool_manager import PoolManager
from services.pool.settings import PoolSettings

log = logging.getLogger(__name__)

Transform = Callable[[bytes | None], Mutation]


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, consumer, pools: PoolManager):
        self.consumer = consumer
        self.pools = pools
        self.unchecked: list = []

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        for tp in assigned:
            stored = self.pools.store.next_offset(tp.topic, tp.partition)
            if stored is not None:
                self.consumer.seek(tp, stored)
        # Checked for recreated topics after the poll (no broker calls inside this callback).
        self.unchecked.extend(assigned)



class PoolUpdater:
    def __init__(self, pools: PoolManager, settings: PoolSettings, transforms: dict[str, Transform],
                 on_health: Callable[[bool], None], *, tracer: Tracer | None = None,
                 metrics: PoolMetrics | None = None):
        self.pools = pools
        self.tracer = tracer or trace.NoOpTracer()
        self.metrics = metrics or PoolMetrics.create(otel_metrics.NoOpMeter("adaccel.pool"))
        self.settings = settings
        self.transforms = transforms  # topic -> pure record transform
        self.on_health = on_health
        self.records_ingested = 0
        self.records_dead_lettered = 0
        self.tokens_ingested = 0
        self.inventory_events = 0
        self.last_lag_s = 0.0
        self._partition_topic_ids: dict[tuple[str, int], str] = {}  # (topic, partition) -> id read under
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
            listener = _SeekToStoredOffsets(consumer, self.pools)
            consumer.subscribe(topics, listener=listener)
            self.on_health(True)
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=500)
                if listener.unchecked:
                    listener.unchecked = self._restart_recreated_topics(consumer, listener.unchecked)
                    # Records of partitions not checked yet wait for the check (they were seeked back).
                    polled = {tp: rs for tp, rs in polled.items() if tp not in listener.unchecked}
                for records in polled.values():
                    for record in records:
                        self.apply(record, dead_letters)
        finally:
            consumer.close(autocommit=False)
            dead_letters.close(timeout=5)

    def _restart_recreated_topics(self, consumer, assigned: list) -> list:
        """A partition read under one topic id whose topic now has another was recreated (or its
        broker kept no durable log and restarted): its offsets start again, so the stored one means
        nothing and it is read from its start; otherwise every new record below the old offset
        would pass for a redelivery and be lost. Returns the partitions still to check (all of
        them when the ids could not be read; they are seeked back to their stored offsets).
        Ids are remembered in memory: a recreation while this process was down goes unseen."""
        try:
            ids = current_topic_ids(self.settings, sorted({tp.topic for tp in assigned}))
        except Exception as exc:  # noqa: BLE001 - broker still coming back: check at the next poll
            log.warning("could not read topic ids", extra={"error": repr(exc)})
            for tp in assigned:
                stored = self.pools.store.next_offset(tp.topic, tp.partition)
                if stored is None:
                    consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, stored)
            return list(assigned)
        try:
            end_offsets = consumer.end_offsets(list(assigned))
        except Exception as exc:  # noqa: BLE001 - as above: check again at the next poll
            log.warning("could not read end offsets", extra={"error": repr(exc)})
            return list(assigned)
        for tp in assigned:
            stored, end = self.pools.store.next_offset(tp.topic, tp.partition), end_offsets.get(tp)
            if stored is not None and end is not None and stored > end:
                # The log ends before what was already applied: the broker lost it (an in-memory
                # broker restarted while this service was down), and its new records start at 0.
                log.warning("stored offset is past the log's end; reading the topic from the start",
                            extra={"topic": tp.topic, "partition": tp.partition, "stored": stored, "end": end})
                self.pools.store.store_offset(tp.topic, tp.partition, 0)
                consumer.seek(tp, 0)
            read_under, now = self._partition_topic_ids.get((tp.topic, tp.partition)), ids.get(tp.topic)
            if read_under and now and read_under != now:
                log.warning("topic was recreated; reading it from the start",
                            extra={"topic": tp.topic, "partition": tp.partition})
                self.pools.store.store_offset(tp.topic, tp.partition, 0)
                consumer.seek(tp, 0)
            if now:
                self._partition_topic_ids[(tp.topic, tp.partition)] = now
        return []

    def apply(self, record, dead_letters: KafkaProducer) -> None:
        """One record, traced as a CONSUMER span continuing the producer's trace."""
        attributes = {
            "messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.operation.name": "process", "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition), "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": self.settings.consumer_group,
        }
        if record.key is not None:
            attributes["messaging.kafka.message.key"] = record.key.decode(errors="replace")
        producer = trace_context(record.headers)  # the publish span: this record's parent
        with self.tracer.start_as_current_span(f"process {record.topic}", context=producer,
                                               kind=SpanKind.CONSUMER, attributes=attributes) as span:
            outcome = self._apply(record, dead_letters, span)
            span.set_attribute("adaccel.outcome", outcome)
        self.metrics.records.add(1, {"messaging.destination.name": record.topic, "outcome": outcome})

    def _apply(self, record, dead_letters: KafkaProducer, span: Span) -> str:
        """Skip a redelivery, else transform and apply with its next offset; returns the outcome."""
        stored = self.pools.store.next_offset(record.topic, record.partition)
        if stored is not None and record.offset < stored:
            return "redelivered"  # a record already applied
        offset = (record.topic, record.partition, record.offset + 1)
        try:
            mutation = self.transforms[record.topic](record.value)
        except RejectedRecord as exc:
            span.set_status(Status(StatusCode.ERROR, f"rejected: {exc}"))
            self._dead_letter(record, str(exc), dead_letters)
            self.pools.store.store_offset(*offset)
            return "dead_lettered"
        started = time.perf_counter()
        with self.tracer.start_as_current_span("adaccel.pool.apply", attributes={
                "db.system.name": "rocksdb", "adaccel.mutation": type(mutation).__name__}) as write_span:
            changed = self.pools.apply(mutation, offset)
            write_span.set_attribute("adaccel.pools_changed", len(changed))
        by_topic = {"messaging.destination.name": record.topic}
        self.metrics.apply_duration.record(time.perf_counter() - started, by_topic)
        self.records_ingested += 1
        if record.topic == self.settings.kafka_inventory_topic:
            self.inventory_events += 1
        if isinstance(mutation, InsertSequences) and changed:
            self.tokens_ingested += mutation.tokens
            self.metrics.tokens_ingested.add(mutation.tokens, by_topic)
        if record.timestamp and record.timestamp > 0:
            self.last_lag_s = max(0.0, time.time() - record.timestamp / 1000)
            self.metrics.ingest_lag.record(self.last_lag_s, by_topic)
        return "applied"

    def _dead_letter(self, record, reason: str, dead_letters: KafkaProducer) -> None:
        letter = records_pb2.DeadLetter(topic=record.topic, partition=record.partition, offset=record.offset,
                                        reason=reason, key=record.key or b"", value=record.value or b"")
        # Synchronous: the offset must not move past a record whose dead letter was lost (a
        # KafkaError propagates, the consumer reconnects and the record comes again).
        dead_letters.send(self.settings.kafka_dead_letter_topic, key=record.key,
                          value=letter.SerializeToString(), headers=trace_headers()).get(timeout=10)
        self.records_dead_lettered += 1
        log.warning("record dead-lettered", extra={"topic": record.topic, "offset": record.offset,
                                                   "reason": reason})
