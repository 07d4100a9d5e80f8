"""The router's failover policy: stream a request from one replica, retry it once elsewhere.

Rules, for a replica call that fails with status `code`:
- DEADLINE_EXCEEDED: final, DEADLINE_EXCEEDED (another replica has no more time).
- a code not in RETRYABLE (the replica judged the request, e.g. INVALID_ARGUMENT): final, the
  replica's own status passed on as it is (`UpstreamStatus`).
- a retryable code after the first chunk was streamed: final, UNAVAILABLE (the caller already
  has partial output; a second replica would repeat it).
- a retryable code before any chunk: the request goes to another replica, at most
  MAX_ATTEMPTS replicas in all. UNAVAILABLE also marks the replica failed until its next heartbeat.
When the attempts run out, or no untried healthy replica is left: RESOURCE_EXHAUSTED if every
replica tried refused for load (with the soonest retry hint among theirs), else UNAVAILABLE.

The policy knows replicas only through `ReplicaStreams` (choose one, open a stream, mark one
failed), so tests drive it with fakes and no servers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from common.rpc.errors import (
    DeadlineExceeded,
    Reason,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    UpstreamStatus,
    retry_delay_ms,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

# Codes after which another replica may succeed; anything else (bad input) is final.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})
MAX_ATTEMPTS = 2  # the first replica and one other


class ReplicaStreams(Protocol[T_co]):
    """The replicas of one request, as failover needs them."""

    def choose(self, tried: frozenset[str]) -> str | None:
        """The address of the replica to try next, none of `tried`; None when no healthy one is left."""

    def open(self, address: str, timeout_s: float) -> AbstractContextManager[Iterable[T_co]]:
        """The replica's stream of chunks, ended (cancelled if still running) when the block exits.
        Iterating it raises grpc.RpcError when the call fails."""

    def mark_failed(self, address: str) -> None:
        """The replica is unreachable: route no request to it until it answers again."""


@dataclass(slots=True, frozen=True)
class Failure:
    """One replica call that failed, as the router saw it."""

    address: str
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]
    streamed: bool  # chunks of it were already passed to the caller

    @classmethod
    def of(cls, address: str, exc: grpc.RpcError, *, streamed: bool) -> Failure:
        """From the error a failed call raised (a grpc.Call: code, details, trailing metadata)."""
        return cls(address, exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()), streamed)

    @property
    def retry_after_ms(self) -> int | None:
        """The replica's retry hint (RetryInfo, else trailer `retry-after-ms`), None without a valid one."""
        return retry_delay_ms(self.trailing_metadata)


def final_error(failure: Failure, *, attempt: int, busy: list[Failure]) -> ServiceError | None:
    """What to tell the caller after `failure` on attempt `attempt` (0-based), or None to try
    another replica. `busy`: the failures so far, this one included, that refused for load."""
    code = failure.code
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("deadline exceeded while generating")
    if code not in RETRYABLE:
        return UpstreamStatus(code, failure.details, failure.trailing_metadata)
    if failure.streamed:
        return Unavailable(f"decoder {failure.address} failed mid-stream ({code.name}): "
                           "partial output was sent; retry the request", reason=Reason.STREAM_INTERRUPTED)
    if attempt + 1 < MAX_ATTEMPTS:
        return None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return all_busy(busy)
    return Unavailable(f"decoders failed twice, last {failure.address}: {failure.details}",
                       reason=Reason.REPLICAS_FAILED)


def all_busy(busy: list[Failure]) -> ResourceExhausted:
    """Every replica tried refused for load: back-pressure to the caller, with the soonest hint."""
    hints = [f.retry_after_ms for f in busy if f.retry_after_ms is not None]
    return ResourceExhausted(f"all decoder replicas tried are busy ({busy[-1].details})",
                             retry_after_ms=min(hints) if hints else None, reason=Reason.ALL_REPLICAS_BUSY)


def stream_with_failover(replicas: ReplicaStreams[T], deadline: float, *,
                         clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """The chunks of one replica's answer, failing over as the module docstring says; raises a
    ServiceError when it gives up. `deadline`: the caller's, on `clock` (monotonic seconds)."""
    tried: set[str] = set()
    busy: list[Failure] = []
    for attempt in range(MAX_ATTEMPTS):
        address = replicas.choose(frozenset(tried))
        if address is None:
            if busy:
                raise all_busy(busy)
            raise Unavailable("no healthy decoder replica" + (" left to retry on" if tried else ""),
                              reason=Reason.NO_HEALTHY_REPLICA)
        tried.add(address)
        timeout_s = deadline - clock()
        if timeout_s <= 0:
            raise DeadlineExceeded("deadline passed before a replica answered")
        streamed = False
        try:
            with replicas.open(address, timeout_s) as stream:
                for chunk in stream:
                    streamed = True
                    yield chunk
            return
        except grpc.RpcError as exc:
            failure = Failure.of(address, exc, streamed=streamed)
            cause = exc
        if failure.code in RETRYABLE:
            if failure.code == grpc.StatusCode.UNAVAILABLE:
                replicas.mark_failed(address)
            if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not failure.streamed:
                busy.append(failure)
            log.warning("replica failed", extra={"replica": address, "code": failure.code.name,
                                                 "streamed": streamed, "attempt": attempt})
        error = final_error(failure, attempt=attempt, busy=busy)
        if error is not None:
            raise error from cause
