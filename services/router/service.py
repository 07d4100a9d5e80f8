"""Router gRPC servicer: validate at the edge, pick a replica, stream its reply back.

Failover: a replica that fails before anything was streamed gets the request retried once on
another replica; after the first chunk a failure is UNAVAILABLE (the caller saw partial output).
"""

from __future__ import annotations

import itertools
import logging
import time

import grpc

from adaccel.v1 import common_pb2, router_pb2, router_pb2_grpc
from common.blocks.routing_keys import request_blocks
from common.requests import RequestLimits, validate_generate_request
from common.rpc.errors import RETRY_AFTER_MS, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from services.router.replicas import ReplicaSet
from services.router.scheduling import AffinityWeights, Footprint, Policy, choose_replica

log = logging.getLogger(__name__)

# Codes after which another replica may succeed; anything else (bad input) is final.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, replicas: ReplicaSet, limits: RequestLimits, default_deadline_s: float, policy: Policy,
                 weights: AffinityWeights | None = None):
        self.replicas = replicas
        self.limits = limits
        self.default_deadline_s = default_deadline_s
        self.policy = policy
        self.weights = weights or AffinityWeights()
        self._turns = itertools.count()  # round robin: next() is atomic under the GIL

    def Generate(self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext):
        validate_generate_request(request, self.limits)
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self.default_deadline_s)
        tried: set[str] = set()
        footprint = Footprint(request_blocks(request.blocks), request.pool_key)
        turn = next(self._turns)
        busy: list[tuple[str, int | None]] = []  # (details, retry-after-ms) of replicas that refused for load
        for attempt in range(2):
            replica = choose_replica(self.replicas.views(), frozenset(tried), policy=self.policy,
                                     footprint=footprint, weights=self.weights, turn=turn)
            if replica is None:
                if busy:
                    raise all_busy(busy)
                raise Unavailable("no healthy decoder replica" + (" left to retry on" if tried else ""))
            tried.add(replica.address)
            streamed = False
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("deadline passed before a replica answered")
            self.replicas.track(replica.address, +1)
            self.replicas.note_routed(replica.address, footprint)
            call = self.replicas.replicas[replica.address].stub.Generate(request, timeout=timeout)
            try:
                for chunk in call:
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
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy.append((exc.details(), retry_after_ms(exc)))
                    if attempt == 1:
                        raise all_busy(busy) from exc
                elif attempt == 1:
                    raise Unavailable(f"decoders failed twice, last {replica.address}: {exc.details()}") from exc
            finally:
                stop_call(call)
                self.replicas.track(replica.address, -1)

    def Info(self, request, context):
        states = [
            router_pb2.ReplicaState(address=v.address, healthy=v.healthy, queue_depth=v.queue_depth,
                                    decoder_id=self.replicas.replicas[v.address].decoder_id,
                                    tokens_in_flight=v.tokens_in_flight, held_blocks=len(v.block_keys),
                                    pool_keys=sorted(v.pool_keys))
            for v in self.replicas.views()
        ]
        return router_pb2.RouterInfo(replicas=states, policy=self.policy)


def stop_call(call) -> None:
    """Ends a decoder call (a no-op once it finished), so a caller that left stops the decoder's work.
    Behind the tracing interceptor the call is a generator; closing it drops the underlying call,
    which gRPC cancels."""
    if isinstance(call, grpc.Future):
        call.cancel()
    else:
        call.close()


def retry_after_ms(exc: grpc.RpcError) -> int | None:
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_MS:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def all_busy(busy: list[tuple[str, int | None]]) -> ResourceExhausted:
    """Every replica tried refused for load: back-pressure to the caller, with the soonest hint."""
    hints = [ms for _, ms in busy if ms is not None]
    return ResourceExhausted(f"all decoder replicas tried are busy ({busy[-1][0]})",
                             retry_after_ms=min(hints) if hints else None)
