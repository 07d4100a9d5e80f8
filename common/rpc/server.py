"""The one way every adaccel service builds, runs and stops its gRPC server.

Every server gets the stock health service (the named service NOT_SERVING until the service
says it is ready, and again on shutdown), server reflection, OpenTelemetry tracing, the error
interceptor, message size limits from settings, a graceful stop on SIGTERM/SIGINT, and a dump of
every thread's stack on SIGUSR1.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import server_interceptor

from common.rpc.interceptors import ErrorMappingInterceptor
from common.rpc.rpc_metrics import RpcMetricsInterceptor
from common.rpc.security import caller_check_interceptor, server_credentials
from common.settings import ServiceSettings
from common.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerHandle:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]
    # Called (in order) after the server stopped: close DBs, stop consumers, flush producers.
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in self.service_names:
            self.health.set(name, status)
        # The empty name is liveness: the process answers; it stays SERVING until shutdown.
        self.health.set("", SERVING)

    def stop(self, grace_s: float) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Refuse new work (readiness fails) but let in-flight calls finish within the grace.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        for fn in self.on_stop:
            try:
                fn()
            except Exception:  # noqa: BLE001 - stopping must go on
                log.exception("stop hook failed")

    def wait(self) -> None:
        self.server.wait_for_termination()


def create_server(
    settings: ServiceSettings,
    telemetry: Telemetry,
    register: Sequence[tuple[Callable[[object, grpc.Server], None], object]],
    service_names: Sequence[str],
) -> ServerHandle:
    """Builds and starts a server. `register` pairs generated add_*_to_server functions with servicers."""
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # Tracing outermost, then RPC latency (refused calls counted too), then the caller check (a
    # refused call never reaches a handler), then errors.
    caller_check = caller_check_interceptor(settings)
    interceptors = [server_interceptor(tracer_provider=telemetry.tracer_provider),
                    RpcMetricsInterceptor(telemetry.meter("adaccel.rpc")),
                    *([caller_check] if caller_check is not None else []), ErrorMappingInterceptor()]
    credentials = server_credentials(settings)  # raises on incomplete TLS settings before binding
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=options,
    )
    for add_fn, servicer in register:
        add_fn(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    listen = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    server.start()
    handle = ServerHandle(server=server, port=port, health=health_servicer, service_names=service_names)
    for name in service_names:
        health_servicer.set(name, NOT_SERVING)
    health_servicer.set("", SERVING)
    if settings.port_file is not None:
        settings.port_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = settings.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(settings.port_file)
    log.info("listening", extra={"port": port, "services": list(service_names), "tls": credentials is not None,
                                 "mutual_tls": settings.tls_client_ca_file is not None,
                                 "caller_check": caller_check is not None})
    return handle


def run_until_signalled(handle: ServerHandle, grace_s: float) -> None:
    """Blocks until SIGTERM or SIGINT, then stops gracefully (main thread only)."""
    stop_requested = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the log): how a stuck background
    # loop is found in a running pod without a debugger.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    while not stop_requested.wait(0.5):
        pass
    handle.stop(grace_s)
