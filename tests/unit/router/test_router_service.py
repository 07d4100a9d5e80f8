"""The router's servicer over fake decoder replicas, behind the shared error table: which replica
answers, load counted while a call is open, and the status the caller gets."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from adaccel.v1 import common_pb2
from common.requests import RequestLimits
from common.rpc.errors import RETRY_AFTER_MS, STATUS_DETAILS_KEY, retry_delay_ms, rich_status_of
from common.rpc.interceptors import ErrorMappingInterceptor
from services.router.metrics import observe_router
from services.router.scheduling import ReplicaView
from services.router.service import RouterService
from tests.unit.router.test_failover_policy import FakeRpcError

S = grpc.StatusCode
CallDetails = namedtuple("CallDetails", "method invocation_metadata")


def chunk(text: str) -> common_pb2.GenerateChunk:
    return common_pb2.GenerateChunk(delta=common_pb2.TokenDelta(text=text))


class FakeStub:
    def __init__(self, replica: FakeReplica):
        self.replica = replica

    def Generate(self, request, timeout):
        self.replica.calls.append((request.request_id, timeout))
        return self.replica.answer()


@dataclass
class FakeReplica:
    chunks: tuple[str, ...] = ()
    error: FakeRpcError | None = None
    calls: list = field(default_factory=list)
    closed: int = 0

    def __post_init__(self):
        self.stub = FakeStub(self)

    def answer(self):
        """A call as the tracing interceptor hands it back: a generator (stop_call closes it)."""
        try:
            yield from (chunk(t) for t in self.chunks)
            if self.error is not None:
                raise self.error
        finally:
            self.closed += 1


class FakeReplicaSet:
    def __init__(self, **replicas: FakeReplica):
        self.replicas = replicas
        self.inflight = dict.fromkeys(replicas, 0)
        self.healthy = dict.fromkeys(replicas, True)
        self.routed: list[tuple[str, str]] = []

    def views(self):
        return [ReplicaView(a, self.healthy[a], self.inflight[a], 0) for a in self.replicas]

    def track(self, address, delta):
        self.inflight[address] += delta

    def note_routed(self, address, footprint, weights):
        self.routed.append((address, footprint.pool_key))
        return len(self.routed)

    def prefill_done(self, address, call_id):
        pass

    def mark_failed(self, address):
        self.healthy[address] = False


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, remaining_s: float | None = 5.0):
        self.remaining_s = remaining_s
        self.trailing_metadata = ()
        self.status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self):
        return self.remaining_s

    def code(self):
        return self.status[0] if self.status else None

    def set_trailing_metadata(self, metadata):
        self.trailing_metadata = tuple(metadata)

    def abort(self, code, details):
        self.status = (code, details)
        raise Aborted(details)

    def abort_with_status(self, status):
        self.trailing_metadata = tuple(status.trailing_metadata)
        self.abort(status.code, status.details)

    def plain_trailers(self):
        """The trailing metadata less the rich status."""
        return tuple((k, v) for k, v in self.trailing_metadata if k != STATUS_DETAILS_KEY)

    def error_info(self) -> error_details_pb2.ErrorInfo:
        (info,) = [d for d in rich_status_of(self.trailing_metadata).details
                   if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        out = error_details_pb2.ErrorInfo()
        info.Unpack(out)
        return out


def generate(replicas: FakeReplicaSet, context: FakeContext) -> list[str]:
    """Router.Generate as a server runs it: behind the shared error-mapping interceptor."""
    servicer = RouterService(replicas, RequestLimits(), default_deadline_s=30.0, policy="least_loaded")
    method = "/adaccel.v1.Router/Generate"
    handler = ErrorMappingInterceptor().intercept_service(
        lambda _details: grpc.unary_stream_rpc_method_handler(servicer.Generate), CallDetails(method, ()))
    request = common_pb2.GenerateRequest(
        request_id="r1", pool_key="home/kitchen",
        blocks=[common_pb2.PromptBlock(id="item-1", kind=common_pb2.BLOCK_KIND_ITEM, text="A skillet.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=8))
    return [c.delta.text for c in handler.unary_stream(request, context)]


def test_a_failed_replica_is_left_for_the_next_and_its_load_is_released():
    replicas = FakeReplicaSet(a=FakeReplica(error=FakeRpcError(S.UNAVAILABLE, "down")), b=FakeReplica(("hi", "!")))
    assert generate(replicas, FakeContext(remaining_s=5.0)) == ["hi", "!"]
    assert [a for a, _ in replicas.routed] == ["a", "b"]
    assert replicas.healthy == {"a": False, "b": True}
    assert replicas.inflight == {"a": 0, "b": 0}
    assert all(r.closed == 1 for r in replicas.replicas.values())
    assert 0 < replicas.replicas["a"].calls[0][1] <= 5.0  # the caller's deadline travels on


def test_a_caller_without_a_deadline_gets_the_default():
    replicas = FakeReplicaSet(a=FakeReplica(("hi",)))
    generate(replicas, FakeContext(remaining_s=None))
    assert 29.0 < replicas.replicas["a"].calls[0][1] <= 30.0


def test_a_decoders_verdict_reaches_the_caller_with_its_code_details_and_trailers():
    verdict = FakeRpcError(S.INVALID_ARGUMENT, "blocks[0].text: must not be empty", (("x-why", "empty"),))
    replicas = FakeReplicaSet(a=FakeReplica(error=verdict), b=FakeReplica(("never",)))
    context = FakeContext()
    with pytest.raises(Aborted):
        generate(replicas, context)
    assert context.status == (S.INVALID_ARGUMENT, "blocks[0].text: must not be empty")
    assert context.plain_trailers() == (("x-why", "empty"),)
    assert context.error_info().reason == "UPSTREAM_ERROR"  # the fake decoder sent no rich status
    assert replicas.replicas["b"].calls == [] and replicas.inflight == {"a": 0, "b": 0}


def test_busy_decoders_give_back_pressure_with_the_soonest_hint():
    def busy(ms):
        return FakeReplica(error=FakeRpcError(S.RESOURCE_EXHAUSTED, f"queue full ({ms})", ((RETRY_AFTER_MS, str(ms)),)))

    replicas = FakeReplicaSet(a=busy(90), b=busy(30))
    context = FakeContext()
    with pytest.raises(Aborted):
        generate(replicas, context)
    assert context.status == (S.RESOURCE_EXHAUSTED, "all decoder replicas tried are busy (queue full (30))")
    assert context.plain_trailers() == ((RETRY_AFTER_MS, "30"),)
    assert retry_delay_ms(context.trailing_metadata) == 30  # RetryInfo
    assert context.error_info().reason == "ALL_REPLICAS_BUSY"


def test_streams_past_the_cap_get_back_pressure_with_a_hint_and_the_slot_comes_back():
    class Held(FakeReplica):
        def answer(self):
            yield chunk("a")
            yield chunk("b")

    replicas = FakeReplicaSet(a=Held())
    servicer = RouterService(replicas, RequestLimits(), default_deadline_s=30.0, policy="least_loaded", max_streams=1)
    reader = InMemoryMetricReader()
    observe_router(MeterProvider(metric_readers=[reader]).get_meter("test"), servicer.streams, replicas)
    handler = ErrorMappingInterceptor().intercept_service(
        lambda _details: grpc.unary_stream_rpc_method_handler(servicer.Generate),
        CallDetails("/adaccel.v1.Router/Generate", ()))
    request = common_pb2.GenerateRequest(
        request_id="r", blocks=[common_pb2.PromptBlock(id="i", kind=common_pb2.BLOCK_KIND_ITEM, text="A pan.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=8))
    first = handler.unary_stream(request, FakeContext())
    assert next(first).delta.text == "a"  # one stream open
    assert router_gauges(reader) == {"adaccel.router.streams_open": 1, "adaccel.router.stream_limit": 1,
                                     "adaccel.router.streams_refused": 0,
                                     "adaccel.router.replica_queue_depth": {"a": 1}}
    second = FakeContext()
    with pytest.raises(Aborted):
        list(handler.unary_stream(request, second))
    assert router_gauges(reader)["adaccel.router.streams_refused"] == 1  # the refusal is seen, not silent
    assert second.status[0] == S.RESOURCE_EXHAUSTED and "max_streams=1" in second.status[1]
    assert dict(second.trailing_metadata)[RETRY_AFTER_MS] == "200"
    assert second.error_info().reason == "STREAM_LIMIT" and second.error_info().metadata["limit"] == "1"
    assert [c.delta.text for c in first] == ["b"]  # the first stream ends and frees its slot
    assert servicer.streams.in_use == 0
    assert router_gauges(reader)["adaccel.router.streams_open"] == 0
    assert [c.delta.text for c in handler.unary_stream(request, FakeContext())] == ["a", "b"]


def router_gauges(reader: InMemoryMetricReader) -> dict:
    """name -> value (per replica for the replica gauge) of the router's instruments, read now."""
    found = {}
    for resource_metrics in reader.get_metrics_data().resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                points = list(metric.data.data_points)
                if metric.name == "adaccel.router.replica_queue_depth":
                    found[metric.name] = {p.attributes["replica"]: p.value for p in points}
                else:
                    [point] = points
                    found[metric.name] = point.value
    return found
