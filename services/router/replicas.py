"""The router's soft state: which decoder replicas exist, whether they answer, their load, and
which prompt blocks and pools they hold (learned from their reports, see scheduling.py)."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import grpc

from adaccel.v1 import decoder_pb2, decoder_pb2_grpc
from common.rpc.channels import open_channel
from common.rpc.security import ClientSecurity
from services.router.scheduling import AffinityWeights, Footprint, ReplicaView, uncached_tokens

log = logging.getLogger(__name__)

# Keys remembered per replica from requests routed to it since its last reports (bounded).
MAX_ROUTED_KEYS = 8192


class Replica:
    def __init__(self, address: str, tracer_provider, max_message_bytes: int, security: ClientSecurity | None = None):
        self.address = address
        self.channel = open_channel(address, tracer_provider=tracer_provider, max_message_bytes=max_message_bytes,
                                    security=security)
        self.stub = decoder_pb2_grpc.DecoderStub(self.channel)
        self.healthy = False
        self.decoder_id = ""
        self.queue_depth = 0
        self.tokens_in_flight = 0
        self.prefill_tokens_pending = 0
        self.block_keys: frozenset[int] = frozenset()
        self.pool_keys: frozenset[str] = frozenset()
        # Whether it ever reported a held block: only then does it cache blocks, and only then are
        # the blocks of requests routed to it expected to be held there soon.
        self.caches_blocks = False
        # Requests this router sent and has not seen finish: load known before the next heartbeat.
        self.local_inflight = 0
        # This router's requests opened minus closed since the last report: the reported depth,
        # up to a heartbeat old, is corrected by them (a replica that just finished a request is
        # not still taken for busy, which sent the next request to the other one, every time).
        self.opened_since_report = 0
        # This router's requests sent here since the replica's last report and not yet past their
        # prefill (no chunk back): call id -> (estimated prefill tokens, sent at). A burst routed
        # between heartbeats is seen as queued work at once; a report asked after a request was
        # sent speaks for it, and its first chunk says its prefill is done.
        self.prefilling: dict[int, tuple[float, float]] = {}
        # Blocks and pools of requests routed here, with the time: the replica holds them once
        # it prefilled, before its next report says so; dropped when reports should cover them.
        self.routed_blocks: dict[int, float] = {}
        self.routed_pools: dict[str, float] = {}

    @property
    def estimated_depth(self) -> int:
        """Requests on the replica now: its last report, plus what this router opened there and
        minus what it saw finish since; never below this router's own in flight there."""
        return max(self.local_inflight, self.queue_depth + self.opened_since_report, 0)

    def view(self) -> ReplicaView:
        blocks = self.block_keys
        if self.caches_blocks and self.routed_blocks:
            blocks = blocks | self.routed_blocks.keys()
        pools = self.pool_keys | self.routed_pools.keys() if self.routed_pools else self.pool_keys
        pending = self.prefill_tokens_pending + round(sum(tokens for tokens, _ in self.prefilling.values()))
        return ReplicaView(self.address, self.healthy, self.estimated_depth,
                           self.tokens_in_flight, frozenset(blocks), frozenset(pools), pending)

    def forget_routed_before(self, cutoff: float) -> None:
        for routed in (self.routed_blocks, self.routed_pools):
            stale = [k for k, t in routed.items() if t < cutoff]
            for key in stale:
                del routed[key]


class ReplicaSet:
    def __init__(self, addresses: list[str], *, heartbeat_s: float, tracer_provider=None,
                 max_message_bytes: int = 64 << 20, security: ClientSecurity | None = None):
        self.replicas = {a: Replica(a, tracer_provider, max_message_bytes, security) for a in addresses}
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self.on_change = None  # called with the number of healthy replicas
        self._call_ids = itertools.count()

    def start(self) -> None:
        self.poll_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for replica in self.replicas.values():
            replica.channel.close()

    def views(self) -> list[ReplicaView]:
        with self._lock:
            return [r.view() for r in self.replicas.values()]

    def mark_failed(self, address: str) -> None:
        with self._lock:
            self.replicas[address].healthy = False

    def track(self, address: str, delta: int) -> None:
        with self._lock:
            replica = self.replicas[address]
            replica.local_inflight += delta
            replica.opened_since_report += delta

    def note_routed(self, address: str, footprint: Footprint, weights: AffinityWeights) -> int:
        """Remembers the request's blocks and pool on the replica it was sent to, and its prefill
        as queued work there (estimated before its blocks count as held); returns the id to end
        that with (`prefill_done`)."""
        now = time.monotonic()
        call_id = next(self._call_ids)
        with self._lock:
            replica = self.replicas[address]
            replica.prefilling[call_id] = (uncached_tokens(replica.view(), footprint, weights), now)
            routed = [*footprint.blocks.weights, *(key for key, _ in footprint.blocks.prefix)]
            if len(replica.routed_blocks) + len(routed) > MAX_ROUTED_KEYS:
                replica.routed_blocks.clear()
            replica.routed_blocks.update(dict.fromkeys(routed, now))
            if footprint.pool_key:
                replica.routed_pools[footprint.pool_key] = now
        return call_id

    def prefill_done(self, address: str, call_id: int) -> None:
        """The call's first chunk came back (or it ended): its prefill is no longer queued work."""
        with self._lock:
            self.replicas[address].prefilling.pop(call_id, None)

    def poll_once(self) -> None:
        for replica in self.replicas.values():
            asked = time.monotonic()
            try:
                report = replica.stub.Report(decoder_pb2.DecoderReportRequest(), timeout=self.heartbeat_s)
            except grpc.RpcError as exc:
                if replica.healthy:
                    log.warning("replica unreachable", extra={"replica": replica.address, "code": exc.code().name})
                with self._lock:
                    replica.healthy = False
                continue
            with self._lock:
                replica.healthy = True
                replica.decoder_id = report.decoder_id
                replica.queue_depth = report.queue_depth
                replica.opened_since_report = 0
                replica.tokens_in_flight = report.tokens_in_flight
                replica.prefill_tokens_pending = report.prefill_tokens_pending
                replica.prefilling = {k: v for k, v in replica.prefilling.items() if v[1] >= asked}
                replica.block_keys = frozenset(report.block_keys)
                replica.pool_keys = frozenset(report.pool_keys)
                replica.caches_blocks = replica.caches_blocks or bool(report.block_keys)
                # A request routed a heartbeat before this report was asked for has prefilled by
                # now (or its blocks were not kept): the report speaks for it.
                replica.forget_routed_before(asked - self.heartbeat_s)
        if self.on_change is not None:
            self.on_change(sum(1 for r in self.views() if r.healthy))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.poll_once()
