"""Validates the chart without a cluster: `python -m k8s.check [--kube-version 1.31]`.

For the chart defaults and every values file under k8s/values/:
  1. values against values.schema.json (helm's own validator),
  2. `helm lint --strict` with those values,
  3. render, then every object against the Kubernetes JSON schema of the pinned version in
     strict mode (unknown fields fail), via kubernetes-validate,
     Custom resources (ServiceMonitor, PodMonitor, PrometheusRule) are not in those schemas:
     their spec is validated against k8s/crd_schemas.py, their metadata by kubernetes-validate,
  4. each container's environment, assembled as the kubelet would (ConfigMap envFrom, then env,
     `$(VAR)` expansion, the pod name for fieldRefs, the kvstore shard from the ordinal), parsed
     by that service's pydantic settings class; an ADACCEL_* name that is not a field fails,
  5. every metric the PrometheusRule alerts and the Grafana dashboard query is a series one of
     the services' OpenTelemetry instruments exports (k8s/metric_names.py).
Prints one table row per values file and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

from k8s import metric_names
from k8s.crd_schemas import SCHEMAS as CRD_SCHEMAS
from k8s.settings_catalog import BY_NAME, ENV_PREFIX

K8S_DIR = Path(__file__).parent
CHART_DIR = K8S_DIR / "adaccel"
VALUES_DIR = K8S_DIR / "values"
KUBE_VERSION = "1.31"  # the oldest minor we support in production; bump with the clusters
RELEASE = "adaccel"
NAMESPACE = "ads"
COMPONENT_LABEL = "app.kubernetes.io/component"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
KIND_ABBREVIATIONS = {"ConfigMap": "cm", "Deployment": "deploy", "HorizontalPodAutoscaler": "hpa",
                      "NetworkPolicy": "netpol", "Pod": "pod", "PodDisruptionBudget": "pdb",
                      "PodMonitor": "podmon", "PrometheusRule": "prule", "Service": "svc",
                      "ServiceAccount": "sa", "ServiceMonitor": "svcmon", "StatefulSet": "sts"}
DASHBOARD_LABEL = "grafana_dashboard"


def load_values(path: Path | None) -> dict[str, Any]:
    """A values file parsed as `helm -f` parses it; None: the chart defaults only."""
    return {} if path is None else helm.values_from_yaml(path.read_text())


def render_objects(chart: helm.Chart, values: Mapping[str, Any], *, release: str = RELEASE,
                   namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders (NOTES.txt and empty documents dropped)."""
    manifests = chart.render(dict(values), name=release, namespace=namespace)
    objects = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(manifests[path]) if doc)
    return objects


def validate_objects(objects: Iterable[dict[str, Any]], kube_version: str) -> list[str]:
    failures = []
    for obj in objects:
        crd_schema = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        if crd_schema is not None:
            failures += validate_custom_resource(obj, crd_schema, kube_version)
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            failures.append(f"{_ref(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{_ref(obj)}: {exc.message}")
    return failures


def validate_custom_resource(obj: dict[str, Any], schema: dict[str, Any], kube_version: str) -> list[str]:
    """A custom resource (not in kubernetes-validate's schemas): the object against its schema in
    k8s/crd_schemas.py, its metadata as that of a built-in object (names, labels, annotations)."""
    failures = []
    for error in jsonschema.Draft202012Validator(schema).iter_errors(obj):
        where = "/".join(str(p) for p in error.absolute_path)
        failures.append(f"{_ref(obj)}: {where}: {error.message}")
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})},
                                     kube_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        failures.append(f"{_ref(obj)}: {where}: {exc.message}")
    return failures


def dashboards(objects: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(ConfigMap/name:key, dashboard) of every Grafana dashboard ConfigMap (label grafana_dashboard)."""
    for obj in objects:
        if obj["kind"] == "ConfigMap" and DASHBOARD_LABEL in obj["metadata"].get("labels", {}):
            for key, text in obj.get("data", {}).items():
                yield f"{_ref(obj)}:{key}", json.loads(text)


def check_metrics(objects: list[dict[str, Any]]) -> list[str]:
    """Every metric the alerts and dashboards query is exported by an instrument in the code."""
    known = metric_names.exported_series()
    failures = []
    for obj in objects:
        if obj["kind"] == "PrometheusRule":
            failures += [f"{_ref(obj)}: {f}" for f in metric_names.unknown_metrics(metric_names.rule_queries(obj), known)]
    try:
        for where, dashboard in dashboards(objects):
            failures += [f"{where}: {f}" for f in metric_names.unknown_metrics(
                metric_names.dashboard_queries(dashboard), known)]
    except json.JSONDecodeError as exc:
        failures.append(f"dashboard JSON: {exc}")
    return failures


def lint_chart(values: Mapping[str, Any], kube_version: str) -> list[str]:
    report = helm.lint(CHART_DIR, dict(values), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{kube_version}.0")
    # severity 1 (info, e.g. "icon is recommended") is advice; warnings and errors fail.
    return [f"lint {m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + [
        f"lint: {e}" for e in report["errors"] if not any(e == m["error"] for m in report["messages"])]


# ---- container environment, assembled as the kubelet does -------------------------------------

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_name(workload: dict[str, Any], ordinal: int = 0) -> str:
    """A pod's name: StatefulSet pods are <name>-<ordinal>; Deployment pods get a random suffix."""
    name = workload["metadata"]["name"]
    return f"{name}-{ordinal}" if workload["kind"] == "StatefulSet" else f"{name}-7d9f8b6c5-x2x4q"


def container_env(workload: dict[str, Any], container: dict[str, Any], config_maps: Mapping[str, dict],
                  ordinal: int = 0) -> dict[str, str]:
    """envFrom ConfigMaps, then env (later wins), `$(VAR)` expanded, fieldRefs of the pod's name;
    the kvstore command's `${POD_NAME##*-}` export is applied too."""
    name = pod_name(workload, ordinal)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = name
    command = " ".join(container.get("command", []))
    shard = re.search(r"export (ADACCEL_[A-Z_]+)=\"\$\{POD_NAME##\*-\}\"", command)
    if shard:
        env[shard.group(1)] = name.rsplit("-", 1)[1]
    return env


def settings_from_env(settings_cls: type[BaseSettings], env: Mapping[str, str]) -> BaseSettings:
    """Builds `settings_cls` from `env` exactly as the service would from its process environment."""

    class FromEnv(settings_cls):  # type: ignore[misc, valid-type]
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            source = EnvSettingsSource(settings_cls)
            source.env_vars = parse_env_vars(dict(env), source.case_sensitive, source.env_ignore_empty,
                                             source.env_parse_none_str)
            return (source,)

    return FromEnv()


def workloads(objects: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def config_maps_by_name(objects: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}


def check_settings(objects: list[dict[str, Any]]) -> list[str]:
    """Every service container's env parses into its settings class, with no unknown ADACCEL_*."""
    failures = []
    config_maps = config_maps_by_name(objects)
    for workload in workloads(objects):
        component = BY_NAME[workload["metadata"]["labels"][COMPONENT_LABEL]]
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env = container_env(workload, container, config_maps)
        fields = component.fields
        cls_name = component.settings_cls.__name__
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in fields)
        failures += [f"{_ref(workload)}: {k} is not a field of {cls_name}" for k in unknown]
        try:
            settings_from_env(component.settings_cls, env)
        except ValidationError as exc:
            failures.append(f"{_ref(workload)}: {cls_name}: {exc}")
    return failures


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# ---- the report -------------------------------------------------------------------------------

@dataclass(slots=True)
class CaseResult:
    name: str
    kinds: Counter = field(default_factory=Counter)
    failures: dict[str, list[str]] = field(default_factory=dict)  # stage -> messages

    @property
    def ok(self) -> bool:
        return not any(self.failures.values())


def check_case(chart: helm.Chart, name: str, values: dict[str, Any], kube_version: str) -> CaseResult:
    result = CaseResult(name)
    try:
        chart.validate_schema(values)
        result.failures["schema"] = []
    except helm.HelmValuesError as exc:
        result.failures["schema"] = [str(exc)]
        return result
    result.failures["lint"] = lint_chart(values, kube_version)
    try:
        objects = render_objects(chart, values)
    except helm.HelmError as exc:
        result.failures["render"] = [str(exc)]
        return result
    result.failures["render"] = []
    result.kinds = Counter(o["kind"] for o in objects)
    result.failures["k8s"] = validate_objects(objects, kube_version)
    result.failures["settings"] = check_settings(objects)
    result.failures["metrics"] = check_metrics(objects)
    return result


def _mark(failures: list[str] | None) -> str:
    if failures is None:
        return "[dim]skipped[/]"
    return f"[red]{len(failures)} failed[/]" if failures else "[green]ok[/]"


def cases() -> list[tuple[str, Path | None]]:
    return [("chart defaults", None), *((p.name, p) for p in sorted(VALUES_DIR.glob("*.yaml")))]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m k8s.check", description=__doc__.splitlines()[0])
    parser.add_argument("--kube-version", default=KUBE_VERSION, help="Kubernetes minor to validate against")
    args = parser.parse_args(argv)

    console = Console(width=max(Console().width, 120))  # CI logs are not terminals: keep rows on one line
    stages = ("schema", "lint", "render", "k8s", "settings", "metrics")
    table = Table(title=f"adaccel chart: offline checks (Kubernetes {args.kube_version}, strict schemas)")
    table.add_column("values")
    table.add_column("objects", justify="right")
    table.add_column("kinds")
    for stage in stages:
        table.add_column(stage, justify="center")
    results = []
    with helm.Chart.load(CHART_DIR) as chart:
        for name, path in cases():
            result = check_case(chart, name, load_values(path), args.kube_version)
            results.append(result)
            marks = [_mark(result.failures.get(s)) for s in stages]
            kinds = " ".join(f"{KIND_ABBREVIATIONS.get(k, k)}:{n}" for k, n in sorted(result.kinds.items()))
            table.add_row(name, str(sum(result.kinds.values())), kinds, *marks)
    console.print(table)
    for result in results:
        for stage, messages in result.failures.items():
            for message in messages:
                console.print(f"[red]FAIL[/] {escape(f'{result.name} {stage}: {message}')}", highlight=False)
    total = sum(sum(r.kinds.values()) for r in results)
    failed = [r.name for r in results if not r.ok]
    console.print(f"{len(results)} values sets, {total} objects validated; "
                  + (f"FAILED: {', '.join(failed)}" if failed else "all passed"), markup=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
