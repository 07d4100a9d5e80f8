"""Server interceptor that maps domain errors to status codes, for unary and streaming handlers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc

from common.rpc.errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        log.info("rpc failed", extra={"method": method, "code": exc.code.name, "detail": str(exc)})
        if exc.trailing_metadata:
            context.set_trailing_metadata(exc.trailing_metadata)
        context.abort(exc.code, str(exc))
    log.exception("rpc crashed", extra={"method": method})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


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
        raise InvalidArgument(request.reason)
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
