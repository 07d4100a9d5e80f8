"""The error contract (README.md "Error contract"): each ServiceError kind, raised in a handler behind
the shared interceptor of a real loopback server, reaches a real client with its code, its message
and its google.rpc.Status details (ErrorInfo always; BadRequest, RetryInfo where they apply), read
back with grpc_status.rpc_status.from_call. INTERNAL carries a trace id, never the exception."""

from __future__ import annotations

import logging
import re
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import server_interceptor
from opentelemetry.sdk.trace import TracerProvider

from adaccel.v1 import common_pb2
from common.requests import RequestLimits, validate_generate_request
from common.rpc.errors import (
    DOMAIN,
    REASONS,
    RETRY_AFTER_MS,
    STATUS_DETAILS_KEY,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    UpstreamStatus,
    require,
    retry_delay_ms,
)
from common.rpc.interceptors import ErrorMappingInterceptor

S = grpc.StatusCode
README = Path(__file__).resolve().parents[3] / "README.md"
UNARY = "/test.Errors/Unary"
STREAM = "/test.Errors/Stream"


class Raising(grpc.GenericRpcHandler):
    """Raises self.error from a unary method, and from a streaming one after one message."""

    error: Exception | None = None

    def service(self, details):
        def unary(request, context):
            raise self.error

        def stream(request, context):
            yield b"first"
            raise self.error

        if details.method == UNARY:
            return grpc.unary_unary_rpc_method_handler(unary)
        if details.method == STREAM:
            return grpc.unary_stream_rpc_method_handler(stream)
        return None


def serve(interceptors):
    handler = Raising()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=interceptors)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, handler


@pytest.fixture(scope="module")
def loopback():
    server, channel, handler = serve([ErrorMappingInterceptor()])
    yield channel, handler
    channel.close()
    server.stop(0)


@pytest.fixture(scope="module")
def traced_loopback():
    """With the OpenTelemetry server interceptor in front, as common/rpc/server.py builds servers."""
    tracing = server_interceptor(tracer_provider=TracerProvider())
    server, channel, handler = serve([tracing, ErrorMappingInterceptor()])
    yield channel, handler
    channel.close()
    server.stop(0)


def call(loopback, error: Exception, *, streaming: bool = False) -> grpc.RpcError:
    channel, handler = loopback
    handler.error = error
    with pytest.raises(grpc.RpcError) as err:
        if streaming:
            replies = channel.unary_stream(STREAM)(b"", timeout=5)
            assert next(replies) == b"first"
            next(replies)
        else:
            channel.unary_unary(UNARY)(b"", timeout=5)
    return err.value


def details(status, kind):
    found = []
    for any_ in status.details:
        if any_.Is(kind.DESCRIPTOR):
            message = kind()
            any_.Unpack(message)
            found.append(message)
    assert len(found) <= 1
    return found[0] if found else None


CASES = [
    # error, code, reason, BadRequest violations or None, retry delay in ms or None
    (lambda: require(False, "params.max_new_tokens", "must be in 1..512, got 0", limit=512),
     S.INVALID_ARGUMENT, "INVALID_FIELD", [("params.max_new_tokens", "must be in 1..512, got 0")], None),
    (lambda: InvalidArgument("block_hash and model_id: required"),
     S.INVALID_ARGUMENT, "INVALID_FIELD", [("block_hash", "required"), ("model_id", "required")], None),
    (lambda: ResourceExhausted("blocks: 300 blocks, limit is 256", field="blocks", limit=256),
     S.RESOURCE_EXHAUSTED, "FIELD_TOO_LARGE", [("blocks", "300 blocks, limit is 256")], None),
    (lambda: ResourceExhausted("decoder KV budget full; retry after ~250 ms", retry_after_ms=250,
                               reason=Reason.KV_BUDGET, limit=1 << 20),
     S.RESOURCE_EXHAUSTED, "KV_BUDGET", None, 250),
    (lambda: ResourceExhausted("router busy", retry_after_ms=1500, reason=Reason.STREAM_LIMIT, limit=8),
     S.RESOURCE_EXHAUSTED, "STREAM_LIMIT", None, 1500),
    (lambda: Unavailable("no healthy decoder replica", reason=Reason.NO_HEALTHY_REPLICA),
     S.UNAVAILABLE, "NO_HEALTHY_REPLICA", None, None),
    (lambda: Unavailable("decoders failed twice", reason=Reason.REPLICAS_FAILED, retry_after_ms=40),
     S.UNAVAILABLE, "REPLICAS_FAILED", None, 40),
    (lambda: NotFound("pool_key: no pool 'x'", reason=Reason.POOL_NOT_FOUND, field="pool_key"),
     S.NOT_FOUND, "POOL_NOT_FOUND", None, None),
    (lambda: DeadlineExceeded("deadline passed before a replica answered"),
     S.DEADLINE_EXCEEDED, "DEADLINE", None, None),
    (lambda: FailedPrecondition("texts: no tokenizer", reason=Reason.NO_TOKENIZER, field="texts"),
     S.FAILED_PRECONDITION, "NO_TOKENIZER", None, None),
    (lambda: Unauthenticated("authorization: token not accepted"),
     S.UNAUTHENTICATED, "UNAUTHENTICATED", None, None),
    (lambda: PermissionDenied("client certificate: subject not allowed"),
     S.PERMISSION_DENIED, "PERMISSION_DENIED", None, None),
    (lambda: UpstreamStatus(S.ABORTED, "a peer's verdict", (("x-peer", "1"),)),
     S.ABORTED, "UPSTREAM_ERROR", None, None),
]


def raised(make) -> ServiceError:
    try:
        make()
    except ServiceError as exc:
        return exc
    return make()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("make, code, reason, violations, retry_ms", CASES)
def test_each_error_kind_reaches_the_caller_with_its_code_and_details(
        loopback, make, code, reason, violations, retry_ms, streaming):
    error = raised(make)
    err = call(loopback, error, streaming=streaming)
    assert (err.code(), err.details()) == (code, str(error))
    status = rpc_status.from_call(err)  # also checks code and message agree with the call's
    assert status is not None
    info = details(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, DOMAIN)
    bad_request = details(status, error_details_pb2.BadRequest)
    if violations is None:
        assert bad_request is None
    else:
        assert [(v.field, v.description) for v in bad_request.field_violations] == violations
        if len(violations) == 1:
            assert info.metadata["field"] == violations[0][0]
    retry = details(status, error_details_pb2.RetryInfo)
    trailers = dict(err.trailing_metadata())
    if retry_ms is None:
        assert retry is None and RETRY_AFTER_MS not in trailers
    else:
        assert retry.retry_delay.ToMilliseconds() == retry_ms
        assert trailers[RETRY_AFTER_MS] == str(retry_ms)  # the older hint, beside RetryInfo
        assert retry_delay_ms(err.trailing_metadata()) == retry_ms


def test_the_limit_and_the_field_are_in_error_info(loopback):
    err = call(loopback, ResourceExhausted("blocks: 300 blocks, limit is 256", field="blocks", limit=256))
    info = details(rpc_status.from_call(err), error_details_pb2.ErrorInfo)
    assert dict(info.metadata) == {"field": "blocks", "limit": "256"}


def test_an_upstream_rich_status_is_relayed_byte_for_byte(loopback):
    peer = raised(lambda: require(False, "blocks[0].text", "must not be empty"))
    peer_status = peer.rich_status()
    relayed = UpstreamStatus(S.INVALID_ARGUMENT, str(peer),
                             ((STATUS_DETAILS_KEY, peer_status.SerializeToString()), ("x-peer", "1")))
    err = call(loopback, relayed)
    assert rpc_status.from_call(err) == peer_status
    assert dict(err.trailing_metadata())["x-peer"] == "1"


def test_malformed_request_bytes_are_invalid_argument_with_their_reason():
    def echo(request, context):
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), interceptors=[ErrorMappingInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Typed", {
        "Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=common_pb2.GenerateRequest.FromString,
            response_serializer=common_pb2.GenerateRequest.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/test.Typed/Echo")(b"\xff\xff\xff", timeout=5)
    finally:
        server.stop(0)
    assert err.value.code() == S.INVALID_ARGUMENT
    info = details(rpc_status.from_call(err.value), error_details_pb2.ErrorInfo)
    assert info.reason == "MALFORMED_REQUEST"


SECRET = "password=hunter2 at /srv/adaccel/secret.key"


def test_internal_errors_carry_the_trace_id_not_the_exception(traced_loopback, caplog):
    with caplog.at_level(logging.ERROR, logger="common.rpc.interceptors"):
        err = call(traced_loopback, RuntimeError(SECRET))
    assert err.code() == S.INTERNAL
    match = re.fullmatch(r"internal error \(trace ([0-9a-f]{32})\)", err.details())
    assert match, err.details()
    assert "hunter2" not in err.details() and "RuntimeError" not in err.details()
    info = details(rpc_status.from_call(err), error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("INTERNAL", {"trace_id": match.group(1)})
    (record,) = [r for r in caplog.records if r.getMessage() == "rpc crashed"]
    assert record.trace_id == match.group(1) and record.method == UNARY
    assert SECRET in record.exc_text  # the whole exception is in the log, for the operator


def test_internal_errors_without_a_span_carry_a_logged_error_id(loopback, caplog):
    with caplog.at_level(logging.ERROR, logger="common.rpc.interceptors"):
        err = call(loopback, KeyError(SECRET), streaming=True)
    match = re.fullmatch(r"internal error \(error id ([0-9a-f]{32})\)", err.details())
    assert err.code() == S.INTERNAL and match, err.details()
    info = details(rpc_status.from_call(err), error_details_pb2.ErrorInfo)
    assert dict(info.metadata) == {"error_id": match.group(1)}
    (record,) = [r for r in caplog.records if r.getMessage() == "rpc crashed"]
    assert record.error_id == match.group(1) and record.trace_id is None


def request_with(**kw) -> common_pb2.GenerateRequest:
    block = common_pb2.PromptBlock(id="b", kind=common_pb2.BLOCK_KIND_TEXT, text="t")
    return common_pb2.GenerateRequest(blocks=[block] * kw.pop("blocks", 1),
                                      params=common_pb2.GenerationParams(max_new_tokens=8), **kw)


def test_validation_fills_the_field_and_the_limit():
    with pytest.raises(ResourceExhausted) as err:
        validate_generate_request(request_with(blocks=300), RequestLimits())
    assert (err.value.reason, err.value.field, err.value.limit) == ("FIELD_TOO_LARGE", "blocks", 256)
    (violation,) = err.value.bad_request().field_violations
    assert (violation.field, violation.description) == ("blocks", "300 blocks, limit is 256")
    with pytest.raises(InvalidArgument) as err:
        validate_generate_request(request_with(pool_key="bad key"), RequestLimits())
    assert (err.value.reason, err.value.field) == ("INVALID_FIELD", "pool_key")
    with pytest.raises(InvalidArgument) as err:
        validate_generate_request(request_with(task="item knowledge"), RequestLimits())
    assert (err.value.reason, err.value.field) == ("INVALID_FIELD", "task")
    validate_generate_request(request_with(task="item_knowledge"), RequestLimits())


def test_every_reason_is_in_the_catalog_and_documented():
    readme = README.read_text()
    section = readme.split("## Error contract", 1)[1].split("\n## ", 1)[0]
    assert set(REASONS) == set(Reason)
    for reason, info in REASONS.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", reason)
        assert f"`{reason}`" in section, f"{reason} is not documented in README.md's Error contract"
        assert info.meaning and info.action
