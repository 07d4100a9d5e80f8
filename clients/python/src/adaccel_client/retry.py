"""When the client retries a failed call, and how long it waits first.

Retried: RESOURCE_EXHAUSTED and UNAVAILABLE, the router's codes for load and for replicas that
are down, and only before any output arrived. The wait is the server's own retry delay
(RetryInfo, else the `retry-after-ms` trailer) plus a little jitter so that the callers it
refused do not come back all at once; without one, exponential backoff with jitter. Attempts are
bounded (`max_retries`), and no retry is made whose wait would end past the caller's deadline:
the last error is raised instead, with its retry delay, for the caller to decide.

Not retried:
- anything after the first delta: a Generate stream cannot be resumed, only started over, so a
  retry would stream the already delivered tokens again (duplicates, and with sampling maybe
  different ones); the error says output_started, and the partial output is the caller's to drop;
- INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ... and DEADLINE_EXCEEDED: the same request
  fails the same way (the deadline is the caller's budget, spent);
- RESOURCE_EXHAUSTED about the request itself rather than the load (a field over a size limit,
  a request larger than a decoder's whole KV budget): unchanged, it is refused again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from adaccel_client.errors import AdaccelError

RETRYABLE_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
# ErrorInfo reasons of RESOURCE_EXHAUSTED that are about the request, not the load.
REQUEST_TOO_LARGE_REASONS = frozenset({"FIELD_TOO_LARGE", "KV_REQUEST_TOO_LARGE"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """max_retries: attempts after the first (0: never retry). Backoff without a server delay:
    initial_backoff_s * multiplier**n, at most max_backoff_s, each drawn in [half of it, all of
    it]. A server delay d is waited as d * (1 + U[0, jitter])."""

    max_retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.jitter < 0:
            raise ValueError("RetryPolicy: max_retries, backoffs and jitter must not be negative")
        if self.multiplier < 1:
            raise ValueError("RetryPolicy: multiplier must be at least 1")

    @staticmethod
    def retryable(error: AdaccelError) -> bool:
        """Whether the error allows a retry at all (before any output)."""
        if error.output_started or error.code not in RETRYABLE_CODES:
            return False
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return error.reason not in REQUEST_TOO_LARGE_REASONS and not error.field_violations
        return True

    def delay_s(self, error: AdaccelError, retry: int, rng: random.Random) -> float:
        """The wait before retry number `retry` (0-based)."""
        if error.retry_delay_s is not None:
            return error.retry_delay_s * (1.0 + rng.uniform(0.0, self.jitter))
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        return rng.uniform(base / 2, base)

    def next_delay_s(self, error: AdaccelError, *, attempts: int, now: float, deadline: float | None,
                     rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or None: raise `error`. `attempts`: made so
        far; `deadline`: on the clock of `now`, None for none."""
        if attempts > self.max_retries or not self.retryable(error):
            return None
        delay = self.delay_s(error, attempts - 1, rng)
        if deadline is not None and now + delay >= deadline:
            return None
        return delay


NO_RETRIES = RetryPolicy(max_retries=0)
