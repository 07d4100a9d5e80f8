"""Which settings class each chart component runs with, and which of its fields the chart owns.

The pydantic settings classes are the source of truth for every ADACCEL_* variable. A field is
either *chart-owned* (the templates compute it from other values: ports, addresses, paths, Kafka,
per-pod identity) or *tunable* (an operator sets it under `<component>.settings.<field>` and it
lands in the component's ConfigMap). `values_schema` types the tunable ones from the classes,
`settings_table` documents both, and tests/unit/k8s checks the rendered chart against both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from services.decoder.settings import DecoderSettings
from services.kvstore.settings import KvStoreSettings
from services.pool.settings import PoolSettings
from services.router.settings import RouterSettings

ENV_PREFIX = "ADACCEL_"

# ServiceSettings fields every component gets from the chart. Value: how, for SETTINGS.md.
COMMON_OWNED: Mapping[str, str] = {
    "host": "`listenHost`",
    "port": "`grpcPort` (also the container port and the probes' port)",
    "port_file": "never set (tests only)",
    "data_dir": "`/data`: the pod's PVC (kvstore, pool) or an emptyDir",
    "telemetry_exporter": "`telemetry.exporter`; `otlp` when `telemetry.otlpEndpoint` is set",
    "otlp_endpoint": "`telemetry.otlpEndpoint`",
    "metrics_port": "`telemetry.metricsPort` (also the container port `metrics` and the "
                    "prometheus.io/port annotation)",
}

# KafkaSettings fields the chart owns (connection and topics are shared by decoder and pool).
KAFKA_OWNED: Mapping[str, str] = {
    "kafka_bootstrap": "`kafka.bootstrapServers`",
    "kafka_generated_topic": "`kafka.topics.generated`",
    "kafka_inventory_topic": "`kafka.topics.inventory`",
    "kafka_dead_letter_topic": "`kafka.topics.deadLetter`",
}


@dataclass(frozen=True, slots=True)
class Component:
    name: str  # chart component and `python -m services.<name>`
    settings_cls: type[BaseSettings]
    grpc_service: str  # named service in grpc.health.v1 (readiness); liveness asks for ""
    chart_owned: Mapping[str, str]  # field -> how the chart sets it
    pod_env: frozenset[str]  # chart-owned fields set per pod as container env, not in the ConfigMap
    stateful: bool  # StatefulSet (stable names / volumeClaimTemplates) rather than Deployment

    @property
    def fields(self) -> dict[str, FieldInfo]:
        return dict(self.settings_cls.model_fields)

    @property
    def tunable(self) -> list[str]:
        """Fields an operator sets under `<name>.settings`, in class order."""
        return [f for f in self.fields if f not in self.chart_owned]


COMPONENTS: tuple[Component, ...] = (
    Component(
        "router", RouterSettings, "adaccel.v1.Router",
        {**COMMON_OWNED,
         "decoder_addrs": "one DNS name per decoder pod, from `decoder.replicas` (headless Service)"},
        frozenset(), stateful=False,
    ),
    Component(
        "decoder", DecoderSettings, "adaccel.v1.Decoder",
        {**COMMON_OWNED, **KAFKA_OWNED,
         "model_path": "`model.mountPath`/`model.subPath` (the model volume)",
         "device": "`cuda` when `decoder.gpu.count` > 0, else `cpu`",
         "pool_addr": "the pool Service, `<fullname>-pool:<grpcPort>`",
         "kvstore_addrs": "one DNS name per kvstore pod (shard = ordinal), from `kvstore.replicas` (headless Service)",
         "decoder_id": "the pod name (container env)"},
        frozenset({"decoder_id"}), stateful=True,
    ),
    Component(
        "kvstore", KvStoreSettings, "adaccel.v1.KvStore",
        {**COMMON_OWNED,
         "shard": "the StatefulSet ordinal, from the pod name (container command)"},
        frozenset({"shard"}), stateful=True,
    ),
    Component(
        "pool", PoolSettings, "adaccel.v1.Pool",
        {**COMMON_OWNED, **KAFKA_OWNED,
         "model_path": "`model.mountPath`/`model.subPath` when `pool.modelTokenizer`, else unset"},
        frozenset(), stateful=True,
    ),
)

BY_NAME: Mapping[str, Component] = {c.name: c for c in COMPONENTS}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
