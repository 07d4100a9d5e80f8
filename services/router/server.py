from __future__ import annotations

from adaccel.v1 import router_pb2, router_pb2_grpc
from common.requests import RequestLimits
from common.rpc.security import client_security
from common.rpc.server import ServerHandle, create_server
from common.telemetry import Telemetry
from services.router.metrics import observe_router
from services.router.replicas import ReplicaSet
from services.router.scheduling import AffinityWeights
from services.router.service import RouterService
from services.router.settings import RouterSettings

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


def create_router_server(settings: RouterSettings, telemetry: Telemetry) -> ServerHandle:
    replicas = ReplicaSet(settings.decoder_addrs, heartbeat_s=settings.heartbeat_s,
                          tracer_provider=telemetry.tracer_provider, max_message_bytes=settings.max_message_bytes,
                          security=client_security(settings))
    limits = RequestLimits(max_blocks=settings.max_blocks, max_new_tokens=settings.max_new_tokens)
    weights = AffinityWeights(block_weight=settings.affinity_block_weight, pool_weight=settings.affinity_pool_weight,
                              request_tokens=settings.affinity_request_tokens,
                              chars_per_token=settings.chars_per_token, tokens_per_request=settings.tokens_per_request)
    servicer = RouterService(replicas, limits, settings.default_deadline_s, policy=settings.scheduling_policy,
                             weights=weights, max_streams=settings.stream_cap)
    observe_router(telemetry.meter("adaccel.router"), servicer.streams, replicas)
    handle = create_server(settings, telemetry, [(router_pb2_grpc.add_RouterServicer_to_server, servicer)],
                           [SERVICE_NAME])
    # Serving while at least one decoder answers its heartbeat.
    replicas.on_change = lambda healthy: handle.set_serving(healthy > 0)
    replicas.start()
    handle.on_stop.append(replicas.stop)
    return handle
