"""Kafka producers, consumers and topics with the settings that work against local and real brokers."""

from __future__ import annotations

import logging

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from common.settings import KafkaSettings

log = logging.getLogger(__name__)


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        acks="all",
        linger_ms=5,
        retries=5,
        max_block_ms=5000,
        request_timeout_ms=10000,
    )


def make_consumer(settings: KafkaSettings, group_id: str) -> KafkaConsumer:
    """Auto-commit off: consumers store offsets themselves, atomically with their effect."""
    return KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_records=200,
        consumer_timeout_ms=1000,
    )


def ensure_topics(settings: KafkaSettings, topics: list[str], partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","), request_timeout_ms=5000)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing])
            except TopicAlreadyExistsError:
                pass
            log.info("created topics", extra={"topics": missing})
    finally:
        admin.close()
