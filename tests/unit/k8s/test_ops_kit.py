"""The chart's operations kit, rendered offline: Prometheus Operator monitors and alerts, the
Grafana dashboard, NetworkPolicies, topology spread, custom (TLS-capable) probes, the decoder's
data PVC and the `helm test` Pod.

Every toggle is on in k8s/values/prod-gpu.yaml or k8s/values/tls-hardened.yaml (or in a render
here), and off in the chart defaults. The metrics the dashboard and the alerts query are held to
the instruments in the services' code (k8s/metric_names.py), and the naming rules to the
OpenTelemetry Prometheus exporter itself. The probe and `helm test` scripts are run against a
local gRPC health server, plaintext and with mutual TLS.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

from k8s import check, metric_names
from k8s.settings_catalog import BY_NAME, COMPONENTS

KUBE_VERSION = check.KUBE_VERSION
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
OPT_IN_KINDS = CRD_KINDS | {"NetworkPolicy"}
DASHBOARD_FILE = check.CHART_DIR / "dashboards" / "adaccel.json"
TLS_CASE = "tls-hardened.yaml"
PROD_CASE = "prod-gpu.yaml"


# ---- fixtures and helpers ---------------------------------------------------------------------

# chart, values_by_case, rendered: tests/unit/k8s/conftest.py


def _component(obj) -> str:
    return obj["metadata"]["labels"][check.COMPONENT_LABEL]


def _kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects, kind: str, component: str | None = None) -> dict[str, Any]:
    [found] = [o for o in _kind(objects, kind) if component is None or _component(o) == component]
    return found


def _workload(objects, component: str) -> dict[str, Any]:
    return next(w for w in check.workloads(objects) if _component(w) == component)


def _main_container(workload) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def _pod_labels(workload) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector against a label set ({} and None select everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {"In": present and value in expr.get("values", []),
              "NotIn": not present or value not in expr.get("values", []),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def _render(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    objects = check.render_objects(chart, values)
    chart.validate_schema(values)
    assert check.validate_objects(objects, KUBE_VERSION) == []
    return objects


# ---- defaults stay as they were ---------------------------------------------------------------

def test_defaults_render_no_opt_in_object_and_no_behaviour_change(rendered):
    objects = rendered["chart defaults"]
    assert not [o for o in objects if o["kind"] in OPT_IN_KINDS]
    assert not [o for o in objects if check.DASHBOARD_LABEL in o["metadata"]["labels"]]
    for service in _kind(objects, "Service"):
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
    decoder = _workload(objects, "decoder")
    assert "volumeClaimTemplates" not in decoder["spec"]
    assert "persistentVolumeClaimRetentionPolicy" not in decoder["spec"]
    assert {"name": "data", "emptyDir": {}} in decoder["spec"]["template"]["spec"]["volumes"]
    for workload in check.workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        assert "topologySpreadConstraints" not in pod
        assert "grpc" in _main_container(workload).get("startupProbe", {"grpc": {}})


@pytest.mark.parametrize("case", [PROD_CASE, TLS_CASE])
def test_custom_resources_are_validated_by_the_check(rendered, case):
    objects = rendered[case]
    kinds = {o["kind"] for o in objects}
    assert "PrometheusRule" in kinds and kinds & {"ServiceMonitor", "PodMonitor"}
    assert check.validate_objects(objects, KUBE_VERSION) == []
    assert check.check_metrics(objects) == []


def test_custom_resource_schemas_catch_misplaced_fields(rendered):
    monitor = json.loads(json.dumps(_one(rendered[PROD_CASE], "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    monitor["metadata"]["labels"]["team"] = 7  # metadata: checked as a built-in object's
    failures = check.validate_objects([monitor], KUBE_VERSION)
    assert any("intervall" in f for f in failures)
    assert any("30 seconds" in f for f in failures)
    assert any("metadata/labels/team" in f for f in failures), failures
    rule = json.loads(json.dumps(_one(rendered[PROD_CASE], "PrometheusRule")))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    assert check.validate_objects([rule], KUBE_VERSION)


# ---- ServiceMonitor / PodMonitor --------------------------------------------------------------

def test_service_monitor_scrapes_every_component_once_through_its_service(rendered, values_by_case):
    objects = rendered[PROD_CASE]
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [check.NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert "app.kubernetes.io/component" in monitor["spec"]["podTargetLabels"]
    port = _main_container(_workload(objects, "router"))["ports"][1]
    assert port["name"] == "metrics"
    scraped = []
    for service in _kind(objects, "Service"):
        named = {p["name"]: p for p in service["spec"]["ports"]}
        if not _selects(monitor["spec"]["selector"], service["metadata"]["labels"]) or "metrics" not in named:
            continue
        assert named["metrics"]["port"] == port["containerPort"]
        assert named["metrics"]["targetPort"] == "metrics"
        assert service["spec"].get("clusterIP") != "None"  # headless Services carry no metrics port
        scraped.append(_component(service))
    assert sorted(scraped) == sorted(c.name for c in COMPONENTS)


def test_pod_monitor_selects_every_workload_pod_and_its_metrics_port(rendered):
    objects = rendered[TLS_CASE]
    monitor = _one(objects, "PodMonitor")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    for workload in check.workloads(objects):
        assert _selects(monitor["spec"]["selector"], _pod_labels(workload)), workload["metadata"]["name"]
        assert "metrics" in {p["name"] for p in _main_container(workload)["ports"]}
    test_pod = _one(objects, "Pod")
    assert not _selects(monitor["spec"]["selector"], test_pod["metadata"]["labels"])
    assert not _kind(objects, "ServiceMonitor")
    for service in _kind(objects, "Service"):  # a PodMonitor changes no Service
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]


@pytest.mark.parametrize("values, message", [
    ({"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}, "enable one"),
    ({"metrics": {"podMonitor": {"enabled": True}}, "telemetry": {"metricsPort": 0}}, "metricsPort"),
])
def test_monitors_refuse_inconsistent_values(chart, values, message):
    with pytest.raises(helm.HelmError, match=message):
        check.render_objects(chart, values)


# ---- PrometheusRule ---------------------------------------------------------------------------

def _alerts(objects) -> dict[str, dict[str, Any]]:
    rule = _one(objects, "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_alerts_carry_the_thresholds_of_the_values(rendered, values_by_case):
    objects = rendered[PROD_CASE]
    rule_values = values_by_case[PROD_CASE]["metrics"]["prometheusRule"]
    alerts = _alerts(objects)
    assert set(alerts) == {"AdaccelTTFTHigh", "AdaccelRPCErrors", "AdaccelPoolIngestLagHigh",
                           "AdaccelPoolIngestStalled"}  # prod-gpu sets Kafka
    for name, key, metric in [("AdaccelTTFTHigh", "ttftP99", "adaccel_decoder_ttft_seconds_bucket"),
                              ("AdaccelRPCErrors", "errorRatio", "rpc_server_call_duration_seconds_count"),
                              ("AdaccelPoolIngestLagHigh", "kafkaIngestLag", "adaccel_pool_ingest_lag_seconds_bucket")]:
        alert, expected = alerts[name], rule_values[key]
        threshold = expected.get("thresholdSeconds", expected.get("threshold"))
        assert alert["expr"].rstrip().endswith(f"> {threshold}"), alert["expr"]
        assert alert["for"] == expected["for"] and alert["labels"]["severity"] == expected["severity"]
        assert metric in metric_names.queried_metrics(alert["expr"])
        assert f'namespace="{check.NAMESPACE}"' in alert["expr"]
    assert "histogram_quantile(0.99," in alerts["AdaccelTTFTHigh"]["expr"]
    errors = alerts["AdaccelRPCErrors"]["expr"]
    assert 'rpc_response_status_code!="OK"' in errors and "grpc.health.v1.Health" in errors
    assert 'messaging_destination_name="adaccel.generated"' in alerts["AdaccelPoolIngestStalled"]["expr"]
    # Prometheus template syntax survives Helm's.
    assert "{{ $labels.namespace }}" in alerts["AdaccelTTFTHigh"]["annotations"]["description"]


def test_alerts_without_kafka_and_with_a_custom_selector(chart):
    objects = _render(chart, {"metrics": {"prometheusRule": {
        "enabled": True, "seriesSelector": 'cluster="eu-1",namespace="ads"', "rateWindow": "2m",
        "errorRatio": {"threshold": 0.1, "for": "1m", "severity": "page"}}}})
    alerts = _alerts(objects)
    assert "AdaccelPoolIngestStalled" not in alerts  # no Kafka: the pool cannot ingest anyway
    for alert in alerts.values():
        assert '{cluster="eu-1",namespace="ads"' in alert["expr"] and "[2m]" in alert["expr"]
    assert alerts["AdaccelRPCErrors"]["expr"].rstrip().endswith("> 0.1")
    assert check.check_metrics(objects) == []


# ---- metric names: the dashboard and alerts against the code ----------------------------------

def test_instruments_are_read_from_every_metrics_module():
    instruments = metric_names.instruments()
    by_name = {i.name: i for i in instruments}
    assert len(by_name) == len(instruments)  # one instrument per name
    assert {i.source for i in instruments} == set(metric_names.METRICS_MODULES)
    assert by_name["adaccel.decoder.ttft"].series == (
        "adaccel_decoder_ttft_seconds_bucket", "adaccel_decoder_ttft_seconds_sum", "adaccel_decoder_ttft_seconds_count")
    assert by_name["adaccel.router.streams_refused"].series == ("adaccel_router_streams_refused_total",)
    assert by_name["adaccel.router.replica_queue_depth"].series == ("adaccel_router_replica_queue_depth",)
    assert by_name["adaccel.decoder.acceptance_rate"].family == "adaccel_decoder_acceptance_rate"  # unit "1"
    assert by_name["rpc.server.call.duration"].family == "rpc_server_call_duration_seconds"


def test_naming_rules_match_the_opentelemetry_prometheus_exporter():
    """Creates every instrument through the services' own modules, records one value each, and
    compares what a scrape shows with the names k8s/metric_names.py derives from the source."""
    pytest.importorskip("adaccel.v1.common_pb2", reason="generated code missing: run `make protos`")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.metrics import Counter, Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from common.rpc.rpc_metrics import RpcMetricsInterceptor
    from services.decoder.metrics import DecoderMetrics
    from services.pool.metrics import PoolMetrics
    from services.router.metrics import observe_router

    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        meter = provider.get_meter("k8s-metric-names")
        decoder = DecoderMetrics.create(meter)
        decoder.observe_load(queue_depth=lambda: 1, tokens_in_flight=lambda: 2, batch_size=lambda: 1)
        cache = _FakeBlockCache()
        decoder.observe_block_cache(cache)
        pool = PoolMetrics.create(meter)
        rpc = RpcMetricsInterceptor(meter)
        observe_router(meter, _FakeStreams(), _FakeReplicas())
        for holder in (decoder, pool):
            for f in dataclasses.fields(holder):
                instrument = getattr(holder, f.name)
                if isinstance(instrument, Counter):
                    instrument.add(1)
                elif isinstance(instrument, Histogram):
                    instrument.record(0.5)
        rpc.duration.record(0.01, {"rpc.method": "adaccel.v1.Pool/GetVersions", "rpc.response.status_code": "OK"})
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    scraped = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    scraped = {s for s in scraped if s != "target_info" and not s.endswith("_created")}
    assert scraped == set(metric_names.exported_series())


class _FakeBlockCache:
    counters = type("Counters", (), {"local_hits": 1, "store_hits": 2, "misses": 3, "rejected": 0, "prefix_hits": 4})()
    publisher = type("Publisher", (), {"published": 1, "dropped": 0})()
    store = type("Store", (), {"errors": 0})()
    mode = "full"


class _FakeStreams:
    in_use, limit, refused = 1, 8, 0


class _FakeReplicas:
    def views(self):
        return [type("View", (), {"queue_depth": 1, "address": "decoder-0:50051", "healthy": True})()]


def test_dashboard_and_alerts_query_only_exported_metrics(rendered):
    known = metric_names.exported_series()
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    queries = list(metric_names.dashboard_queries(dashboard))
    assert len(queries) >= 20
    assert metric_names.unknown_metrics(queries, known) == []
    rule_queries = list(metric_names.rule_queries(_one(rendered[PROD_CASE], "PrometheusRule")))
    assert metric_names.unknown_metrics(rule_queries, known) == []


def test_a_renamed_metric_fails_the_check(rendered):
    known = set(metric_names.exported_series()) - {"adaccel_decoder_ttft_seconds_bucket"}
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    failures = metric_names.unknown_metrics(metric_names.dashboard_queries(dashboard), known)
    assert failures and all("adaccel_decoder_ttft_seconds_bucket" in f for f in failures)
    rule = _one(rendered[PROD_CASE], "PrometheusRule")
    assert any("adaccel_decoder_ttft_seconds_bucket" in f
               for f in metric_names.unknown_metrics(metric_names.rule_queries(rule), known))
    # A typo in a query is caught, not mistaken for a label or a function.
    assert metric_names.unknown_metrics([("q", 'sum(rate(adaccel_decoder_tft_seconds_count{mode="strict"}[5m]))')],
                                        metric_names.exported_series())


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{namespace="x",b!~"c.d/.*"}[5m]))) > 0.5',
     {"a_bucket"}),
    ("sum by (mode) (rate(a_total[$__rate_interval]))\n  /\nsum without (pod) (rate(b_total[1m])) offset 5m",
     {"a_total", "b_total"}),
    ("x > 0 unless on (namespace) y", {"x", "y"}),
    ('label_values(rpc_server_call_duration_seconds_count{namespace=~"$namespace"}, app_kubernetes_io_instance)',
     {"rpc_server_call_duration_seconds_count"}),
])
def test_queried_metrics_parses_promql(expr, names):
    assert metric_names.queried_metrics(expr) == names


# ---- Grafana dashboard ------------------------------------------------------------------------

def test_dashboard_config_map_carries_the_file_for_the_sidecar(rendered):
    objects = rendered[PROD_CASE]
    [cm] = [o for o in _kind(objects, "ConfigMap") if check.DASHBOARD_LABEL in o["metadata"]["labels"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["adaccel.json"]) == json.loads(DASHBOARD_FILE.read_text())


def test_dashboard_has_the_panels_operators_need():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [e for w, e in metric_names.dashboard_queries(dashboard) if w.startswith("panel")]
    text = "\n".join(exprs)

    def queried(metric: str) -> list[str]:
        return [e for e in exprs if metric in metric_names.queried_metrics(e)]

    ttft = queried("adaccel_decoder_ttft_seconds_bucket")
    assert any("histogram_quantile(0.5," in e for e in ttft) and any("histogram_quantile(0.99," in e for e in ttft)
    for metric in ("adaccel_decoder_tokens_per_step_sum",  # tokens per step
                   "adaccel_decoder_accepted_draft_tokens_total", "adaccel_decoder_draft_tokens_total",  # acceptance
                   "adaccel_decoder_pool_hit_rate_sum",  # pool hit rate
                   "adaccel_decoder_cached_prompt_tokens_total", "adaccel_decoder_kv_block_hit_rate_sum",  # block hits
                   "adaccel_router_streams_open", "adaccel_router_replica_queue_depth",  # router queue
                   "adaccel_pool_ingest_lag_seconds_bucket"):  # Kafka ingest lag
        assert queried(metric), metric
    assert 'rpc_response_status_code="RESOURCE_EXHAUSTED"' in text
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


# ---- NetworkPolicy ----------------------------------------------------------------------------

def _policies(objects) -> dict[str, dict[str, Any]]:
    return {_component(p): p for p in _kind(objects, "NetworkPolicy")}


def _allows(rules: list[dict[str, Any]], peer_key: str, labels: dict[str, str], namespace: str,
            port: int | str, protocol: str = "TCP", named_ports: dict[str, int] | None = None) -> bool:
    """Whether ingress (peer_key "from") or egress ("to") rules let traffic with a pod of `labels`
    in `namespace` through on `port` (pods of the release live in check.NAMESPACE)."""
    named_ports = named_ports or {}
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in rules:
        peers = rule.get(peer_key) or [{}]
        ports = rule.get("ports") or [{}]
        port_ok = any(p == {} or (p.get("protocol", "TCP") == protocol
                                  and (p.get("port") == port or named_ports.get(p.get("port")) == port))
                      for p in ports)
        peer_ok = False
        for peer in peers:
            if peer == {}:
                peer_ok = True
            elif "ipBlock" in peer:
                continue
            elif "namespaceSelector" in peer:
                peer_ok |= (_selects(peer["namespaceSelector"], namespace_labels)
                            and _selects(peer.get("podSelector"), labels))
            else:
                peer_ok |= namespace == check.NAMESPACE and _selects(peer["podSelector"], labels)
        if port_ok and peer_ok:
            return True
    return False


def test_network_policies_let_exactly_the_suite_calls_through(rendered, values_by_case):
    objects = rendered[TLS_CASE]
    policies = _policies(objects)
    assert set(policies) == {c.name for c in COMPONENTS}
    grpc_port = 50051
    labels = {c.name: _pod_labels(_workload(objects, c.name)) for c in COMPONENTS}
    labels["test"] = _one(objects, "Pod")["metadata"]["labels"]
    for name, policy in policies.items():
        assert policy["spec"]["podSelector"] == _workload(objects, name)["spec"]["selector"]
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    named = {"grpc": grpc_port, "metrics": 9464}
    calls = {("router", "decoder"), ("decoder", "pool"), ("decoder", "kvstore")}
    for caller in ("router", "decoder", "kvstore", "pool"):
        for callee in ("router", "decoder", "kvstore", "pool"):
            egress = _allows(policies[caller]["spec"]["egress"], "to", labels[callee], check.NAMESPACE, grpc_port)
            assert egress == ((caller, callee) in calls), (caller, callee)
            ingress = _allows(policies[callee]["spec"]["ingress"], "from", labels[caller], check.NAMESPACE,
                              grpc_port, named_ports=named)
            assert ingress, (caller, callee)  # the release's own pods may call every component
    for callee in ("router", "decoder", "kvstore", "pool"):
        ingress = policies[callee]["spec"]["ingress"]
        assert _allows(ingress, "from", labels["test"], check.NAMESPACE, grpc_port, named_ports=named)  # helm test
        stranger = {"app": "other"}
        assert not _allows(ingress, "from", stranger, check.NAMESPACE, grpc_port, named_ports=named)
        assert not _allows(ingress, "from", stranger, "elsewhere", grpc_port, named_ports=named)
        assert _allows(ingress, "from", {"app": "prometheus"}, "monitoring", 9464, named_ports=named)
        assert not _allows(ingress, "from", {"app": "prometheus"}, "elsewhere", 9464, named_ports=named)
    ranking = {"app": "ranking"}
    assert _allows(policies["router"]["spec"]["ingress"], "from", ranking, "ads-ranking", grpc_port, named_ports=named)
    assert not _allows(policies["decoder"]["spec"]["ingress"], "from", ranking, "ads-ranking", grpc_port,
                       named_ports=named)
    dns = {"k8s-app": "kube-dns"}
    for name, policy in policies.items():
        egress = policy["spec"]["egress"]
        assert _allows(egress, "to", dns, "kube-system", 53, "UDP") and _allows(egress, "to", dns, "kube-system", 53)
        assert _allows(egress, "to", {"app": "otel"}, "observability", 4317)
        assert _allows(egress, "to", {"app": "kafka"}, "kafka", 9093) == (name in ("decoder", "pool")), name
        assert not _allows(egress, "to", {"app": "kafka"}, "elsewhere", 9093)
        assert not _allows(egress, "to", {"app": "x"}, "elsewhere", 443)


def test_router_ingress_is_open_without_a_selector_and_extra_egress_is_added(chart):
    objects = _render(chart, {"networkPolicy": {"enabled": True, "extraEgress": [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]},
        "kafka": {"bootstrapServers": "k1:9092,k2:9092,k3:9094"}})
    policies = _policies(objects)
    assert _allows(policies["router"]["spec"]["ingress"], "from", {"app": "any"}, "anywhere", "grpc")
    assert not _allows(policies["pool"]["spec"]["ingress"], "from", {"app": "any"}, "anywhere", "grpc")
    for policy in policies.values():
        assert {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443, "protocol": "TCP"}]} in \
            policy["spec"]["egress"]
    kafka_rule = next(r for r in policies["pool"]["spec"]["egress"] if "to" not in r
                      and {p["port"] for p in r["ports"]} & {9092})
    assert sorted(p["port"] for p in kafka_rule["ports"]) == [9092, 9094]


# ---- topology spread, probes, decoder data volume ---------------------------------------------

def test_topology_spread_constraints_default_to_the_component_selector(rendered, values_by_case):
    objects = rendered[TLS_CASE]
    for component in COMPONENTS:
        workload = _workload(objects, component.name)
        [constraint] = workload["spec"]["template"]["spec"]["topologySpreadConstraints"]
        given = values_by_case[TLS_CASE][component.name]["topologySpreadConstraints"][0]
        assert {k: constraint[k] for k in given} == given
        if "labelSelector" not in given:
            assert constraint["labelSelector"] == {"matchLabels": workload["spec"]["selector"]["matchLabels"]}
    spread = _workload(rendered[PROD_CASE], "decoder")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"


def test_custom_startup_probe_replaces_the_grpc_one(chart, rendered, values_by_case):
    for case in (PROD_CASE, TLS_CASE):
        startup = _main_container(_workload(rendered[case], "decoder"))["startupProbe"]
        assert startup == values_by_case[case]["decoder"]["customStartupProbe"]
        assert "grpc" not in startup
    objects = _render(chart, {"router": {"customStartupProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 3}}})
    # Set, it renders even where probes.startup is off (the router's default).
    assert _main_container(_workload(objects, "router"))["startupProbe"] == {"tcpSocket": {"port": "grpc"},
                                                                            "periodSeconds": 3}


def test_decoder_data_on_a_pvc_when_persistent(rendered, values_by_case):
    objects = rendered[PROD_CASE]
    decoder = _workload(objects, "decoder")
    [claim] = decoder["spec"]["volumeClaimTemplates"]
    volume = values_by_case[PROD_CASE]["decoder"]["dataVolume"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == volume["size"]
    assert claim["spec"]["storageClassName"] == volume["storageClassName"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "data" not in {v["name"] for v in decoder["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in _main_container(decoder)["volumeMounts"]}
    assert mounts["data"] == "/data"
    assert decoder["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert not _kind(objects, "PersistentVolumeClaim")


@pytest.mark.parametrize("values", [
    {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
    {"metrics": {"podMonitor": {"enabled": "yes"}}},
    {"metrics": {"prometheusRule": {"errorRatio": {"threshold": 5}}}},
    {"metrics": {"prometheusRule": {"ttftP99": {"thresholdSeconds": 0}}}},
    {"metrics": {"prometheusRule": {"seriesSelector": "{namespace=\"ads\"}"}}},
    {"grafana": {"dashboard": {"labels": {"team": 1}}}},
    {"decoder": {"dataVolume": {"persistent": "yes"}}},
    {"decoder": {"dataVolume": {"size": "lots"}}},
    {"router": {"topologySpreadConstraints": [{"maxSkew": 1}]}},
    {"pool": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "k", "whenUnsatisfiable": "Maybe"}]}},
    {"networkPolicy": {"router": {"ingressFrom": [{"pods": {}}]}}},
    {"networkPolicy": {"kafka": {"ports": [0]}}},
    {"networkPolicy": {"enabled": True, "egress": []}},
    {"tests": {"tls": {"caFile": "ca.crt"}}},
    {"kvstore": {"customStartupProbe": "exec"}},
], ids=lambda v: json.dumps(v)[:60])
def test_schema_rejects_wrong_ops_values(chart, values):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


# ---- helm test --------------------------------------------------------------------------------

def _test_pod(objects) -> dict[str, Any]:
    return _one(objects, "Pod", "test")


def _env(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


@pytest.mark.parametrize("case", [name for name, _ in check.cases()])
def test_helm_test_pod_checks_every_pod_of_every_component(rendered, case):
    objects = rendered[case]
    pod = _test_pod(objects)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False and spec["securityContext"]["runAsNonRoot"] is True
    [container] = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert container["command"][:2] == ["python", "-c"]
    assert container["command"][2].strip() == (check.CHART_DIR / "files" / "health_check.py").read_text().strip()
    targets = json.loads(_env(container)["HEALTH_TARGETS"])
    by_component: dict[str, list[str]] = {}
    for target in targets:
        assert target["service"] == BY_NAME[target["component"]].grpc_service
        by_component.setdefault(target["component"], []).append(target["address"])
    router_settings = _parsed(objects, "router")
    decoder_settings = _parsed(objects, "decoder")
    router_service = next(s for s in _kind(objects, "Service") if _component(s) == "router")
    assert by_component["router"] == [f"{router_service['metadata']['name']}:{router_settings.port}"]
    assert by_component["decoder"] == list(router_settings.decoder_addrs)
    assert by_component["kvstore"] == list(decoder_settings.kvstore_addrs)
    pool = _workload(objects, "pool")
    assert len(by_component["pool"]) == pool["spec"]["replicas"]
    for ordinal, address in enumerate(by_component["pool"]):
        assert address.startswith(f"{pool['metadata']['name']}-{ordinal}.{pool['spec']['serviceName']}.")


def _parsed(objects, component: str):
    workload = _workload(objects, component)
    env = check.container_env(workload, _main_container(workload), check.config_maps_by_name(objects))
    return check.settings_from_env(BY_NAME[component].settings_cls, env)


def test_helm_test_pod_uses_tls_where_the_component_serves_tls(rendered):
    plain = _env(_test_pod(rendered["chart defaults"])["spec"]["containers"][0])
    assert not any(t["tls"] for t in json.loads(plain["HEALTH_TARGETS"]))
    assert not any(k.startswith("HEALTH_TLS_") for k in plain)
    pod = _test_pod(rendered[TLS_CASE])
    env = _env(pod["spec"]["containers"][0])
    assert all(t["tls"] for t in json.loads(env["HEALTH_TARGETS"]))
    decoder = _parsed(rendered[TLS_CASE], "decoder")
    assert env["HEALTH_TLS_CA_FILE"] == str(decoder.tls_ca_file)
    assert env["HEALTH_TLS_CLIENT_CERT_FILE"] == str(decoder.tls_client_cert_file)
    assert env["HEALTH_TLS_CLIENT_KEY_FILE"] == str(decoder.tls_client_key_file)
    assert env["HEALTH_TLS_SERVER_NAME"] == decoder.tls_server_name
    mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert env["HEALTH_TLS_CA_FILE"].startswith(mounts["secret-files"]["mountPath"] + "/")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["secret-files"]["secret"]["secretName"] == "adaccel-tls"


def test_helm_test_tls_files_can_be_given_explicitly(chart):
    objects = _render(chart, {"secretFiles": {"secretName": "s"},
                              "kvstore": {"settings": {"tls_cert_file": "/etc/adaccel/secrets/tls.crt",
                                                       "tls_key_file": "/etc/adaccel/secrets/tls.key"}},
                              "tests": {"tls": {"caFile": "/etc/adaccel/secrets/public-ca.crt",
                                                "serverName": "kv.internal"}}})
    env = _env(_test_pod(objects)["spec"]["containers"][0])
    tls = {t["component"]: t["tls"] for t in json.loads(env["HEALTH_TARGETS"])}
    assert tls == {"router": False, "decoder": False, "kvstore": True, "pool": False}
    assert env["HEALTH_TLS_CA_FILE"] == "/etc/adaccel/secrets/public-ca.crt"
    assert env["HEALTH_TLS_SERVER_NAME"] == "kv.internal"
    assert env["HEALTH_TLS_CLIENT_CERT_FILE"] == ""
    assert not [o for o in _render(chart, {"tests": {"enabled": False}}) if o["kind"] == "Pod"]


# ---- the scripts, run against a local gRPC health server --------------------------------------

SERVER_NAME = "adaccel-internal"  # the name tls-hardened.yaml's certificate carries


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """/etc/adaccel/secrets of tls-hardened.yaml: ca.crt, tls.crt and tls.key (server and client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("secrets")
    now = datetime.datetime.now(datetime.UTC)

    def builder(subject, issuer, public_key):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        b = b.serial_number(x509.random_serial_number())
        return b.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adaccel test CA")])
    ca = (builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]), ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (root / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "tls.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (root / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return root


class HealthServer:
    """A grpc.health.v1 server on 127.0.0.1 (mutual TLS with the pki files, or plaintext)."""

    def __init__(self, pki: Path | None, serving: dict[str, bool]):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        for name, up in serving.items():
            servicer.set(name, health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        if pki is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [((pki / "tls.key").read_bytes(), (pki / "tls.crt").read_bytes())],
                root_certificates=(pki / "ca.crt").read_bytes(), require_client_auth=True)
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop(grace=None)


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    assert command[0] == "python"
    base = {k: os.environ[k] for k in ("PATH", "SYSTEMROOT") if k in os.environ}
    return subprocess.run([sys.executable, *command[1:]], env={**base, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def _probe_env(objects, component: str, pki: Path, port: int) -> dict[str, str]:
    """The container's environment as the kubelet builds it (ConfigMap, env), with the Secret's
    mount path pointing at the test's files and the port at the test server."""
    workload = _workload(objects, component)
    env = check.container_env(workload, _main_container(workload), check.config_maps_by_name(objects))
    env = {k: v.replace("/etc/adaccel/secrets", str(pki)) for k, v in env.items()}
    return {**env, "ADACCEL_PORT": str(port)}


def test_tls_exec_probes_pass_against_a_mutual_tls_port_and_fail_when_not_serving(rendered, pki):
    objects = rendered[TLS_CASE]
    container = _main_container(_workload(objects, "decoder"))
    with HealthServer(pki, {"": True, "adaccel.v1.Decoder": False}) as server:
        env = _probe_env(objects, "decoder", pki, server.port)
        assert env["ADACCEL_TLS_CERT_FILE"] == str(pki / "tls.crt")
        startup = _run(container["startupProbe"]["exec"]["command"], env)
        assert startup.returncode == 0, startup.stderr
        ready = _run(container["readinessProbe"]["exec"]["command"], env)
        assert ready.returncode == 1, ready.stderr  # adaccel.v1.Decoder is NOT_SERVING
        without_client_cert = {k: v for k, v in env.items() if not k.startswith("ADACCEL_TLS_CLIENT_")}
        assert _run(container["startupProbe"]["exec"]["command"], without_client_cert).returncode != 0


def test_prod_startup_probe_passes_in_plaintext_too(rendered):
    objects = rendered[PROD_CASE]
    command = _main_container(_workload(objects, "decoder"))["startupProbe"]["exec"]["command"]
    with HealthServer(None, {"": True}) as server:
        env = _probe_env(objects, "decoder", Path("/nonexistent"), server.port)
        assert "ADACCEL_TLS_CERT_FILE" not in env
        result = _run(command, env)
        assert result.returncode == 0, result.stderr


def test_helm_test_script_reports_every_target(rendered, pki):
    objects = rendered[TLS_CASE]
    container = _test_pod(objects)["spec"]["containers"][0]
    env = {k: v.replace("/etc/adaccel/secrets", str(pki)) for k, v in _env(container).items()}
    with HealthServer(pki, {"adaccel.v1.Router": True, "adaccel.v1.Pool": True}) as tls, \
            HealthServer(None, {"adaccel.v1.Pool": True}) as plain:
        targets = [{"component": "router", "address": f"127.0.0.1:{tls.port}", "service": "adaccel.v1.Router", "tls": True},
                   {"component": "pool", "address": f"127.0.0.1:{plain.port}", "service": "adaccel.v1.Pool", "tls": False}]
        ok = _run(container["command"], {**env, "HEALTH_TARGETS": json.dumps(targets), "HEALTH_TIMEOUT_S": "5"})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "2/2 SERVING" in ok.stdout
        targets.append({"component": "decoder", "address": f"127.0.0.1:{tls.port}", "service": "adaccel.v1.Decoder",
                        "tls": True})
        bad = _run(container["command"], {**env, "HEALTH_TARGETS": json.dumps(targets), "HEALTH_TIMEOUT_S": "5"})
        assert bad.returncode == 1 and "2/3 SERVING" in bad.stdout and "NOT_FOUND" in bad.stdout
