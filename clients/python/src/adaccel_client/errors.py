"""AdaccelError: a failed call, with what the server's rich status says about it.

The router ends a failed call with a status code and message, and `google.rpc.Status` details in
the trailer `grpc-status-details-bin`: ErrorInfo (a stable `reason`, domain "adaccel.v1",
metadata), BadRequest (the request fields at fault) and RetryInfo (how long to wait before a
retry may succeed). Older servers send the retry delay only as the trailer `retry-after-ms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# Trailing-metadata key of the older retry hint: milliseconds.
RETRY_AFTER_MS = "retry-after-ms"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """A request field at fault (BadRequest), e.g. ("blocks[0].id", "must not be empty")."""

    field: str
    description: str


class AdaccelError(Exception):
    """A call that failed: its gRPC status code and message, the ErrorInfo reason (e.g.
    "STREAM_LIMIT", "INVALID_FIELD"; "" when the server sent none), the field violations, the
    server's retry delay in seconds (None without one), how many attempts the client made, and
    whether output had started streaming before the failure (then the partial output is void)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "", domain: str = "",
                 metadata: Mapping[str, str] | None = None, field_violations: tuple[FieldViolation, ...] = (),
                 retry_delay_s: float | None = None, attempts: int = 1, output_started: bool = False):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations = tuple(field_violations)
        self.retry_delay_s = retry_delay_s
        self.attempts = attempts
        self.output_started = output_started

    def __reduce__(self):  # picklable despite keyword-only arguments
        return _rebuild, (self.code, self.message, self.reason, self.domain, dict(self.metadata),
                          self.field_violations, self.retry_delay_s, self.attempts, self.output_started)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, attempts: int = 1,
                       output_started: bool = False) -> AdaccelError:
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        message = (error.details() if callable(getattr(error, "details", None)) else None) or ""
        trailing = _trailing_metadata(error)
        status = _rich_status(error)
        info = _unpack(status, error_details_pb2.ErrorInfo)
        bad = _unpack(status, error_details_pb2.BadRequest)
        retry = _unpack(status, error_details_pb2.RetryInfo)
        if retry is not None:
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            retry_delay_s: float | None = max(0.0, delay)
        else:
            retry_delay_s = _retry_after_ms(trailing)
        found = bad.field_violations if bad is not None else ()
        violations = tuple(FieldViolation(v.field, v.description) for v in found)
        return cls(code, message, reason=info.reason if info else "", domain=info.domain if info else "",
                   metadata=dict(info.metadata) if info else None, field_violations=violations,
                   retry_delay_s=retry_delay_s, attempts=attempts, output_started=output_started)


def _rebuild(code, message, reason, domain, metadata, field_violations, retry_delay_s, attempts,
             output_started):
    return AdaccelError(code, message, reason=reason, domain=domain, metadata=metadata,
                        field_violations=field_violations, retry_delay_s=retry_delay_s, attempts=attempts,
                        output_started=output_started)


def _trailing_metadata(error: grpc.RpcError) -> tuple:
    getter = getattr(error, "trailing_metadata", None)
    try:
        return tuple(getter() or ()) if callable(getter) else ()
    except Exception:  # noqa: BLE001 - a call object that cannot tell: no details
        return ()


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status of the call (grpc_status checks that it agrees with the call's own
    code and message); None without one, or with one that is broken or disagrees."""
    if not callable(getattr(error, "trailing_metadata", None)):
        return None
    try:
        return rpc_status.from_call(error)
    except (ValueError, DecodeError):
        return None


def _unpack(status: status_pb2.Status | None, kind):
    for detail in status.details if status is not None else ():
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def _retry_after_ms(trailing: tuple) -> float | None:
    for key, value in trailing:
        if key == RETRY_AFTER_MS:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None
