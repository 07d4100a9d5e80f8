"""Telemetry pieces without servers: the poll-dropping sampler, trace context in Kafka headers,
the decoder's rates from GenerationStats, the Prometheus endpoint's lifecycle."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased

from adaccel.v1 import common_pb2
from common.broker import free_port
from common.kafka_io import trace_context, trace_headers
from common.settings import ServiceSettings
from common.telemetry import SkipPolls, carry_context, setup_telemetry
from services.decoder.metrics import DecoderMetrics, verification_mode


@pytest.fixture
def traced():
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(root=SkipPolls()))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield provider.get_tracer("test"), spans
    provider.shutdown()


def test_polls_are_dropped_with_their_children_and_requests_are_kept(traced):
    tracer, spans = traced
    with tracer.start_as_current_span("/adaccel.v1.Decoder/Report"):
        headers = trace_headers()  # what the poll's client would send
        with tracer.start_as_current_span("child of a poll"):
            pass
    with tracer.start_as_current_span("/adaccel.v1.Decoder/Report", context=trace_context(headers)):
        pass  # the callee's server span: unsampled parent -> dropped
    with tracer.start_as_current_span("/adaccel.v1.Router/Generate"):
        pass
    assert [s.name for s in spans.get_finished_spans()] == ["/adaccel.v1.Router/Generate"]


def test_kafka_headers_carry_the_span_and_nothing_without_one(traced):
    tracer, _ = traced
    assert trace_headers() == []
    with tracer.start_as_current_span("send") as span:
        headers = trace_headers()
    [(key, value)] = headers
    assert key == "traceparent" and isinstance(value, bytes)
    carried = trace.get_current_span(trace_context(headers + [("other", None)])).get_span_context()
    assert (carried.trace_id, carried.span_id, carried.is_remote) == (
        span.get_span_context().trace_id, span.get_span_context().span_id, True)
    assert not trace.get_current_span(trace_context(None)).get_span_context().is_valid


def test_carry_context_parents_spans_started_on_another_thread(traced):
    tracer, spans = traced
    with tracer.start_as_current_span("request") as request:
        def lookup():
            with tracer.start_as_current_span("lookup"):
                pass

        worker = threading.Thread(target=carry_context(lookup))
        worker.start()
        worker.join()
    lookup_span = next(s for s in spans.get_finished_spans() if s.name == "lookup")
    assert lookup_span.parent.span_id == request.get_span_context().span_id


def stats(accepted_per_step, drafted_per_step, accepted_drafts_per_step=(), **fields):
    return common_pb2.GenerationStats(accepted_per_step=accepted_per_step, drafted_per_step=drafted_per_step,
                                      accepted_drafts_per_step=accepted_drafts_per_step, **fields)


def test_verification_mode_names_what_verified_the_steps():
    params = common_pb2.GenerationParams
    assert verification_mode(params()) == "strict"
    assert verification_mode(params(mode=common_pb2.VERIFICATION_MODE_RELAXED)) == "relaxed"
    assert verification_mode(params(mode=common_pb2.VERIFICATION_MODE_RELAXED,
                                    sampling=common_pb2.SamplingParams(temperature=0.7))) == "sampling"


def test_decoder_rates_per_request():
    from opentelemetry.sdk.metrics import MeterProvider

    reader = InMemoryMetricReader()
    metrics = DecoderMetrics.create(MeterProvider(metric_readers=[reader]).get_meter("t"))
    metrics.record(stats([3, 1, 1, 4], [8, 8, 0, 6], [2, 0, 0, 3], prompt_tokens=40, cached_prompt_tokens=30,
                         new_tokens=9, ttft_s=0.2, total_s=1.0), "strict")
    points = {m.name: m.data.data_points[0] for rm in reader.get_metrics_data().resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}
    assert points["adaccel.decoder.acceptance_rate"].sum == pytest.approx(5 / 22)
    assert points["adaccel.decoder.pool_hit_rate"].sum == pytest.approx(2 / 4)
    assert points["adaccel.decoder.kv_block_hit_rate"].sum == pytest.approx(30 / 40)
    assert points["adaccel.decoder.time_per_output_token"].sum == pytest.approx(0.8 / 8)
    assert points["adaccel.decoder.accepted_draft_tokens"].value == 5
    assert points["adaccel.decoder.draft_tokens"].value == 22
    assert points["adaccel.decoder.tokens_per_step"].count == 4


def test_prometheus_endpoint_serves_and_stops_with_the_providers():
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("unit", ServiceSettings(telemetry_exporter="none", metrics_port=free_port()),
                                install_global=False, metric_readers=[reader])
    telemetry.meter("t").create_counter("adaccel.unit.things", unit="{thing}").add(3)
    url = f"http://127.0.0.1:{telemetry.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert "adaccel_unit_things_total" in reply.read().decode()
    telemetry.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
