"""Server interceptor that maps domain errors to rich statuses, for unary and streaming handlers.

A ServiceError aborts the call with its code, its message and its google.rpc.Status details
(common/rpc/errors.py); anything else is a bug: logged with the trace id, and the caller gets
INTERNAL with that id only, never the exception's text.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator

import grpc
from grpc_status import rpc_status
from opentelemetry import trace

from common.rpc.errors import STATUS_DETAILS_KEY, Internal, InvalidArgument, Reason, ServiceError

log = logging.getLogger(__name__)


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, None without a valid span."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def status_of(exc: ServiceError) -> grpc.Status:
    """The grpc.Status a ServiceError aborts with: code, message, the rich status in
    `grpc-status-details-bin`, and the error's own trailing metadata (e.g. `retry-after-ms`)."""
    status = rpc_status.to_status(exc.rich_status())
    extra = tuple((k, v) for k, v in exc.trailing_metadata if k != STATUS_DETAILS_KEY)
    return status._replace(trailing_metadata=tuple(status.trailing_metadata) + extra)


def abort_with(context: grpc.ServicerContext, exc: ServiceError) -> None:
    """Ends the call with `exc`'s rich status (raises, as context.abort does)."""
    context.abort_with_status(status_of(exc))


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        log.info("rpc failed", extra={"method": method, "code": exc.code.name, "reason": str(exc.reason),
                                      "detail": str(exc)})
        abort_with(context, exc)
    trace_id = current_trace_id()
    error_id = None if trace_id else uuid.uuid4().hex
    log.exception("rpc crashed", extra={"method": method, "trace_id": trace_id, "error_id": error_id})
    abort_with(context, Internal.logged_as(trace_id, error_id))


class MalformedRequest:
    """Stands in for a request whose bytes did not parse. gRPC turns a deserializer exception into
    INTERNAL ("Exception deserializing request!"); malformed wire data is bad input, so the
    handler wrapper raises InvalidArgument for it instead."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserialize: Callable | None, method: str) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, invalid UTF-8, ...
            return MalformedRequest(f"request: not a valid message for {method} ({type(exc).__name__}: {exc})")

    return parse


def _checked(request):
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(request.reason, reason=Reason.MALFORMED_REQUEST)
    return request


def _checked_stream(requests: Iterator) -> Iterator:
    for request in requests:
        yield _checked(request)


def _wrap_unary(fn: Callable, method: str, streamed_requests: bool = False) -> Callable:
    def handler(request, context):
        try:
            request = _checked_stream(request) if streamed_requests else _checked(request)
            return fn(request, context)
        except Exception as exc:  # noqa: BLE001 - the table decides
            if context.code() is not None and not isinstance(exc, ServiceError):
                raise  # already aborted by the handler itself
            _abort(context, method, exc)

    return handler


def _wrap_stream(fn: Callable, method: str, streamed_requests: bool = False) -> Callable:
    def handler(request, context) -> Iterator:
        try:
            request = _checked_stream(request) if streamed_requests else _checked(request)
            yield from fn(request, context)
        except Exception as exc:  # noqa: BLE001
            if context.code() is not None and not isinstance(exc, ServiceError):
                raise
            _abort(context, method, exc)

    return handler


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer, method))
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method, streamed_requests=True))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method, streamed_requests=True))
        return handler
