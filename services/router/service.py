"""Router gRPC servicer: validate at the edge, pick a replica, stream its reply back.

Failover (services/router/failover.py): a replica that fails before anything was streamed gets
the request retried once on another replica; after the first chunk a failure is UNAVAILABLE (the
caller saw partial output).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from adaccel.v1 import common_pb2, router_pb2, router_pb2_grpc
from common.blocks.routing_keys import request_blocks
from common.requests import RequestLimits, validate_generate_request
from common.rpc.block_kinds import kinds_and_texts
from common.rpc.errors import Reason, ResourceExhausted
from services.router.failover import stream_with_failover
from services.router.replicas import ReplicaSet
from services.router.scheduling import AffinityWeights, Footprint, Policy, choose_replica


class StreamSlots:
    """At most `limit` Generate streams at once (0: unbounded). The router is a synchronous gRPC
    server, one thread per stream: a stream past its threads would wait in grpc's queue, where no
    caller, metric or autoscaler sees it; past the cap it gets RESOURCE_EXHAUSTED with a retry hint
    at once instead."""

    def __init__(self, limit: int, retry_after_ms: int = 200):
        self.limit = limit
        self.retry_after_ms = retry_after_ms
        self.in_use = 0
        self.refused = 0
        self._lock = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self.limit and self.in_use >= self.limit:
                self.refused += 1
                raise ResourceExhausted(f"router busy: {self.in_use} streams open, limit max_streams={self.limit}; "
                                        f"retry after ~{self.retry_after_ms} ms",
                                        retry_after_ms=self.retry_after_ms, reason=Reason.STREAM_LIMIT,
                                        limit=self.limit)
            self.in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= 1


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, replicas: ReplicaSet, limits: RequestLimits, default_deadline_s: float, policy: Policy,
                 weights: AffinityWeights | None = None, max_streams: int = 0):
        self.streams = StreamSlots(max_streams)
        self.replicas = replicas
        self.limits = limits
        self.default_deadline_s = default_deadline_s
        self.policy = policy
        self.weights = weights or AffinityWeights()
        self._turns = itertools.count()  # round robin: next() is atomic under the GIL

    def Generate(self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext):
        validate_generate_request(request, self.limits)
        with self.streams.held():
            remaining = context.time_remaining()
            deadline = time.monotonic() + (remaining if remaining is not None else self.default_deadline_s)
            streams = DecoderStreams(self.replicas, request, policy=self.policy, weights=self.weights,
                                     turn=next(self._turns))
            yield from stream_with_failover(streams, deadline)

    def Info(self, request, context):
        states = [
            router_pb2.ReplicaState(address=v.address, healthy=v.healthy, queue_depth=v.queue_depth,
                                    decoder_id=self.replicas.replicas[v.address].decoder_id,
                                    tokens_in_flight=v.tokens_in_flight, held_blocks=len(v.block_keys),
                                    pool_keys=sorted(v.pool_keys), prefill_tokens_pending=v.prefill_tokens_pending)
            for v in self.replicas.views()
        ]
        return router_pb2.RouterInfo(replicas=states, policy=self.policy)


class DecoderStreams:
    """One request's decoder replicas, for failover: chosen by the scheduling policy; a call is
    counted in flight on its replica (and the request's blocks and pool noted there) while open."""

    def __init__(self, replicas: ReplicaSet, request: common_pb2.GenerateRequest, *, policy: Policy,
                 weights: AffinityWeights, turn: int):
        self.replicas = replicas
        self.request = request
        self.policy = policy
        self.weights = weights
        self.turn = turn
        self.footprint = Footprint(request_blocks(kinds_and_texts(request.blocks)), request.pool_key)

    def choose(self, tried: frozenset[str]) -> str | None:
        replica = choose_replica(self.replicas.views(), tried, policy=self.policy, footprint=self.footprint,
                                 weights=self.weights, turn=self.turn)
        return None if replica is None else replica.address

    @contextmanager
    def open(self, address: str, timeout_s: float) -> Iterator[Iterator[common_pb2.GenerateChunk]]:
        self.replicas.track(address, +1)
        call_id = self.replicas.note_routed(address, self.footprint, self.weights)
        call = None
        try:
            call = self.replicas.replicas[address].stub.Generate(self.request, timeout=timeout_s)
            yield self._marking_prefill_done(call, address, call_id)
        finally:
            if call is not None:
                stop_call(call)
            self.replicas.prefill_done(address, call_id)
            self.replicas.track(address, -1)

    def _marking_prefill_done(self, call, address: str, call_id: int) -> Iterator[common_pb2.GenerateChunk]:
        """The call's chunks; the first one says the replica has prefilled this request."""
        chunks = iter(call)
        for chunk in chunks:
            self.replicas.prefill_done(address, call_id)
            yield chunk
            break
        yield from chunks

    def mark_failed(self, address: str) -> None:
        self.replicas.mark_failed(address)


def stop_call(call) -> None:
    """Ends a decoder call (a no-op once it finished), so a caller that left stops the decoder's work.
    Behind the tracing interceptor the call is a generator; closing it drops the underlying call,
    which gRPC cancels."""
    if isinstance(call, grpc.Future):
        call.cancel()
    else:
        call.close()
