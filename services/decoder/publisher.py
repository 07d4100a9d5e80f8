"""Publishes finished generations to Kafka (topic adaccel.generated, key = pool key), trace in headers.

Each publish is a PRODUCER span, child of the request's span, open until the broker acknowledges
(or refuses) the record; its context travels in the record headers, so the pool updater's
CONSUMER span continues the request's trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaProducer
from kafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from adaccel.v1 import records_pb2
from common.kafka_io import trace_headers

log = logging.getLogger(__name__)


class GeneratedPublisher:
    def __init__(self, producer: KafkaProducer | None, topic: str, tracer: Tracer | None = None,
                 new_producer: Callable[[], KafkaProducer] | None = None, rebuild_after_s: float = 5.0):
        self._producer = producer
        self._topic = topic
        self._tracer = tracer
        # An idempotent producer whose producer id the broker lost (a restarted broker, expired
        # producer state) fails every later send for good, and one whose topic is gone (a broker
        # restarted without its log) blocks on metadata: either is replaced by a new one, made by
        # new_producer (which creates the topic again where needed).
        self._new_producer = new_producer
        self._rebuild_after_s = rebuild_after_s
        self._broken = False
        self._last_rebuild = 0.0
        self.published = 0
        self.failed = 0

    def publish(self, record: records_pb2.GeneratedRecord) -> None:
        """Best effort: a broker outage must not fail the request whose text is already streamed."""
        if self._broken or self._producer is None:
            self._rebuild()
        if self._producer is None:
            return
        value = record.SerializeToString()
        span = self._start_span(record, len(value))
        with trace.use_span(span, end_on_exit=False):
            headers = trace_headers()
        try:
            future = self._producer.send(self._topic, key=record.pool_key.encode(), value=value,
                                         headers=headers)
            future.add_callback(self._on_sent, span).add_errback(self._on_error, span)
        except Exception as exc:  # noqa: BLE001 - KafkaTimeoutError: no metadata for the topic, or buffer full
            self._broken = True
            self._on_error(span, exc)

    def _start_span(self, record: records_pb2.GeneratedRecord, size: int) -> Span:
        if self._tracer is None:  # no span of its own: the headers carry the caller's context
            return trace.get_current_span()
        return self._tracer.start_span(f"send {self._topic}", kind=SpanKind.PRODUCER, attributes={
            "messaging.system": "kafka", "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": self._topic, "messaging.kafka.message.key": record.pool_key,
            "messaging.message.body.size": size, "adaccel.request_id": record.request_id,
        })

    def _on_sent(self, span: Span, metadata) -> None:
        self.published += 1
        if self._tracer is not None:
            span.set_attributes({"messaging.destination.partition.id": str(metadata.partition),
                                 "messaging.kafka.offset": metadata.offset})
            span.end()

    def _rebuild(self) -> None:
        now = time.monotonic()
        if self._new_producer is None or now - self._last_rebuild < self._rebuild_after_s:
            return
        self._last_rebuild = now
        old, self._producer = self._producer, None
        if old is not None:
            old.close(timeout=0)
        try:
            self._producer = self._new_producer()
            self._broken = False
            log.warning("kafka producer replaced after a fatal error")
        except Exception as exc:  # noqa: BLE001 - broker still away: try again later
            log.warning("kafka producer could not be replaced", extra={"error": repr(exc)})

    def _on_error(self, span: Span, exc: BaseException) -> None:
        if isinstance(exc, KafkaError) and not exc.retriable:
            self._broken = True
        self.failed += 1
        log.warning("publish failed", extra={"error": repr(exc)})
        if self._tracer is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=5)
            self._producer.close(timeout=5)
