"""Telemetry pieces without servers: the poll-dropping sampler and the configured samplers around
it, trace ids in the JSON log lines, trace context in Kafka headers, the decoder's rates from
GenerationStats, the Prometheus endpoint's lifecycle."""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from adaccel.v1 import common_pb2
from common.broker import free_port
from common.kafka_io import trace_context, trace_headers
from common.logs import configure_logging
from common.settings import TRACES_SAMPLERS, ServiceSettings
from common.telemetry import SkipPolls, carry_context, configured_sampler, setup_telemetry, traces_sampler
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


def sampled_with(sampler_name: str, ratio: float = 1.0):
    """A tracer sampling as `traces_sampler`/`traces_sampler_arg` say, and its finished spans."""
    settings = ServiceSettings(telemetry_exporter="none", traces_sampler=sampler_name,
                               traces_sampler_arg=ratio)
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=traces_sampler(settings))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test"), spans


KEEPS_REQUESTS = {"always_on": True, "always_off": False, "traceidratio": True, "parentbased_always_on": True,
                  "parentbased_always_off": False, "parentbased_traceidratio": True}


@pytest.mark.parametrize("sampler_name", TRACES_SAMPLERS)
def test_every_sampler_drops_polls_and_their_children(sampler_name):
    tracer, spans = sampled_with(sampler_name)  # ratio 1: the ratio samplers keep every request
    with tracer.start_as_current_span("/grpc.health.v1.Health/Check"):
        headers = trace_headers()
        with tracer.start_as_current_span("child of a poll"):
            with tracer.start_as_current_span("grandchild of a poll"):
                pass
    with tracer.start_as_current_span("/grpc.health.v1.Health/Check", context=trace_context(headers)):
        pass  # the callee's server span
    with tracer.start_as_current_span("/adaccel.v1.Router/Generate"):
        with tracer.start_as_current_span("/adaccel.v1.Decoder/Generate"):
            pass
    names = sorted(s.name for s in spans.get_finished_spans())
    requests = ["/adaccel.v1.Decoder/Generate", "/adaccel.v1.Router/Generate"]
    assert names == (requests if KEEPS_REQUESTS[sampler_name] else [])


def test_a_poll_made_for_a_sampled_request_is_traced_with_it():
    tracer, spans = sampled_with("parentbased_always_on")
    with tracer.start_as_current_span("/adaccel.v1.Router/Generate"):
        with tracer.start_as_current_span("/adaccel.v1.Pool/GetVersions"):
            pass
    assert len(spans.get_finished_spans()) == 2


def _parent(sampled: bool, remote: bool = True):
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    context = SpanContext(0xABC, 0xDEF, is_remote=remote, trace_flags=flags)
    return set_span_in_context(NonRecordingSpan(context))


@pytest.mark.parametrize("sampler_name, parent_sampled, kept", [
    ("parentbased_traceidratio", True, True),  # ratio 0 decides roots only
    ("parentbased_traceidratio", False, False),
    ("traceidratio", True, False),  # ignores the caller's decision
    ("always_on", False, True),
    ("parentbased_always_on", False, False),
    ("parentbased_always_off", True, True),
])
def test_parent_based_samplers_follow_the_caller(sampler_name, parent_sampled, kept):
    sampler = traces_sampler(ServiceSettings(traces_sampler=sampler_name, traces_sampler_arg=0.0))
    result = sampler.should_sample(_parent(parent_sampled), 0xABC, "/adaccel.v1.Decoder/Generate")
    assert (result.decision == Decision.RECORD_AND_SAMPLE) is kept


def test_traceidratio_keeps_the_share_of_trace_ids_below_the_ratio():
    sampler = configured_sampler("traceidratio", 0.25)
    low, high = (1 << 62) - 1, (1 << 62) + 1  # the ratio compares the low 64 bits with ratio * 2**64
    assert sampler.should_sample(None, low, "r").decision == Decision.RECORD_AND_SAMPLE
    assert sampler.should_sample(None, high, "r").decision == Decision.DROP
    assert "0.25" in traces_sampler(ServiceSettings(traces_sampler="traceidratio",
                                                    traces_sampler_arg=0.25)).get_description()


def test_unknown_sampler_name_is_refused_by_the_builder_too():
    with pytest.raises(ValueError, match="jaeger_remote"):
        configured_sampler("jaeger_remote")


def test_setup_telemetry_uses_the_configured_sampler():
    spans = InMemorySpanExporter()
    settings = ServiceSettings(telemetry_exporter="none", traces_sampler="always_off")
    telemetry = setup_telemetry("unit", settings, install_global=False,
                                span_processors=[SimpleSpanProcessor(spans)])
    with telemetry.tracer("t").start_as_current_span("/adaccel.v1.Router/Generate"):
        pass
    assert spans.get_finished_spans() == ()
    assert telemetry.tracer_provider.sampler.get_description() == "SkipPolls{AlwaysOffSampler}"
    telemetry.shutdown()


@pytest.fixture
def json_log_lines():
    """configure_logging as a service runs it, its stderr handler pointed at a buffer; the root
    logger's handlers and level and the record factory are put back afterwards."""
    from opentelemetry.instrumentation.logging import LoggingInstrumentor

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    was_instrumented = LoggingInstrumentor().is_instrumented_by_opentelemetry
    configure_logging("unit", "INFO", json_lines=True)
    buffer = io.StringIO()
    [handler] = root.handlers
    handler.setStream(buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:], level = saved
    root.setLevel(level)
    if not was_instrumented:
        LoggingInstrumentor().uninstrument()


def test_log_lines_in_a_span_carry_its_ids_and_others_none(json_log_lines):
    tracer, _ = sampled_with("parentbased_always_on")
    log = logging.getLogger("unit.test")
    log.info("before", extra={"thing": 1})
    with tracer.start_as_current_span("/adaccel.v1.Router/Generate") as span:
        log.info("inside")
        with tracer.start_as_current_span("/grpc.health.v1.Health/Check") as poll:  # sampled parent
            log.warning("nested")
    with tracer.start_as_current_span("/grpc.health.v1.Health/Check") as dropped:
        log.info("in a dropped poll")
    log.info("after")
    before, inside, nested, in_poll, after = json_log_lines()
    context = span.get_span_context()
    assert (inside["trace_id"], inside["span_id"], inside["trace_sampled"]) == (
        format(context.trace_id, "032x"), format(context.span_id, "016x"), True)
    assert (inside["message"], inside["service"], inside["level"]) == ("inside", "unit", "INFO")
    assert nested["trace_id"] == inside["trace_id"]
    assert nested["span_id"] == format(poll.get_span_context().span_id, "016x") != inside["span_id"]
    assert in_poll["span_id"] == format(dropped.get_span_context().span_id, "016x")
    assert in_poll["trace_sampled"] is False
    for line in (before, after):
        assert not {"trace_id", "span_id", "trace_sampled"} & set(line)
        assert not any(key.startswith("otel") for key in line)
    assert before["thing"] == 1 and len(inside["trace_id"]) == 32 and len(inside["span_id"]) == 16


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
