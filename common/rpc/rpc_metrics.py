"""Server interceptor recording `rpc.server.call.duration` (OTel semantic conventions, seconds).

The OpenTelemetry gRPC instrumentation traces calls but records no metrics, so the latency
histogram every service exports comes from here. Streaming calls are measured to their last
message. Sits outside the error-mapping interceptor, so mapped errors carry their final code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
from opentelemetry.metrics import Histogram, Meter

from common.telemetry import LATENCY_BUCKETS_S


def _status(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if failed else "OK"


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, meter: Meter):
        self.duration: Histogram = meter.create_histogram(
            "rpc.server.call.duration", unit="s",
            description="duration of incoming RPCs, to the last message sent",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)

    def _record(self, method: str, started: float, status: str) -> None:
        self.duration.record(time.perf_counter() - started, {
            "rpc.system.name": "grpc", "rpc.method": method, "rpc.response.status_code": status})

    def _unary(self, fn: Callable, method: str) -> Callable:
        def handler(request, context):
            started, failed = time.perf_counter(), False
            try:
                return fn(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                self._record(method, started, _status(context, failed))

        return handler

    def _stream(self, fn: Callable, method: str) -> Callable:
        def handler(request, context) -> Iterator:
            started, status = time.perf_counter(), None
            try:
                yield from fn(request, context)
            except GeneratorExit:
                status = "CANCELLED"  # the caller went away mid-stream
                raise
            except BaseException:
                status = _status(context, True)
                raise
            finally:
                self._record(method, started, status or _status(context, False))

        return handler

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")  # "adaccel.v1.Decoder/Generate"
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method))
        return handler
