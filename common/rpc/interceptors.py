"""Server interceptor that maps domain errors to status codes, for unary and streaming handlers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc

from common.rpc.errors import ServiceError

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        log.info("rpc failed", extra={"method": method, "code": exc.code.name, "detail": str(exc)})
        context.abort(exc.code, str(exc))
    log.exception("rpc crashed", extra={"method": method})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _wrap_unary(fn: Callable, method: str) -> Callable:
    def handler(request, context):
        try:
            return fn(request, context)
        except Exception as exc:  # noqa: BLE001 - the table decides
            if context.code() is not None and not isinstance(exc, ServiceError):
                raise  # already aborted by the handler itself
            _abort(context, method, exc)

    return handler


def _wrap_stream(fn: Callable, method: str) -> Callable:
    def handler(request, context) -> Iterator:
        try:
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
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method))
        return handler
