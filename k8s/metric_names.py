"""The Prometheus series the services export, read from their OpenTelemetry instruments, and the
metric names PromQL queries use: `python -m k8s.metric_names` lists the series.

The services create their instruments in a few modules (METRICS_MODULES) with literal names and
units; those calls are read from the source (no import: the modules pull in protobuf code and
the models), and each instrument is named as the OpenTelemetry Prometheus exporter
(opentelemetry-exporter-prometheus, through prometheus_client) names it:

- the name with every run of characters outside [a-zA-Z0-9:] made one `_` (dots -> underscores),
- the unit without its `{annotation}`, mapped (s -> seconds, By -> bytes, ...; "1" -> nothing),
  appended as a suffix unless the name already ends with it,
- counters (also observable ones) get `_total`; histograms are `_bucket`, `_sum` and `_count`;
  gauges keep the name.

tests/unit/k8s checks these rules against the exporter itself, and that every metric the chart's
dashboard and alerts query is one of these series, so renaming an instrument fails the tests.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS_MODULES = (
    "services/decoder/metrics.py",
    "services/router/metrics.py",
    "services/pool/metrics.py",
    "common/rpc/rpc_metrics.py",
)

# Meter.create_* method -> how the exporter writes it.
_KINDS = {
    "create_counter": "counter",
    "create_observable_counter": "counter",
    "create_histogram": "histogram",
    "create_gauge": "gauge",
    "create_observable_gauge": "gauge",
    "create_up_down_counter": "gauge",  # a non-monotonic sum is exported as a gauge
    "create_observable_up_down_counter": "gauge",
}
# The exporter's unit suffixes for the units an instrument may use; another unit fails loudly here
# (add it after checking what the exporter writes, see the test against the exporter).
_UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
                  "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "1": "", "%": "percent", "": ""}
_SANITIZE = re.compile(r"[^a-zA-Z0-9:]+")
_ANNOTATION = re.compile(r"\{.*\}")


@dataclass(frozen=True, slots=True)
class Instrument:
    name: str  # OpenTelemetry name, e.g. adaccel.decoder.ttft
    kind: str  # counter / histogram / gauge (as exported)
    unit: str
    source: str  # module path, relative to the repository root

    @property
    def family(self) -> str:
        """The Prometheus metric family: sanitized name + unit suffix."""
        name = _SANITIZE.sub("_", self.name)
        unit = _ANNOTATION.sub("", self.unit)
        if unit not in _UNIT_SUFFIXES:
            raise ValueError(f"{self.source}: {self.name}: unit {self.unit!r} has no known Prometheus suffix; "
                             "add it to k8s/metric_names.py")
        suffix = _UNIT_SUFFIXES[unit]
        return f"{name}_{suffix}" if suffix and not name.endswith(f"_{suffix}") else name

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names a scrape shows."""
        if self.kind == "counter":
            return (f"{self.family}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.family}_{s}" for s in ("bucket", "sum", "count"))
        return (self.family,)


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def instruments(root: Path = ROOT, modules: Iterable[str] = METRICS_MODULES) -> list[Instrument]:
    """Every `<meter>.create_*("<name>", ..., unit="<unit>")` call in the metrics modules."""
    found = []
    for module in modules:
        tree = ast.parse((root / module).read_text(), filename=module)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _KINDS):
                continue
            name = _literal(node.args[0]) if node.args else _literal(
                next((k.value for k in node.keywords if k.arg == "name"), None))
            if name is None:
                raise ValueError(f"{module}:{node.lineno}: instrument name is not a string literal")
            unit = next((_literal(k.value) for k in node.keywords if k.arg == "unit"), "")
            if unit is None:
                raise ValueError(f"{module}:{node.lineno}: {name}: unit is not a string literal")
            found.append(Instrument(name, _KINDS[node.func.attr], unit, module))
    return found


def exported_series(root: Path = ROOT) -> dict[str, Instrument]:
    """Prometheus sample name -> the instrument behind it."""
    return {series: inst for inst in instruments(root) for series in inst.series}


# ---- metric names in PromQL -------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_CALLS = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(")
_IDENTIFIERS = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan", "Inf", "NaN"})
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, function names, keywords and numbers are taken out. A Grafana
    variable query `label_values(<metric>..., <label>)` gives its metric."""
    names: set[str] = set()
    head = _LABEL_VALUES.match(expr)
    if head:
        return {head.group(1)}
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _CALLS.sub("(", text)
    for match in _IDENTIFIERS.finditer(text):
        if match.group(0) not in _KEYWORDS:
            names.add(match.group(0))
    return names


def dashboard_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable of a Grafana dashboard."""
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def rule_queries(rule_object: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every rule of a PrometheusRule object."""
    for group in rule_object["spec"]["groups"]:
        for rule in group["rules"]:
            yield f"{group['name']}/{rule.get('alert') or rule.get('record')}", rule["expr"]


def unknown_metrics(queries: Iterable[tuple[str, str]], known: Iterable[str]) -> list[str]:
    """One message per query that selects a metric no instrument exports."""
    known = set(known)
    failures = []
    for where, expr in queries:
        names = queried_metrics(expr)
        if not names:
            failures.append(f"{where}: no metric in {expr!r}")
        failures += [f"{where}: {name} is not exported by any instrument in {', '.join(METRICS_MODULES)}"
                     for name in sorted(names - known)]
    return failures


def main() -> int:
    for series, inst in sorted(exported_series().items()):
        print(f"{series:60} {inst.kind:9} {inst.name} [{inst.unit}] ({inst.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
