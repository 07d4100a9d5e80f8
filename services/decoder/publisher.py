"""Publishes finished generations to Kafka (topic adaccel.generated, key = pool key), trace in headers."""

from __future__ import annotations

import logging

from kafka import KafkaProducer
from opentelemetry import propagate

from adaccel.v1 import records_pb2

log = logging.getLogger(__name__)


class GeneratedPublisher:
    def __init__(self, producer: KafkaProducer | None, topic: str):
        self._producer = producer
        self._topic = topic
        self.published = 0
        self.failed = 0

    def publish(self, record: records_pb2.GeneratedRecord) -> None:
        """Best effort: a broker outage must not fail the request whose text is already streamed."""
        if self._producer is None:
            return
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        headers = [(k, v.encode()) for k, v in carrier.items()]
        try:
            future = self._producer.send(self._topic, key=record.pool_key.encode(),
                                         value=record.SerializeToString(), headers=headers)
            future.add_callback(self._on_sent).add_errback(self._on_error)
        except Exception as exc:  # noqa: BLE001 - KafkaTimeoutError when the buffer is full or broker gone
            self._on_error(exc)

    def _on_sent(self, _metadata) -> None:
        self.published += 1

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1
        log.warning("publish failed", extra={"error": repr(exc)})

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=5)
            self._producer.close(timeout=5)
