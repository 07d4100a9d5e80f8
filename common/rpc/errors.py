"""Domain errors and the one table that maps them to gRPC status codes.

Core code raises these; the shared interceptor turns them into statuses. Anything else that
escapes a handler is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Sent as the status's trailing metadata (e.g. a retry hint).
    trailing_metadata: tuple[tuple[str, str], ...] = ()


class InvalidArgument(ServiceError):
    """A request field is malformed or out of range; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    """Over a size or capacity limit; the message names the limit (and a retry hint when useful)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_ms: int | None = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        if retry_after_ms is not None:
            self.trailing_metadata = ((RETRY_AFTER_MS, str(int(retry_after_ms))),)


# Trailing-metadata key of a RESOURCE_EXHAUSTED status: milliseconds after which a retry may succeed.
RETRY_AFTER_MS = "retry-after-ms"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UpstreamStatus(ServiceError):
    """A peer's failure passed on as it is: its status code, details and trailing metadata (a
    retry hint, say). For the peer's own verdicts on a request, e.g. a decoder's INVALID_ARGUMENT
    relayed by the router; the table maps it to that same code."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()):
        if code == grpc.StatusCode.OK:
            raise ValueError("UpstreamStatus: code OK is not a failure")
        super().__init__(details)
        self.code = code
        self.trailing_metadata = tuple(trailing_metadata)


def require(condition: bool, field: str, message: str) -> None:
    """Validation helper: raises InvalidArgument('<field>: <message>') unless condition holds."""
    if not condition:
        raise InvalidArgument(f"{field}: {message}")
