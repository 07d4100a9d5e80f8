"""OpenTelemetry set-up: traces and metrics, console by default, OTLP when an endpoint is set, and a
Prometheus scrape endpoint when `metrics_port` is set.

Every service gets its own providers (passed down from `main()`, never read from globals in the
service code), so several services can run in one process (tests) without sharing exporters.
Background polls (health checks, the router's replica reports, the decoders' pool version polls)
are measured by the RPC metrics but not traced: a root span per poll would bury the request traces.
Which request traces are kept is `traces_sampler` (OTEL_TRACES_SAMPLER and its ratio
OTEL_TRACES_SAMPLER_ARG, or their ADACCEL_* names), wrapped in `SkipPolls` whatever it is.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes

from common.settings import TRACES_SAMPLERS, ServiceSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Histogram bucket boundaries (advisory, set by each instrument): the SDK's default buckets
# (0, 5, 10, ... 10000) suit milliseconds, not seconds or ratios.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TOKEN_COUNT_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
LAG_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

# gRPC methods called on a timer, never on behalf of one request (span names of the gRPC
# instrumentation are the full method names).
UNTRACED_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/adaccel.v1.Decoder/Report",
    "/adaccel.v1.Pool/GetVersions",
})


class SkipPolls(Sampler):
    """Wraps the configured sampler: drops the spans of background polls whatever it decides.

    A poll's span (by name) is dropped unless its parent is a sampled span; a span whose parent is
    a local span that was not sampled is dropped too, so a poll's own children never become orphans
    under samplers that ignore the parent (always_on, traceidratio). The poll's client span
    propagates an unsampled context and the callee's server span has the poll's name: dropped too.
    Everything else is the wrapped sampler's decision.
    """

    def __init__(self, inner: Sampler = ALWAYS_ON, untraced: frozenset[str] = UNTRACED_METHODS):
        self.inner = inner
        self.untraced = untraced

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None, trace_state=None) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        parent_sampled = parent.is_valid and parent.trace_flags.sampled
        if parent.is_valid and not parent.is_remote and not parent_sampled:
            return SamplingResult(Decision.DROP)
        if name in self.untraced and not parent_sampled:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"SkipPolls{{{self.inner.get_description()}}}"


def configured_sampler(name: str, ratio: float = 1.0) -> Sampler:
    """The sampler named as OTEL_TRACES_SAMPLER names it (common.settings.TRACES_SAMPLERS), without
    the poll filter; `ratio` is the traceidratio samplers' share of traces kept."""
    roots: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
    }
    base = name.removeprefix("parentbased_")
    if base not in roots:
        raise ValueError(f"unknown trace sampler {name!r}; one of {', '.join(TRACES_SAMPLERS)}")
    root = roots[base]()
    return ParentBased(root=root) if name.startswith("parentbased_") else root


def traces_sampler(settings: ServiceSettings) -> Sampler:
    """The service's sampler: the configured one, with background polls dropped."""
    return SkipPolls(configured_sampler(settings.traces_sampler, settings.traces_sampler_arg))


@dataclass(slots=True)
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics_port: int = 0  # the bound Prometheus port, 0 when off
    _on_shutdown: list[Callable[[], None]] = field(default_factory=list)

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        for fn in self._on_shutdown:
            fn()
        self._on_shutdown.clear()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _prometheus_reader(host: str, port: int) -> tuple[MetricReader, int, Callable[[], None]]:
    """A Prometheus reader with its own registry (not prometheus_client's global one, so two
    services in one process never mix their series) served over HTTP; returns the bound port."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return reader, server.server_port, stop


def setup_telemetry(service: str, settings: ServiceSettings, *, install_global: bool = True,
                    span_processors: Sequence[SpanProcessor] = (),
                    metric_readers: Sequence[MetricReader] = ()) -> Telemetry:
    """Builds the providers from settings; `install_global` makes them the process-wide OTel
    providers (main only). `span_processors` and `metric_readers` are added to the configured ones
    (tests pass in-memory exporters here)."""
    resource = Resource.create({"service.name": f"adaccel-{service}"})
    sampler = traces_sampler(settings)
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    readers: list[MetricReader] = list(metric_readers)
    exporter = "otlp" if settings.otlp_endpoint else settings.telemetry_exporter
    interval_ms = settings.telemetry_interval_s * 1000
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=settings.otlp_endpoint),
                                                     export_interval_millis=interval_ms))
    elif exporter == "console":
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stdout),
                                                     export_interval_millis=interval_ms))
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    on_shutdown: list[Callable[[], None]] = []
    metrics_port = 0
    if settings.metrics_port:
        reader, metrics_port, stop = _prometheus_reader(settings.host, settings.metrics_port)
        readers.append(reader)
        on_shutdown.append(stop)
        log.info("prometheus metrics served", extra={"host": settings.host, "metrics_port": metrics_port})
    log.info("trace sampler", extra={"sampler": sampler.get_description()})
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if install_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider, metrics_port, on_shutdown)


def carry_context(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` to run on another thread (an executor's) in the caller's OpenTelemetry context, so the
    spans it starts keep the caller's span as parent (threads do not inherit contextvars)."""
    captured = otel_context.get_current()

    def run(*args, **kwargs) -> T:
        token = otel_context.attach(captured)
        try:
            return fn(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return run


def null_telemetry() -> Telemetry:
    """Providers that export nothing (tests that start servers in-process)."""
    return Telemetry(TracerProvider(), MeterProvider())
