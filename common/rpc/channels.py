"""Client channels to other adaccel services, traced and with the same message size limits."""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.trace import TracerProvider

from common.rpc.security import ClientSecurity
from common.settings import MiB


def open_channel(address: str, *, tracer_provider: TracerProvider | None = None,
                 max_message_bytes: int = 64 * MiB, security: ClientSecurity | None = None) -> grpc.Channel:
    """A traced channel; TLS (and a client certificate) when `security` carries credentials."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Fail fast instead of queueing behind a reconnect backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if security is not None and security.credentials is not None:
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, security.credentials, options=options)
    else:
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
