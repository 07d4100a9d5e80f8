"""Kafka producers, consumers and topics with the settings that work against local and real brokers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter

from common.settings import KafkaSettings

log = logging.getLogger(__name__)


def security_options(settings: KafkaSettings) -> dict:
    """kafka-python keyword arguments for TLS and SASL; empty for a plaintext broker."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options.update(ssl_check_hostname=True,
                       ssl_cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
                       ssl_certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
                       ssl_keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None)
    if protocol.startswith("SASL_"):
        if not settings.kafka_sasl_username or settings.kafka_sasl_password_file is None:
            raise ValueError("kafka_sasl_username and kafka_sasl_password_file: required with SASL")
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password_file.read_text().strip())
    return options


# Topics are created explicitly (ensure_topics), never by using them: the embedded broker, when
# several clients auto-create one topic at once, creates it more than once and drops the records
# written in between (seen after a broker restart with two decoders publishing).
NO_AUTO_CREATE = {"allow_auto_create_topics": False}


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    return KafkaProducer(
        **security_options(settings), **NO_AUTO_CREATE,
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        acks="all",
        linger_ms=5,
        retries=5,
        max_block_ms=5000,
        request_timeout_ms=10000,
    )


def make_consumer(settings: KafkaSettings) -> KafkaConsumer:
    """No consumer group and no commits: the consumer stores offsets itself, atomically with their
    effect, and assigns itself partitions (services/pool/updater.py says why)."""
    return KafkaConsumer(
        **security_options(settings), **NO_AUTO_CREATE,
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=200,
        consumer_timeout_ms=1000,
    )


def make_admin(settings: KafkaSettings) -> KafkaAdminClient:
    """An admin client whose calls are bounded (5 s) and which reconnects by itself."""
    return KafkaAdminClient(**security_options(settings), bootstrap_servers=settings.kafka_bootstrap.split(","),
                            request_timeout_ms=5000)


def topic_layout(admin: KafkaAdminClient, topics: list[str]) -> dict[str, tuple[str, list[int]]]:
    """Topic name -> (topic id, partition numbers); topics not found are left out. The id
    changes when a topic is recreated."""
    return {d["name"]: (str(d["topic_id"]), sorted(p["partition_index"] for p in d.get("partitions", [])))
            for d in admin.describe_topics(topics) if not d.get("error_code") and d.get("topic_id")}


def create_missing_topics(admin: KafkaAdminClient, topics: list[str], partitions: int = 1) -> None:
    existing = set(admin.list_topics())
    missing = [t for t in topics if t not in existing]
    if missing:
        try:
            admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing])
        except TopicAlreadyExistsError:
            pass
        log.info("created topics", extra={"topics": missing})


def ensure_topics(settings: KafkaSettings, topics: list[str], partitions: int = 1) -> None:
    """Creates the topics that do not exist, with a short-lived admin client."""
    admin = make_admin(settings)
    try:
        create_missing_topics(admin, topics, partitions)
    finally:
        admin.close()


# ---- trace context in record headers (W3C traceparent/tracestate through OTel's propagators) ----

class _HeaderSetter(Setter[list]):
    """kafka-python headers: a list of (str, bytes)."""

    def set(self, carrier: list, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


class _HeaderGetter(Getter[Sequence]):
    def get(self, carrier: Sequence, key: str) -> list[str] | None:
        key = key.lower()
        found = [v.decode(errors="replace") for k, v in carrier or () if k.lower() == key and v is not None]
        return found or None

    def keys(self, carrier: Sequence) -> list[str]:
        return [k for k, _ in carrier or ()]


def trace_headers() -> list[tuple[str, bytes]]:
    """Headers carrying the current trace context (empty when no span is current)."""
    headers: list[tuple[str, bytes]] = []
    propagate.inject(headers, setter=_HeaderSetter())
    return headers


def trace_context(headers: Sequence[tuple[str, bytes]] | None) -> Context:
    """The trace context a record's headers carry (an empty context when they carry none)."""
    return propagate.extract(headers or [], getter=_HeaderGetter())
