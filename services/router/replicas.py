"""The router's soft state: which decoder replicas exist, whether they answer, and their load."""

from __future__ import annotations

import logging
import threading

import grpc

from adaccel.v1 import decoder_pb2, decoder_pb2_grpc
from common.rpc.channels import open_channel
from services.router.scheduling import ReplicaView

log = logging.getLogger(__name__)


class Replica:
    def __init__(self, address: str, tracer_provider, max_message_bytes: int):
        self.address = address
        self.channel = open_channel(address, tracer_provider=tracer_provider, max_message_bytes=max_message_bytes)
        self.stub = decoder_pb2_grpc.DecoderStub(self.channel)
        self.healthy = False
        self.decoder_id = ""
        self.queue_depth = 0
        self.tokens_in_flight = 0
        # Requests this router sent and has not seen finish: load known before the next heartbeat.
        self.local_inflight = 0

    def view(self) -> ReplicaView:
        return ReplicaView(self.address, self.healthy, max(self.queue_depth, self.local_inflight),
                           self.tokens_in_flight)


class ReplicaSet:
    def __init__(self, addresses: list[str], *, heartbeat_s: float, tracer_provider=None,
                 max_message_bytes: int = 64 << 20):
        self.replicas = {a: Replica(a, tracer_provider, max_message_bytes) for a in addresses}
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self.on_change = None  # called with the number of healthy replicas

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
            self.replicas[address].local_inflight += delta

    def poll_once(self) -> None:
        for replica in self.replicas.values():
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
                replica.tokens_in_flight = report.tokens_in_flight
        if self.on_change is not None:
            self.on_change(sum(1 for r in self.views() if r.healthy))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.poll_once()
