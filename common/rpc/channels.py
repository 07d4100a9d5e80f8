"""Client channels to other adaccel services, traced and with the same message size limits."""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.trace import TracerProvider

from common.settings import MiB


def open_channel(address: str, *, tracer_provider: TracerProvider | None = None,
                 max_message_bytes: int = 64 * MiB) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Fail fast instead of queueing behind a reconnect backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    channel = grpc.insecure_channel(address, options=options)
    # OTel's interceptor has its own channel wrapper (it is not a grpc.*ClientInterceptor).
    return intercept_channel(channel, client_interceptor(tracer_provider=tracer_provider))


def health_status(channel: grpc.Channel, service: str, timeout_s: float = 1.0) -> str:
    """'SERVING', 'NOT_SERVING', ... or 'UNREACHABLE' when the call itself fails."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    except grpc.RpcError:
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
