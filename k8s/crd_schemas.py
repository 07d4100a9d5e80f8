"""JSON schemas for the custom resources the chart renders (Prometheus Operator, monitoring.coreos.com/v1).

kubernetes-validate knows only the built-in kinds, so `k8s.check` validates these with the schemas
below: the subset of each CRD's fields the chart uses or an operator is likely to add, typed as
the CRD types them, and closed (`additionalProperties: false`), so a misspelt or misplaced field
fails offline as it would fail the API server's structural schema. A field the templates start
to render and that is missing here fails too: add it (with the CRD's type), do not open the
object. Their metadata is checked by kubernetes-validate as that of a built-in object.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

API_VERSION = "monitoring.coreos.com/v1"

_DURATION: Schema = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                  "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$", "minLength": 1}
_STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_STRINGS: Schema = {"type": "array", "items": {"type": "string"}}


def _closed(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": required or []}


_LABEL_SELECTOR = _closed({
    "matchLabels": _STRING_MAP,
    "matchExpressions": {"type": "array", "items": _closed({
        "key": {"type": "string", "minLength": 1},
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": _STRINGS,
    }, ["key", "operator"])},
})
_NAMESPACE_SELECTOR = _closed({"any": {"type": "boolean"}, "matchNames": _STRINGS})
_RELABELINGS: Schema = {"type": "array", "items": {"type": "object"}}
_ENDPOINT_COMMON: dict[str, Schema] = {
    "port": {"type": "string", "minLength": 1},
    "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "params": {"type": "object"},
    "relabelings": _RELABELINGS,
    "metricRelabelings": _RELABELINGS,
    "tlsConfig": {"type": "object"},
    "authorization": {"type": "object"},
    "followRedirects": {"type": "boolean"},
    "enableHttp2": {"type": "boolean"},
}
_MONITOR_COMMON: dict[str, Schema] = {
    "selector": _LABEL_SELECTOR,
    "namespaceSelector": _NAMESPACE_SELECTOR,
    "podTargetLabels": _STRINGS,
    "jobLabel": {"type": "string"},
    "sampleLimit": {"type": "integer", "minimum": 0},
}

_RULE = {
    **_closed({
        "alert": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"type": "string", "minLength": 1},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    }, ["expr"]),
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}


def _kind(kind: str, spec: Schema) -> Schema:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{API_VERSION} {kind}",
        **_closed({
            "apiVersion": {"const": API_VERSION},
            "kind": {"const": kind},
            "metadata": {"type": "object"},  # checked by kubernetes-validate (k8s.check)
            "spec": spec,
        }, ["apiVersion", "kind", "metadata", "spec"]),
    }


SCHEMAS: dict[tuple[str, str], Schema] = {
    (API_VERSION, "ServiceMonitor"): _kind("ServiceMonitor", _closed({
        **_MONITOR_COMMON,
        "targetLabels": _STRINGS,
        "endpoints": {"type": "array", "minItems": 1, "items": _closed({
            **_ENDPOINT_COMMON, "targetPort": {"type": ["integer", "string"]},
            "bearerTokenSecret": {"type": "object"}})},
    }, ["selector", "endpoints"])),
    (API_VERSION, "PodMonitor"): _kind("PodMonitor", _closed({
        **_MONITOR_COMMON,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _closed(_ENDPOINT_COMMON)},
    }, ["selector", "podMetricsEndpoints"])),
    (API_VERSION, "PrometheusRule"): _kind("PrometheusRule", _closed({
        "groups": {"type": "array", "minItems": 1, "items": _closed({
            "name": {"type": "string", "minLength": 1},
            "interval": _DURATION,
            "limit": {"type": "integer", "minimum": 0},
            "rules": {"type": "array", "minItems": 1, "items": _RULE},
        }, ["name", "rules"])},
    }, ["groups"])),
}
