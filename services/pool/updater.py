"""Kafka loop that keeps pools fresh: consume generated texts and inventory events, apply them to
the pools, store the offset atomically.

Exactly-once effect with at-least-once delivery: a record's mutation and the next offset share one
RocksDB WriteBatch (PoolManager.apply); the consumer reads each partition from the stored offset,
and a redelivered record below it is skipped. Auto-commit is off and nothing is committed to Kafka:
RocksDB holds the offsets. So the consumer joins no group: every pool replica is a full copy and
reads every partition, which it assigns itself (topic metadata from the admin API, rechecked every
few seconds). A group would add joins and rebalances and nothing else, and a JoinGroup could hold
a restarted replica's poll for minutes, waiting on the member it replaced. Not covered: a producer that sends the same generation twice
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

from kafka import KafkaProducer, TopicPartition
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from adaccel.v1 import records_pb2
from common.kafka_io import (
    create_missing_topics,
    make_admin,
    make_consumer,
    make_producer,
    topic_layout,
    trace_context,
    trace_headers,
)
from services.pool.metrics import PoolMetrics
from services.pool.ngram_records import InsertSequences, Mutation, RejectedRecord
from services.pool.pool_manager import PoolManager
from services.pool.settings import PoolSettings

log = logging.getLogger(__name__)

Transform = Callable[[bytes | None], Mutation]


class PoolUpdater:
    TOPICS_CHECK_S = 5.0  # between checks of the topics' layout (new partitions, recreated topics)
    BROKER_CALL_TIMEOUT_MS = 5000  # for the calls the loop makes besides poll

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
        self._topic_ids: dict[TopicPartition, str] = {}  # partition -> topic id it is read under
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
        admin = make_admin(settings)  # one per connection: the layout is asked every few seconds
        try:
            create_missing_topics(admin, [*topics, settings.kafka_dead_letter_topic])
        except Exception:
            admin.close()
            raise
        consumer = make_consumer(settings)
        dead_letters = make_producer(settings)
        try:
            self._sync_assignment(consumer, admin, topics)
            self.on_health(True)
            next_sync = time.monotonic() + self.TOPICS_CHECK_S
            while not self._stop.is_set():
                if not consumer.assignment():
                    self._stop.wait(0.5)
                    polled = {}
                else:
                    polled = consumer.poll(timeout_ms=500)
                suspect = False
                for tp, records in polled.items():
                    for record in records:
                        if self.apply(record, dead_letters) == "redelivered":
                            # After the seek to the stored offset a record below it is rare: it
                            # is what a broker that lost its log sends once it takes records again.
                            # The rest of the batch is read again after the check.
                            self._seek_stored(consumer, tp)
                            suspect = True
                            break
                if suspect or time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.TOPICS_CHECK_S
                    self._sync_assignment(consumer, admin, topics)
        finally:
            consumer.close(autocommit=False, timeout_ms=self.BROKER_CALL_TIMEOUT_MS)
            dead_letters.close(timeout=5)
            admin.close()

    def _sync_assignment(self, consumer, admin, topics: list[str]) -> None:
        """Assigns every partition of `topics`, each read from its stored offset, and catches the
        broker losing its log: a topic gone (created again here: no client auto-creates, see
        common/kafka_io.py), a topic id changed (recreated, or a broker without a durable log
        restarted), or a stored offset past the log's end (the same, while this process was down).
        In those cases the stored offset means nothing, the partition is read from its start;
        otherwise every new record below the old offset would pass for a redelivery and be lost.
        When the broker cannot be asked, the assignment stays and the next sync tries again."""
        try:
            layout = topic_layout(admin, topics)
            lost = [t for t in topics if t not in layout]
            if lost:
                log.warning("subscribed topics are gone from the broker; creating them", extra={"topics": lost})
                create_missing_topics(admin, lost)
                layout = topic_layout(admin, topics)
        except Exception as exc:  # noqa: BLE001 - broker away: keep reading what is assigned
            log.warning("could not read the topics' layout", extra={"error": repr(exc)})
            return
        wanted = {TopicPartition(t, p): topic_id for t, (topic_id, parts) in layout.items() for p in parts}
        assigned = consumer.assignment()
        fresh = [tp for tp, topic_id in wanted.items() if self._topic_ids.get(tp) != topic_id or tp not in assigned]
        if not fresh:
            return
        try:
            # Bounded: kafka-python's default waits request_timeout_ms (5 minutes) for a partition
            # the broker does not know, and pools would go stale that long.
            end_offsets = consumer.end_offsets(fresh, timeout_ms=self.BROKER_CALL_TIMEOUT_MS)
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("could not read end offsets", extra={"error": repr(exc)})
            return
        consumer.assign(list(wanted))
        for tp in fresh:
            stored, end = self.pools.store.next_offset(tp.topic, tp.partition), end_offsets.get(tp)
            read_under = self._topic_ids.get(tp)  # kept across reconnects, not across restarts
            if stored is not None and read_under is not None and read_under != wanted[tp]:
                log.warning("topic was recreated; reading it from the start",
                            extra={"topic": tp.topic, "partition": tp.partition})
                stored = 0
            elif stored is not None and end is not None and stored > end:
                log.warning("stored offset is past the log's end; reading the topic from the start",
                            extra={"topic": tp.topic, "partition": tp.partition, "stored": stored, "end": end})
                stored = 0
            if stored == 0:
                self.pools.store.store_offset(tp.topic, tp.partition, 0)
            self._seek_stored(consumer, tp)
            self._topic_ids[tp] = wanted[tp]
        for tp in wanted:
            if tp not in fresh:  # kept from before: continues from its stored offset
                self._seek_stored(consumer, tp)

    def _seek_stored(self, consumer, tp: TopicPartition) -> None:
        stored = self.pools.store.next_offset(tp.topic, tp.partition)
        if stored is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, stored)

    def apply(self, record, dead_letters: KafkaProducer) -> str:
        """One record, traced as a CONSUMER span continuing the producer's trace; returns the outcome."""
        attributes = {
            "messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.operation.name": "process", "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition), "messaging.kafka.offset": record.offset,
        }
        if record.key is not None:
            attributes["messaging.kafka.message.key"] = record.key.decode(errors="replace")
        producer = trace_context(record.headers)  # the publish span: this record's parent
        with self.tracer.start_as_current_span(f"process {record.topic}", context=producer,
                                               kind=SpanKind.CONSUMER, attributes=attributes) as span:
            outcome = self._apply(record, dead_letters, span)
            span.set_attribute("adaccel.outcome", outcome)
        self.metrics.records.add(1, {"messaging.destination.name": record.topic, "outcome": outcome})
        return outcome

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
