"""Router gRPC servicer: validate at the edge, pick a replica, stream its reply back.

Failover: a replica that fails before anything was streamed gets the request retried once on
another replica; after the first chunk a failure is UNAVAILABLE (the caller saw partial output).
"""

from __future__ import annotations

import logging
import time

import grpc

from adaccel.v1 import common_pb2, router_pb2, router_pb2_grpc
from common.requests import RequestLimits, validate_generate_request
from common.rpc.errors import DeadlineExceeded, ServiceError, Unavailable
from services.router.replicas import ReplicaSet
from services.router.scheduling import choose_replica

log = logging.getLogger(__name__)

# Codes after which another replica may succeed; anything else (bad input) is final.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, replicas: ReplicaSet, limits: RequestLimits, default_deadline_s: float, policy: str):
        self.replicas = replicas
        self.limits = limits
        self.default_deadline_s = default_deadline_s
        self.policy = policy

    def Generate(self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext):
        validate_generate_request(request, self.limits)
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self.default_deadline_s)
        tried: set[str] = set()
        for attempt in range(2):
            replica = choose_replica(self.replicas.views(), frozenset(tried))
            if replica is None:
                raise Unavailable("no healthy decoder replica" + (" left to retry on" if tried else ""))
            tried.add(replica.address)
            streamed = False
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("deadline passed before a replica answered")
            self.replicas.track(replica.address, +1)
            try:
                stub = self.replicas.replicas[replica.address].stub
                for chunk in stub.Generate(request, timeout=timeout):
                    streamed = True
                    yield chunk
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded("deadline exceeded while generating") from exc
                if code not in RETRYABLE:
                    error = ServiceError(exc.details())
                    error.code = code
                    raise error from exc
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.replicas.mark_failed(replica.address)
                log.warning("replica failed", extra={"replica": replica.address, "code": code.name,
                                                     "streamed": streamed, "attempt": attempt})
                if streamed:
                    raise Unavailable(f"decoder {replica.address} failed mid-stream ({code.name}): "
                                      "partial output was sent; retry the request") from exc
                if attempt == 1:
                    raise Unavailable(f"decoders failed twice, last {replica.address}: {exc.details()}") from exc
            finally:
                self.replicas.track(replica.address, -1)

    def Info(self, request, context):
        states = [
            router_pb2.ReplicaState(address=v.address, healthy=v.healthy, queue_depth=v.queue_depth,
                                    decoder_id=self.replicas.replicas[v.address].decoder_id)
            for v in self.replicas.views()
        ]
        return router_pb2.RouterInfo(replicas=states, policy=self.policy)
