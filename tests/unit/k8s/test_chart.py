"""The Helm chart, rendered offline (helm_python) and checked object by object.

Everything renders once per module; the assertions read the rendered dicts. The chart is held to
the services' pydantic settings classes: every ADACCEL_* key a pod sees must be a field of its
service's class and parse, so renaming a setting breaks these tests, not a rollout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

helm = pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

from k8s import check, settings_table, values_schema  # noqa: E402
from k8s.settings_catalog import BY_NAME, COMPONENTS, env_name  # noqa: E402

KUBE_VERSION = check.KUBE_VERSION
CASES = [name for name, _ in check.cases()]
# Settings every pod must be given by the chart (the class defaults do not work in a cluster).
REQUIRED = {
    "router": {"host", "port", "data_dir", "decoder_addrs"},
    "decoder": {"host", "port", "data_dir", "model_path", "device", "pool_addr", "kafka_bootstrap",
                "kafka_generated_topic", "decoder_id"},
    "kvstore": {"host", "port", "data_dir", "shard"},
    "pool": {"host", "port", "data_dir", "kafka_bootstrap", "kafka_generated_topic"},
}
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


# ---- fixtures: load and render once -----------------------------------------------------------

# chart, values_by_case, rendered: tests/unit/k8s/conftest.py


def _workloads(objects) -> list[dict[str, Any]]:
    return list(check.workloads(objects))


def _component(obj) -> str:
    return obj["metadata"]["labels"][check.COMPONENT_LABEL]


def _containers(workload, *, init: bool = True) -> Iterator[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    yield from pod["containers"]
    if init:
        yield from pod.get("initContainers", [])


def _main_container(workload) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def _one(objects, kind: str, component: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and _component(o) == component
               and not o["metadata"]["name"].endswith("-headless")]
    return found


def _service_config_maps(objects) -> list[dict[str, Any]]:
    """The services' ConfigMaps (ADACCEL_* settings), not the Grafana dashboard's."""
    return [o for o in objects if o["kind"] == "ConfigMap" and _component(o) in BY_NAME]


def _parsed_settings(objects, component: str, ordinal: int = 0):
    workload = next(w for w in _workloads(objects) if _component(w) == component)
    config_maps = check.config_maps_by_name(objects)
    env = check.container_env(workload, _main_container(workload), config_maps, ordinal)
    return check.settings_from_env(BY_NAME[component].settings_cls, env)


# ---- the whole pipeline that `python -m k8s.check` runs ---------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_values_pass_schema_and_strict_lint(chart, values_by_case, case):
    chart.validate_schema(values_by_case[case])
    assert check.lint_chart(values_by_case[case], KUBE_VERSION) == []


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_kubernetes_in_strict_mode(rendered, case):
    assert check.validate_objects(rendered[case], KUBE_VERSION) == []


def test_strict_validation_catches_unknown_fields(rendered):
    workload = json.loads(json.dumps(_workloads(rendered["chart defaults"])[0]))
    _main_container(workload)["livenessProbe"]["grpc"]["servce"] = "typo"
    [failure] = check.validate_objects([workload], KUBE_VERSION)
    assert "servce" in failure


@pytest.mark.parametrize("case", CASES)
def test_each_component_renders_one_workload(rendered, case):
    kinds = {_component(w): w["kind"] for w in _workloads(rendered[case])}
    assert kinds == {"router": "Deployment", "decoder": "StatefulSet", "kvstore": "StatefulSet",
                     "pool": "StatefulSet"}


# ---- settings: the ConfigMaps against the pydantic classes ------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_configmap_keys_are_fields_of_the_service_settings(rendered, case):
    for cm in _service_config_maps(rendered[case]):
        component = BY_NAME[_component(cm)]
        for key in cm["data"]:
            assert key.startswith("ADACCEL_"), key
            assert key.removeprefix("ADACCEL_").lower() in component.fields, (
                f"{cm['metadata']['name']}: {key} is not a field of {component.settings_cls.__name__}")


@pytest.mark.parametrize("case", CASES)
def test_required_settings_reach_every_pod(rendered, case):
    objects = rendered[case]
    config_maps = check.config_maps_by_name(objects)
    for workload in _workloads(objects):
        component = BY_NAME[_component(workload)]
        env = check.container_env(workload, _main_container(workload), config_maps)
        missing = {f for f in REQUIRED[component.name] if env_name(f) not in env}
        assert not missing, f"{component.name}: {sorted(missing)} not set"
        # Per-pod settings come from container env, never from the shared ConfigMap.
        cm_keys = set(config_maps[workload["metadata"]["name"]]["data"])
        assert not {env_name(f) for f in component.pod_env} & cm_keys


@pytest.mark.parametrize("case", CASES)
def test_pod_env_parses_into_the_settings_classes(rendered, case):
    assert check.check_settings(rendered[case]) == []


def test_unknown_adaccel_env_is_reported(rendered):
    objects = json.loads(json.dumps(rendered["chart defaults"]))
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and _component(o) == "router")
    cm["data"]["ADACCEL_HEARTBEAT_SECONDS"] = "1"
    [failure] = check.check_settings(objects)
    assert "ADACCEL_HEARTBEAT_SECONDS" in failure


@pytest.mark.parametrize("case", CASES)
def test_ports_host_and_services_agree(rendered, values_by_case, case):
    objects = rendered[case]
    port = values_by_case[case].get("grpcPort", 50051)
    for workload in _workloads(objects):
        name = _component(workload)
        settings = _parsed_settings(objects, name)
        assert settings.port == port
        assert settings.host not in ("127.0.0.1", "localhost", "::1")
        container_ports = {p["name"]: p for p in _main_container(workload)["ports"]}
        assert container_ports["grpc"] == {"name": "grpc", "containerPort": port, "protocol": "TCP"}
        service = _one(objects, "Service", name)
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["ports"][0]["name"] == "grpc"
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
        assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("case", CASES)
def test_router_gets_one_stable_address_per_decoder_pod(rendered, case):
    objects = rendered[case]
    decoders = _one(objects, "StatefulSet", "decoder")
    headless = next(o for o in objects
                    if o["kind"] == "Service" and o["metadata"]["name"] == decoders["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    addrs = _parsed_settings(objects, "router").decoder_addrs
    assert len(addrs) == decoders["spec"]["replicas"]
    for ordinal, addr in enumerate(addrs):
        host, port = addr.rsplit(":", 1)
        assert host.startswith(f"{decoders['metadata']['name']}-{ordinal}.{headless['metadata']['name']}.")
        assert int(port) == headless["spec"]["ports"][0]["port"]
    pool_addr = _parsed_settings(objects, "decoder").pool_addr
    assert pool_addr.split(":")[0] == _one(objects, "Service", "pool")["metadata"]["name"]


@pytest.mark.parametrize("ordinal", [0, 1, 31])
def test_kvstore_shard_is_the_statefulset_ordinal(rendered, ordinal):
    objects = rendered["many-shards.yaml"]
    settings = _parsed_settings(objects, "kvstore", ordinal)
    assert settings.shard == ordinal
    assert settings.data_dir.as_posix() == "/data"


def test_large_integers_render_as_integers(rendered):
    kvstore = next(o for o in rendered["prod-gpu.yaml"]
                   if o["kind"] == "ConfigMap" and _component(o) == "kvstore")
    assert kvstore["data"]["ADACCEL_MEMORY_BUDGET_BYTES"] == "8589934592"


def test_otlp_endpoint_switches_every_service_to_otlp(rendered):
    for cm in _service_config_maps(rendered["prod-gpu.yaml"]):
        assert cm["data"]["ADACCEL_TELEMETRY_EXPORTER"] == "otlp"
        assert cm["data"]["ADACCEL_OTLP_ENDPOINT"].endswith(":4317")
    for cm in _service_config_maps(rendered["dev-cpu.yaml"]):
        assert "ADACCEL_OTLP_ENDPOINT" not in cm["data"]


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_scraped_on_its_metrics_port(rendered, case):
    for workload in _workloads(rendered[case]):
        settings = _parsed_settings(rendered[case], _component(workload))
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        metrics = [p for p in _main_container(workload)["ports"] if p["name"] == "metrics"]
        assert settings.metrics_port > 0 and settings.metrics_port != settings.port
        assert metrics == [{"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"}]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(settings.metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"


def test_metrics_port_zero_turns_scraping_off_and_pod_annotations_win(chart):
    objects = check.render_objects(chart, {"telemetry": {"metricsPort": 0},
                                           "router": {"podAnnotations": {"team": "ads"}}})
    for workload in _workloads(objects):
        assert _parsed_settings(objects, _component(workload)).metrics_port == 0
        assert [p["name"] for p in _main_container(workload)["ports"]] == ["grpc"]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert not any(key.startswith("prometheus.io/") for key in annotations)
    objects = check.render_objects(chart, {"decoder": {"podAnnotations": {"prometheus.io/path": "/other"}}})
    decoder = _one(objects, "StatefulSet", "decoder")["spec"]["template"]["metadata"]["annotations"]
    assert decoder["prometheus.io/path"] == "/other" and decoder["prometheus.io/scrape"] == "true"


def test_metrics_port_must_differ_from_the_grpc_port(chart):
    with pytest.raises(helm.HelmError, match="metricsPort"):
        check.render_objects(chart, {"telemetry": {"metricsPort": 50051}})


# ---- probes -----------------------------------------------------------------------------------

def test_grpc_service_names_match_the_protos():
    pytest.importorskip("adaccel.v1.router_pb2", reason="generated code missing: run `make protos`")
    from adaccel.v1 import decoder_pb2, kvstore_pb2, pool_pb2, router_pb2

    generated = {
        "router": router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        "decoder": decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name,
        "kvstore": kvstore_pb2.DESCRIPTOR.services_by_name["KvStore"].full_name,
        "pool": pool_pb2.DESCRIPTOR.services_by_name["Pool"].full_name,
    }
    assert {c.name: c.grpc_service for c in COMPONENTS} == generated


def _health_probe_target(probe: dict[str, Any], port: int) -> str:
    """The grpc.health.v1 service a probe asks for: the kubelet's gRPC probe on the container's
    port, or (custom<Probe> values, TLS-capable) an exec probe running a grpc_health script with
    the service as its first argument; anything else fails."""
    if "grpc" in probe:
        assert probe["grpc"]["port"] == port
        return probe["grpc"]["service"]
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "-c"] and "grpc_health.v1" in command[2], command[:2]
    assert "ADACCEL_PORT" in command[2] and "ADACCEL_TLS_CERT_FILE" in command[2]
    return command[3] if len(command) > 3 else ""


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_grpc_health_probes(rendered, case):
    for workload in _workloads(rendered[case]):
        component = BY_NAME[_component(workload)]
        for container in _containers(workload, init=False):
            port = container["ports"][0]["containerPort"]
            assert _health_probe_target(container["livenessProbe"], port) == ""
            assert _health_probe_target(container["readinessProbe"], port) == component.grpc_service
            if "startupProbe" in container:
                assert _health_probe_target(container["startupProbe"], port) == ""


@pytest.mark.parametrize("case", CASES)
def test_decoder_startup_probe_covers_model_load(rendered, case):
    startup = _main_container(_one(rendered[case], "StatefulSet", "decoder"))["startupProbe"]
    budget_s = startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= 300


@pytest.mark.parametrize("case", CASES)
def test_stop_grace_is_shorter_than_termination_grace(rendered, case):
    for workload in _workloads(rendered[case]):
        settings = _parsed_settings(rendered[case], _component(workload))
        assert settings.grace_s < workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


# ---- GPUs, volumes, router scaling ------------------------------------------------------------

def _gpu_requests(workload) -> list[Any]:
    resources = _main_container(workload)["resources"]
    return [resources.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")]


def test_prod_decoders_request_gpus(rendered):
    objects = rendered["prod-gpu.yaml"]
    assert _gpu_requests(_one(objects, "StatefulSet", "decoder")) == [1, 1]
    assert _parsed_settings(objects, "decoder").device == "cuda"
    tolerations = _one(objects, "StatefulSet", "decoder")["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_dev_requests_no_gpu_anywhere(rendered):
    objects = rendered["dev-cpu.yaml"]
    for workload in _workloads(objects):
        assert _gpu_requests(workload) == [None, None]
    assert _parsed_settings(objects, "decoder").device == "cpu"


@pytest.mark.parametrize("case", CASES)
def test_rocksdb_volumes_are_owned_by_the_statefulsets(rendered, case):
    objects = rendered[case]
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    for name in ("kvstore", "pool"):
        sts = _one(objects, "StatefulSet", name)
        [claim] = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
        assert claim["spec"]["resources"]["requests"]["storage"]
        mounts = {m["name"]: m["mountPath"] for m in _main_container(sts)["volumeMounts"]}
        assert mounts["data"] == "/data" == _parsed_settings(objects, name).data_dir.as_posix()
        assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}


@pytest.mark.parametrize("case", CASES)
def test_decoder_mounts_the_model_read_only(rendered, case):
    objects = rendered[case]
    decoder = _one(objects, "StatefulSet", "decoder")
    [mount] = [m for m in _main_container(decoder)["volumeMounts"] if m["name"] == "model"]
    assert mount["readOnly"] is True
    assert _parsed_settings(objects, "decoder").model_path.as_posix().startswith(mount["mountPath"])


@pytest.mark.parametrize("case", ["chart defaults", "prod-gpu.yaml"])
def test_router_is_autoscaled_and_disruption_budgeted(rendered, case):
    objects = rendered[case]
    router = _one(objects, "Deployment", "router")
    hpa = _one(objects, "HorizontalPodAutoscaler", "router")
    pdb = _one(objects, "PodDisruptionBudget", "router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": router["metadata"]["name"]}
    assert "replicas" not in router["spec"]  # the HPA owns it
    assert pdb["spec"]["selector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]


# ---- security, labels, rollouts ---------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_pods_and_containers_are_locked_down(rendered, case):
    objects = rendered[case]
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["serviceAccountName"] in accounts
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # else Services named adaccel-* inject ADACCEL_* env
        assert {"name": "tmp", "emptyDir": pod["volumes"][0]["emptyDir"]} == pod["volumes"][0]
        for container in _containers(workload):
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (container["name"], kind)


@pytest.mark.parametrize("case", CASES)
def test_labels_come_from_helpers_and_selectors_are_minimal(rendered, case):
    for obj in rendered[case]:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "adaccel"
        assert re.fullmatch(r"adaccel-\d+\.\d+\.\d+", labels["helm.sh/chart"])
        assert len(obj["metadata"]["name"]) <= 63
    for workload in _workloads(rendered[case]):
        assert set(workload["spec"]["selector"]["matchLabels"]) == SELECTOR_KEYS
        if workload["kind"] == "StatefulSet":
            assert len(workload["metadata"]["name"]) <= 52  # + controller-revision-hash suffix


def test_long_names_are_refused_not_truncated_into_collisions(chart):
    with pytest.raises(helm.HelmError, match="longer than 40"):
        chart.render({}, name="a-very-long-release-name-for-the-ads-team", namespace="ads")


def test_config_change_rolls_only_that_service(chart, rendered):
    before = {_component(w): w["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
              for w in _workloads(rendered["chart defaults"])}
    changed = check.render_objects(chart, {"kvstore": {"settings": {"chunk_bytes": 4096}}})
    after = {_component(w): w["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
             for w in _workloads(changed)}
    assert {name for name in before if before[name] != after[name]} == {"kvstore"}


# ---- the schema -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    {"router": {"replicas": "two"}},
    {"replicaCount": 2},
    {"router": {"settings": {"heartbeat_seconds": 1}}},
    {"router": {"settings": {"port": 8080}}},  # chart-owned: set grpcPort
    {"decoder": {"settings": {"max_queue": "many"}}},
    {"kvstore": {"settings": {"chunk_bytes": 512}}},  # ge=1024 in KvStoreSettings
    {"image": {"pullPolicy": "Sometimes"}},
    {"decoder": {"gpu": {"count": -1}}},
    {"model": {"volume": {"type": "nfs"}}},
    {"listenHost": "127.0.0.1"},
    {"grpcPort": 80},
    {"telemetry": {"metricsPort": 80}},
    {"kafka": {"bootstrapServers": "kafka"}},
    {"router": {"extraEnv": [{"name": "ADACCEL_PORT", "value": "1"}]}},
    {"router": {"resources": {"request": {"cpu": "1"}}}},
    {"containerSecurityContext": {"readOnlyRootFilesystem": "yes"}},
], ids=lambda v: json.dumps(v)[:60])
def test_schema_rejects_wrong_values(chart, values):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_schema_settings_are_exactly_the_tunable_fields():
    schema = json.loads(values_schema.SCHEMA_PATH.read_text())
    for component in COMPONENTS:
        assert set(component.chart_owned) <= set(component.fields), component.name
        settings = schema["properties"][component.name]["properties"]["settings"]
        assert list(settings["properties"]) == component.tunable


def test_schema_has_no_remote_refs():
    text = values_schema.SCHEMA_PATH.read_text()
    assert not [r for r in re.findall(r'"\$ref":\s*"([^"]+)"', text) if not r.startswith("#/")]


def test_committed_schema_is_generated():
    assert values_schema.SCHEMA_PATH.read_text() == values_schema.render_schema(), (
        "run `python -m k8s.values_schema`")


def test_every_value_is_documented_with_a_param_line(chart):
    text = (check.CHART_DIR / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+)", text, flags=re.M))

    def leaves(node: Any, prefix: str) -> Iterator[str]:
        if isinstance(node, dict) and node and prefix not in documented:
            for key, child in node.items():
                yield from leaves(child, f"{prefix}.{key}" if prefix else key)
        else:
            yield prefix

    undocumented = [p for p in leaves(chart.values, "") if p not in documented]
    assert undocumented == []


# ---- SETTINGS.md ------------------------------------------------------------------------------

def test_committed_settings_table_is_generated():
    committed = (check.K8S_DIR / "SETTINGS.md").read_text()
    assert committed == settings_table.render_table(), "run `python -m k8s.settings_table > k8s/SETTINGS.md`"


def test_settings_table_lists_every_field():
    text = settings_table.render_table()
    for component in COMPONENTS:
        for field in component.fields:
            assert f"| `{env_name(field)}` |" in text


def test_named_secret_is_mounted_read_only_in_every_pod(rendered):
    """prod-gpu names a Secret (TLS files, the router's bearer tokens): every workload mounts it."""
    workloads = [o for o in rendered["prod-gpu.yaml"] if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 4
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["secret-files"]["secret"]["secretName"] == "adaccel-secrets"
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["secret-files"]["readOnly"] and mounts["secret-files"]["mountPath"] == "/etc/adaccel/secrets"
    for workload in (o for o in rendered["dev-cpu.yaml"] if o["kind"] in ("Deployment", "StatefulSet")):
        assert "secret-files" not in {v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]}
