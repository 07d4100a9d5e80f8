"""The pool service's OpenTelemetry instruments (the Kafka updater), with units and stable names."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.metrics import Counter, Histogram, Meter

from common.telemetry import LAG_BUCKETS_S, LATENCY_BUCKETS_S


@dataclass(slots=True)
class PoolMetrics:
    records: Counter
    tokens_ingested: Counter
    ingest_lag: Histogram
    apply_duration: Histogram

    @classmethod
    def create(cls, meter: Meter) -> PoolMetrics:
        return cls(
            records=meter.create_counter(
                "adaccel.pool.records", unit="{record}",
                description="Kafka records handled by the updater, by topic and outcome "
                            "(applied, dead_lettered, redelivered)"),
            tokens_ingested=meter.create_counter(
                "adaccel.pool.tokens_ingested", unit="{token}",
                description="tokens inserted into pools from Kafka"),
            ingest_lag=meter.create_histogram(
                "adaccel.pool.ingest_lag", unit="s",
                description="time from a record's creation (producer timestamp) to its effect in RocksDB",
                explicit_bucket_boundaries_advisory=LAG_BUCKETS_S),
            apply_duration=meter.create_histogram(
                "adaccel.pool.apply.duration", unit="s",
                description="time to apply one record: trie update and its RocksDB WriteBatch",
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S),
        )
