"""Writes k8s/adaccel/values.schema.json: `python -m k8s.values_schema [--check]`.

The schema types every key of values.yaml, closes every object whose keys the chart knows
(`additionalProperties: false`), and uses only local `$ref`s (`#/$defs/...`), so `helm lint`
works offline. Each `<component>.settings` object is derived from that component's pydantic
settings class (tunable fields only, see settings_catalog), so a renamed or removed setting
fails the schema instead of reaching a pod as an ignored env var. `--check` exits 1 when the
committed file differs from what this module generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from k8s.settings_catalog import COMPONENTS, Component

SCHEMA_PATH = Path(__file__).parent / "adaccel" / "values.schema.json"

Schema = dict[str, Any]


def _obj(properties: dict[str, Schema], *, required: list[str] | None = None,
         description: str = "") -> Schema:
    schema: Schema = {"type": "object"}
    if description:
        schema["description"] = description
    schema["additionalProperties"] = False
    schema["properties"] = properties
    schema["required"] = sorted(required if required is not None else properties)
    return schema


def _str(description: str = "", **extra: Any) -> Schema:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def _int(minimum: int | None = None, maximum: int | None = None, description: str = "") -> Schema:
    schema: Schema = {"type": "integer"}
    if description:
        schema["description"] = description
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _bool(description: str = "") -> Schema:
    return {"type": "boolean", **({"description": description} if description else {})}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


def _free_map(description: str) -> Schema:
    """Kubernetes-shaped maps the chart passes through (nodeSelector, affinity, annotations)."""
    return {"type": "object", "description": description}


# Shapes used by every component.
QUANTITY: Schema = {"type": ["string", "integer", "number"], "description": "a Kubernetes quantity"}
DEFS: dict[str, Schema] = {
    "quantity": QUANTITY,
    "resourceList": {
        "type": "object",
        "additionalProperties": _ref("quantity"),
        "propertyNames": {"pattern": "^[a-z0-9A-Z./-]+$"},
    },
    "resources": _obj(
        {"requests": _ref("resourceList"), "limits": _ref("resourceList")},
        description="container requests and limits",
    ),
    "probe": _obj({
        "enabled": _bool(),
        "initialDelaySeconds": _int(0),
        "periodSeconds": _int(1),
        "timeoutSeconds": _int(1),
        "failureThreshold": _int(1),
        "successThreshold": _int(1, 1, "must be 1 for liveness and startup probes"),
    }),
    "probes": _obj({"liveness": _ref("probe"), "readiness": _ref("probe"), "startup": _ref("probe")}),
    "customProbe": _free_map("a full Kubernetes probe; replaces the chart's when not empty"),
    "pdb": _obj({"enabled": _bool(), "maxUnavailable": {"type": ["integer", "string"], "minimum": 0,
                                                          "pattern": "^[0-9]+%$"}}),
    "serviceAccount": _obj({"annotations": {"type": "object", "additionalProperties": {"type": "string"}}}),
    "envVar": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "not": {"pattern": "^ADACCEL_"},
                     "description": "ADACCEL_* variables go in <component>.settings"},
            "value": {"type": "string"},
            "valueFrom": {"type": "object"},
        },
    },
    "persistence": _obj({
        "size": _str(pattern="^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P)?$"),
        "storageClassName": _str(),
        "accessModes": {"type": "array", "minItems": 1, "items": {
            "type": "string",
            "enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"]}},
    }),
    "duration": _str("a Prometheus duration", pattern="^([0-9]+(ms|s|m|h|d|w|y))+$"),
    "stringMap": {"type": "object", "additionalProperties": {"type": "string"}},
    "topologySpreadConstraint": {
        "type": "object",
        "description": "a Kubernetes TopologySpreadConstraint; labelSelector defaults to the component's selector labels",
        "required": ["maxSkew", "topologyKey", "whenUnsatisfiable"],
        "properties": {
            "maxSkew": _int(1),
            "topologyKey": _str(minLength=1),
            "whenUnsatisfiable": _str(enum=["DoNotSchedule", "ScheduleAnyway"]),
            "labelSelector": {"type": "object"},
            "matchLabelKeys": {"type": "array", "items": {"type": "string"}},
            "minDomains": _int(1),
            "nodeAffinityPolicy": _str(enum=["Honor", "Ignore"]),
            "nodeTaintsPolicy": _str(enum=["Honor", "Ignore"]),
        },
        "additionalProperties": False,
    },
    "networkPolicyPeer": {
        "type": "object",
        "description": "a Kubernetes NetworkPolicyPeer",
        "minProperties": 1,
        "propertyNames": {"enum": ["podSelector", "namespaceSelector", "ipBlock"]},
    },
    "monitor": _obj({
        "enabled": _bool(),
        "labels": _ref("stringMap"),
        "interval": _ref("duration"),
        "scrapeTimeout": _ref("duration"),
    }),
    "alert": {
        **_obj({
            "thresholdSeconds": {"type": "number", "exclusiveMinimum": 0},
            "threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "for": _ref("duration"),
            "severity": _str(minLength=1),
        }, required=["for", "severity"]),
        "oneOf": [{"required": ["thresholdSeconds"]}, {"required": ["threshold"]}],
    },
    "seccompProfile": {
        "type": "object",
        "additionalProperties": False,
        "required": ["type"],
        "properties": {"type": {"type": "string", "enum": ["RuntimeDefault", "Localhost", "Unconfined"]},
                       "localhostProfile": {"type": "string"}},
    },
}

# Pydantic JSON-schema keywords kept in the settings objects.
_KEPT = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "description")


def settings_schema(component: Component) -> Schema:
    """`<component>.settings`: the tunable fields of its settings class, none required."""
    properties = component.settings_cls.model_json_schema()["properties"]
    out: dict[str, Schema] = {}
    for field in component.tunable:
        prop = properties[field]
        if "anyOf" in prop:  # Optional[X]: env vars cannot carry null, keep X
            branches = [b for b in prop["anyOf"] if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"{component.name}.{field}: cannot map {prop} to one env var type")
            prop = {**prop, **branches[0]}
        if prop.get("type") not in ("string", "integer", "number", "boolean"):
            raise ValueError(f"{component.name}.{field}: type {prop.get('type')!r} has no env var form; "
                             "make it chart-owned in k8s/settings_catalog.py")
        out[field] = {k: prop[k] for k in _KEPT if k in prop}
    return {
        "type": "object",
        "description": f"{component.settings_cls.__name__} fields -> ADACCEL_<FIELD> (see k8s/SETTINGS.md)",
        "additionalProperties": False,
        "properties": out,
    }


def _component(component: Component) -> Schema:
    props: dict[str, Schema] = {
        "replicas": _int(0 if component.stateful else 1),
        "settings": settings_schema(component),
        "resources": _ref("resources"),
        "pdb": _ref("pdb"),
        "probes": _ref("probes"),
        "customLivenessProbe": _ref("customProbe"),
        "customReadinessProbe": _ref("customProbe"),
        "customStartupProbe": _ref("customProbe"),
        "terminationGracePeriodSeconds": _int(1, description="must exceed settings.grace_s"),
        "extraEnv": {"type": "array", "items": _ref("envVar")},
        "podAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "items": {"type": "object"}},
        "affinity": _free_map("Kubernetes affinity"),
        "topologySpreadConstraints": {"type": "array", "items": _ref("topologySpreadConstraint")},
        "serviceAccount": _ref("serviceAccount"),
    }
    if component.stateful:
        props["podManagementPolicy"] = _str(enum=["OrderedReady", "Parallel"])
    if component.name == "router":
        props["autoscaling"] = _obj({
            "enabled": _bool(),
            "minReplicas": _int(1),
            "maxReplicas": _int(1),
            "targetCPUUtilizationPercentage": _int(1, 100),
        })
    if component.name == "decoder":
        props["gpu"] = _obj({
            "count": _int(0, description="GPUs per decoder pod; 0 runs on CPU"),
            "resourceName": _str(pattern="^[a-z0-9.-]+/[a-z0-9.-]+$"),
        })
        props["dataVolume"] = _obj({
            "persistent": _bool("/data on a PVC per pod (volumeClaimTemplate) instead of an emptyDir"),
            **DEFS["persistence"]["properties"],
        })
    if component.name in ("kvstore", "pool"):
        props["persistence"] = _ref("persistence")
    if component.name == "pool":
        props["modelTokenizer"] = _bool()
    return _obj(props, description=f"the {component.name} service")


def build_schema() -> Schema:
    properties: dict[str, Schema] = {
        "nameOverride": _str(pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=30),
        "fullnameOverride": _str(pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=40),
        "clusterDomain": _str(minLength=1),
        "image": _obj({
            "repository": _str(minLength=1),
            "tag": _str(),
            "pullPolicy": _str(enum=["Always", "IfNotPresent", "Never"]),
        }),
        "imagePullSecrets": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "grpcPort": _int(1024, 65535, "non-root containers cannot bind below 1024"),
        "listenHost": _str(minLength=1, **{"not": {"enum": ["127.0.0.1", "localhost", "::1"]}}),
        "kafka": _obj({
            "bootstrapServers": _str("host:port[,host:port]; empty turns Kafka off",
                                     pattern="^([^,:\\s]+:[0-9]+(,[^,:\\s]+:[0-9]+)*)?$"),
            "topics": _obj({"generated": _str(minLength=1), "inventory": _str(minLength=1),
                            "deadLetter": _str(minLength=1)}),
        }),
        "telemetry": _obj({
            "otlpEndpoint": _str("OTLP gRPC collector, e.g. http://otel-collector.observability:4317"),
            "exporter": _str(enum=["none", "console"]),
            "metricsPort": {**_int(0, 65535, "Prometheus scrape port, 0 = off (non-root containers cannot "
                                              "bind below 1024)"),
                            "anyOf": [{"const": 0}, {"minimum": 1024}]},
        }),
        "model": _obj({
            "mountPath": _str(pattern="^/"),
            "subPath": _str(pattern="^[^/].*$|^$"),
            "volume": _obj({
                "type": _str(enum=["pvc", "hostPath", "emptyDir"]),
                "claimName": _str(),
                "hostPath": _str(pattern="^(/.*)?$"),
                "sizeLimit": _str(),
            }),
            "build": _obj({"enabled": _bool(), "args": {"type": "array", "items": {"type": "string"}}}),
        }),
        "podSecurityContext": _obj({
            "runAsNonRoot": _bool(),
            "runAsUser": _int(1),
            "runAsGroup": _int(1),
            "fsGroup": _int(1),
            "fsGroupChangePolicy": _str(enum=["Always", "OnRootMismatch"]),
            "seccompProfile": _ref("seccompProfile"),
        }, required=["runAsNonRoot"]),
        "containerSecurityContext": _obj({
            "runAsNonRoot": _bool(),
            "allowPrivilegeEscalation": _bool(),
            "readOnlyRootFilesystem": _bool(),
            "privileged": _bool(),
            "capabilities": _obj({"drop": {"type": "array", "items": {"type": "string"}},
                                  "add": {"type": "array", "items": {"type": "string"}}}, required=["drop"]),
            "seccompProfile": _ref("seccompProfile"),
        }, required=["runAsNonRoot", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"]),
        "tmpSizeLimit": _str(),
        "secretFiles": _obj({
            "secretName": _str("Secret mounted into every pod (TLS files, tokens); empty = none",
                               pattern="^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"),
            "mountPath": _str(pattern="^/"),
        }),
        "metrics": _obj({
            "serviceMonitor": _ref("monitor"),
            "podMonitor": _ref("monitor"),
            "prometheusRule": _obj({
                "enabled": _bool(),
                "labels": _ref("stringMap"),
                "seriesSelector": _str("PromQL label matchers, e.g. namespace=\"ads\",cluster=\"eu\"",
                                       pattern="^[^{}]*$"),
                "rateWindow": _ref("duration"),
                "ttftP99": _ref("alert"),
                "errorRatio": _ref("alert"),
                "kafkaIngestLag": _ref("alert"),
            }),
        }),
        "grafana": _obj({
            "dashboard": _obj({
                "enabled": _bool(),
                "namespace": _str(pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=63),
                "labels": _ref("stringMap"),
                "annotations": _ref("stringMap"),
            }),
        }),
        "networkPolicy": _obj({
            "enabled": _bool(),
            "router": _obj({"ingressFrom": {"type": "array", "items": _ref("networkPolicyPeer")}}),
            "metrics": _obj({"namespaceSelector": _free_map("a LabelSelector of namespaces"),
                             "podSelector": _free_map("a LabelSelector of pods")}),
            "dns": _obj({"to": {"type": "array", "items": _ref("networkPolicyPeer")}}),
            "kafka": _obj({"to": {"type": "array", "items": _ref("networkPolicyPeer")},
                           "ports": {"type": "array", "items": _int(1, 65535)}}),
            "otlp": _obj({"to": {"type": "array", "items": _ref("networkPolicyPeer")}}),
            "extraEgress": {"type": "array", "items": _free_map("a Kubernetes NetworkPolicyEgressRule")},
        }),
        "tests": _obj({
            "enabled": _bool(),
            "timeoutSeconds": _int(1),
            "resources": _ref("resources"),
            "tls": _obj({
                "caFile": _str(pattern="^(/.*)?$"),
                "clientCertFile": _str(pattern="^(/.*)?$"),
                "clientKeyFile": _str(pattern="^(/.*)?$"),
                "serverName": _str(),
            }),
        }),
    }
    for component in COMPONENTS:
        properties[component.name] = _component(component)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "adaccel chart values",
        "description": "Generated by `python -m k8s.values_schema`; do not edit by hand.",
        **_obj(properties),
        "$defs": DEFS,
    }


def render_schema() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render_schema()
    if "--check" in argv:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run `python -m k8s.values_schema`", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
