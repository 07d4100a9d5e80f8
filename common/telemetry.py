"""OpenTelemetry set-up: traces and metrics, console by default, OTLP when an endpoint is set."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from common.settings import ServiceSettings


@dataclass(slots=True)
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(service: str, settings: ServiceSettings, *, install_global: bool = True) -> Telemetry:
    """Builds the providers; `install_global` makes them the process-wide OTel providers (main only)."""
    resource = Resource.create({"service.name": f"adaccel-{service}"})
    tracer_provider = TracerProvider(resource=resource)
    readers = []
    exporter = "otlp" if settings.otlp_endpoint else settings.telemetry_exporter
    interval_ms = settings.telemetry_interval_s * 1000
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=settings.otlp_endpoint),
                                                     export_interval_millis=interval_ms))
    elif exporter == "console":
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stdout),
                                                     export_interval_millis=interval_ms))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if install_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider)


def null_telemetry() -> Telemetry:
    """Providers that export nothing (tests that start servers in-process)."""
    return Telemetry(TracerProvider(), MeterProvider())
