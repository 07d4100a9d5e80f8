"""A steady stream of generation requests through the router, and what became of each one."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from adaccel.v1 import common_pb2, router_pb2_grpc
from common.rpc.channels import open_channel

# Answers a caller can act on during a fault: retry elsewhere or later.
CLEAR_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})
POOL_KEYS = ("shop/audio", "shop/shoes", "books")


def generate_request(i: int, max_new_tokens: int) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=f"fault-{i}", pool_key=POOL_KEYS[i % len(POOL_KEYS)], publish=True,
        blocks=[common_pb2.PromptBlock(id="instr-1", kind=common_pb2.BLOCK_KIND_INSTRUCTION,
                                       text="Write the selling points of this item.\n"),
                common_pb2.PromptBlock(id=f"item-{i % 7}", kind=common_pb2.BLOCK_KIND_ITEM,
                                       text=f"Item {i % 7}: wireless, {10 + i % 7} h battery.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens))


@dataclass(slots=True)
class Result:
    started: float
    elapsed_s: float
    code: grpc.StatusCode
    details: str


@dataclass
class RequestLog:
    deadline_s: float
    results: list[Result] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: Result) -> None:
        with self._lock:
            self.results.append(result)

    def since(self, t0: float) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.started >= t0]

    @staticmethod
    def summary(results: list[Result], deadline_s: float) -> dict:
        ok = sum(r.code == grpc.StatusCode.OK for r in results)
        clean = sum(r.code in CLEAR_FAILURES for r in results)
        # Hung: no answer before the deadline (the client gave up), or an answer later than it.
        hung = sum(r.code == grpc.StatusCode.DEADLINE_EXCEEDED or r.elapsed_s > deadline_s + 1.0 for r in results)
        other = [f"{r.code.name}: {r.details}" for r in results
                 if r.code != grpc.StatusCode.OK and r.code not in CLEAR_FAILURES
                 and r.code != grpc.StatusCode.DEADLINE_EXCEEDED]
        return {"requests": len(results), "ok": ok, "failed_cleanly": clean, "hung": hung, "unclear": other,
                "max_elapsed_s": max((r.elapsed_s for r in results), default=0.0),
                "max_failure_s": max((r.elapsed_s for r in results if r.code != grpc.StatusCode.OK), default=0.0)}


class SteadyStream:
    """`clients` threads, each sending one request after another (with a short pause) until stopped."""

    def __init__(self, router_address: str, *, clients: int = 2, deadline_s: float = 10.0,
                 max_new_tokens: int = 4, pause_s: float = 0.05):
        self.router_address = router_address
        self.clients = clients
        self.max_new_tokens = max_new_tokens
        self.pause_s = pause_s
        self.log = RequestLog(deadline_s)
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._counter = 0
        self._counter_lock = threading.Lock()

    def __enter__(self) -> SteadyStream:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, name=f"stream-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.log.deadline_s + 5)

    def _next_id(self) -> int:
        with self._counter_lock:
            self._counter += 1
            return self._counter

    def _client(self) -> None:
        channel = open_channel(self.router_address)
        stub = router_pb2_grpc.RouterStub(channel)
        try:
            while not self._stop.is_set():
                if not self._running.is_set():
                    self._idle.release()
                    while not self._running.wait(0.1) and not self._stop.is_set():
                        pass
                    continue
                i = self._next_id()
                started = time.monotonic()
                try:
                    chunks = list(stub.Generate(generate_request(i, self.max_new_tokens), timeout=self.log.deadline_s))
                    code, details = grpc.StatusCode.OK, ""
                    if not chunks or not chunks[-1].HasField("summary"):
                        code, details = grpc.StatusCode.DATA_LOSS, "stream ended without a summary"
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                self.log.add(Result(started, time.monotonic() - started, code, details))
                self._stop.wait(self.pause_s)
        finally:
            channel.close()

    def pause(self) -> None:
        """Returns once every client finished its request in flight and sends no more."""
        self._running.clear()
        for _ in self._threads:
            self._idle.acquire(timeout=self.log.deadline_s + 5)

    def resume(self) -> None:
        self._running.set()

    def wait_for_successes(self, n: int, after: float, timeout_s: float) -> bool:
        """True once `n` requests started after `after` have succeeded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(r.code == grpc.StatusCode.OK for r in self.log.since(after)) >= n:
                return True
            time.sleep(0.1)
        return False
