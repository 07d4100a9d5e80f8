"""Domain errors, the one table that maps them to gRPC statuses, and the catalog of reasons.

Core code raises these; the shared interceptor (common/rpc/interceptors.py) turns each into a
rich status: its code, its message, and `google.rpc.Status` details in the trailer
`grpc-status-details-bin` (README.md, "Error contract"):
- `google.rpc.ErrorInfo` on every error: a stable `reason` from REASONS, domain "adaccel.v1",
  metadata ("field", "limit", ...);
- `google.rpc.BadRequest` when a request field is at fault (INVALID_ARGUMENT, and
  RESOURCE_EXHAUSTED size limits): the field and what is wrong with it, limit included;
- `google.rpc.RetryInfo` when a retry delay is known, with the older `retry-after-ms` trailer
  beside it for callers that read only that.
Anything else that escapes a handler is a bug and becomes INTERNAL, reason INTERNAL, with no
exception text: only the trace id under which it was logged.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

# ErrorInfo.domain of every adaccel error.
DOMAIN = "adaccel.v1"

# Trailing-metadata key of the rich status (google.rpc.Status, serialized), as gRPC defines it.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Trailing-metadata key of a retryable status: milliseconds after which a retry may succeed.
# Kept beside RetryInfo for callers that predate it.
RETRY_AFTER_MS = "retry-after-ms"


class Reason(enum.StrEnum):
    """ErrorInfo.reason: stable, UPPER_SNAKE; a caller may branch on it (not on messages)."""

    INVALID_FIELD = "INVALID_FIELD"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    MODEL_CONTEXT = "MODEL_CONTEXT"
    FIELD_TOO_LARGE = "FIELD_TOO_LARGE"
    KV_REQUEST_TOO_LARGE = "KV_REQUEST_TOO_LARGE"
    STREAM_LIMIT = "STREAM_LIMIT"
    DECODER_BUSY = "DECODER_BUSY"
    KV_BUDGET = "KV_BUDGET"
    ALL_REPLICAS_BUSY = "ALL_REPLICAS_BUSY"
    NO_HEALTHY_REPLICA = "NO_HEALTHY_REPLICA"
    REPLICAS_FAILED = "REPLICAS_FAILED"
    STREAM_INTERRUPTED = "STREAM_INTERRUPTED"
    DEADLINE = "DEADLINE"
    POOL_NOT_FOUND = "POOL_NOT_FOUND"
    BLOCK_NOT_FOUND = "BLOCK_NOT_FOUND"
    NO_TOKENIZER = "NO_TOKENIZER"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    code: grpc.StatusCode | None  # None: the peer's code, relayed
    meaning: str
    action: str  # what a caller should do


_C = grpc.StatusCode
# The catalog (README.md "Error contract" lists the same; tests/unit/foundation/test_error_contract.py
# checks that it does). A reason is never renamed or reused for another meaning; new ones may be added.
REASONS: dict[Reason, ReasonInfo] = {
    Reason.INVALID_FIELD: ReasonInfo(
        _C.INVALID_ARGUMENT, "a request field is malformed or out of range (BadRequest names it)",
        "fix the field; do not retry as is"),
    Reason.MALFORMED_REQUEST: ReasonInfo(
        _C.INVALID_ARGUMENT, "the request bytes are not a valid message of the method's type",
        "fix the client (proto version, serialization); do not retry"),
    Reason.PROMPT_TOO_LONG: ReasonInfo(
        _C.INVALID_ARGUMENT, "the tokenized prompt is longer than the decoder accepts (field blocks)",
        "shorten the prompt; do not retry as is"),
    Reason.MODEL_CONTEXT: ReasonInfo(
        _C.INVALID_ARGUMENT, "prompt tokens + max_new_tokens pass the model's context (field "
        "params.max_new_tokens)", "shorten the prompt or lower max_new_tokens"),
    Reason.FIELD_TOO_LARGE: ReasonInfo(
        _C.RESOURCE_EXHAUSTED, "a request field is over a size limit (BadRequest names the field "
        "and the limit)", "split or shrink the request; retrying it unchanged fails again"),
    Reason.KV_REQUEST_TOO_LARGE: ReasonInfo(
        _C.RESOURCE_EXHAUSTED, "the request needs more KV memory than a decoder has in all",
        "shorten the prompt or max_new_tokens; retrying unchanged fails again"),
    Reason.STREAM_LIMIT: ReasonInfo(
        _C.RESOURCE_EXHAUSTED, "the router has its maximum of streams open (RetryInfo)",
        "retry after the delay, with backoff"),
    Reason.DECODER_BUSY: ReasonInfo(
        _C.RESOURCE_EXHAUSTED, "the decoder has its maximum of requests admitted (RetryInfo)",
        "retry after the delay (the router first tries another replica)"),
    Reason.KV_BUDGET: ReasonInfo(
        _C.RESOURCE_EXHAUSTED, "the decoder's KV budget is reserved by running requests (RetryInfo)",
        "retry after the delay (the router first tries another replica)"),
    Reason.ALL_REPLICAS_BUSY: ReasonInfo(
        _C.RESOURCE_EXHAUSTED, "every decoder replica the router tried refused for load (RetryInfo: "
        "the soonest hint among theirs, when they gave one)", "retry after the delay, with backoff"),
    Reason.NO_HEALTHY_REPLICA: ReasonInfo(
        _C.UNAVAILABLE, "the router knows no healthy decoder replica (left) to send the request to",
        "retry with backoff"),
    Reason.REPLICAS_FAILED: ReasonInfo(
        _C.UNAVAILABLE, "the decoder replicas tried failed (the router already retried once)",
        "retry with backoff"),
    Reason.STREAM_INTERRUPTED: ReasonInfo(
        _C.UNAVAILABLE, "the decoder failed after part of the output was streamed",
        "discard the partial output and retry the whole request"),
    Reason.DEADLINE: ReasonInfo(
        _C.DEADLINE_EXCEEDED, "the caller's deadline passed", "retry with a longer deadline if useful"),
    Reason.POOL_NOT_FOUND: ReasonInfo(
        _C.NOT_FOUND, "no draft pool has the pool key (field pool_key)", "check the key, or create the pool"),
    Reason.BLOCK_NOT_FOUND: ReasonInfo(
        _C.NOT_FOUND, "the kv-store holds no (intact) block under the hash",
        "compute the block and Put it; do not retry the Get"),
    Reason.NO_TOKENIZER: ReasonInfo(
        _C.FAILED_PRECONDITION, "the service has no tokenizer for text input",
        "send token ids, or configure the service (ADACCEL_MODEL_PATH)"),
    Reason.UNAUTHENTICATED: ReasonInfo(
        _C.UNAUTHENTICATED, "no bearer token, or one not accepted",
        "send a valid 'authorization: Bearer <token>' header"),
    Reason.PERMISSION_DENIED: ReasonInfo(
        _C.PERMISSION_DENIED, "the client certificate's subject may not call this service",
        "use an allowed client certificate"),
    Reason.UPSTREAM_ERROR: ReasonInfo(
        None, "a peer's failure relayed as it came, when the peer sent no details of its own "
        "(metadata upstream_code: its code)", "as the code says"),
    Reason.INTERNAL: ReasonInfo(
        _C.INTERNAL, "a bug: the message carries only the trace id (metadata trace_id, or error_id "
        "without a trace) under which the server logged it", "retry once; report the trace id"),
}

# "<field>: <what is wrong>", the form of every field-level message (field paths like
# "blocks[3].text", or "a and b" for two fields at once).
_PATH = r"[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?)*"
_FIELD_MESSAGE = re.compile(rf"({_PATH}(?: and {_PATH})*): (.*)\Z", re.DOTALL)


def split_field_message(message: str) -> tuple[str, str] | None:
    """("blocks[0].text", "must not be empty") of "blocks[0].text: must not be empty", else None."""
    match = _FIELD_MESSAGE.match(message)
    return (match.group(1), match.group(2)) if match else None


class ServiceError(Exception):
    """A domain error: its status code (class), a stable reason (REASONS), and what the rich
    status says besides: the request field at fault and its limit, a retry delay, metadata."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = Reason.INTERNAL
    # Whether the field at fault may be read off a "<field>: ..." message when none is given.
    _field_from_message = False
    # Whether the field at fault goes into a BadRequest (else only into ErrorInfo's metadata).
    _bad_request = False

    def __init__(self, message: str, *, reason: Reason | None = None, field: str | None = None,
                 limit: int | float | str | None = None, retry_after_ms: int | None = None,
                 metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if field is None and self._field_from_message:
            parsed = split_field_message(message)
            field = parsed[0] if parsed else None
        self.field = field
        self.limit = limit
        self.retry_after_ms = None if retry_after_ms is None else max(0, int(retry_after_ms))
        self.metadata = dict(metadata or {})
        # Sent as the status's trailing metadata, beside the rich details.
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = (
            ((RETRY_AFTER_MS, str(self.retry_after_ms)),) if self.retry_after_ms is not None else ())

    def error_info(self) -> error_details_pb2.ErrorInfo:
        metadata = dict(self.metadata)
        if self.field is not None:
            metadata["field"] = self.field
        if self.limit is not None:
            metadata["limit"] = str(self.limit)
        return error_details_pb2.ErrorInfo(reason=str(self.reason), domain=DOMAIN, metadata=metadata)

    def bad_request(self) -> error_details_pb2.BadRequest | None:
        if self.field is None or not self._bad_request:
            return None
        message = str(self)
        parsed = split_field_message(message)
        description = parsed[1] if parsed and parsed[0] == self.field else message
        if self.limit is not None and str(self.limit) not in description:
            description += f" (limit {self.limit})"
        return error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=description)
            for name in self.field.split(" and ")])

    def retry_info(self) -> error_details_pb2.RetryInfo | None:
        if self.retry_after_ms is None:
            return None
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_after_ms)
        return error_details_pb2.RetryInfo(retry_delay=delay)

    def rich_status(self) -> status_pb2.Status:
        """The google.rpc.Status of this error: code, message, ErrorInfo [, BadRequest][, RetryInfo]."""
        status = status_pb2.Status(code=self.code.value[0], message=str(self))
        for detail in (self.error_info(), self.bad_request(), self.retry_info()):
            if detail is not None:
                status.details.add().Pack(detail)
        return status


class InvalidArgument(ServiceError):
    """A request field is malformed or out of range; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_FIELD
    _field_from_message = True
    _bad_request = True


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"  # the raise sites name a specific reason


class ResourceExhausted(ServiceError):
    """Over a size or capacity limit; the message names the limit (and a retry hint when useful).
    Default reason FIELD_TOO_LARGE, whose field is read off the "<field>: ..." message unless given;
    capacity refusals name their own reason (and give no field)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.FIELD_TOO_LARGE
    _bad_request = True

    @property
    def _field_from_message(self) -> bool:  # type: ignore[override]
        return self.reason == Reason.FIELD_TOO_LARGE


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"  # the raise sites name a specific reason


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = Reason.DEADLINE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"  # the raise sites name a specific reason


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED


class Internal(ServiceError):
    """What a caller learns of a bug: an id to find it in the logs, nothing of the exception."""

    code = grpc.StatusCode.INTERNAL
    reason = Reason.INTERNAL

    @classmethod
    def logged_as(cls, trace_id: str | None, error_id: str | None = None) -> Internal:
        if trace_id:
            return cls(f"internal error (trace {trace_id})", metadata={"trace_id": trace_id})
        return cls(f"internal error (error id {error_id})", metadata={"error_id": error_id or ""})


def rich_status_of(trailing_metadata) -> status_pb2.Status | None:
    """The google.rpc.Status a call's trailing metadata carries, None without a (parsable) one."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def retry_delay_ms(trailing_metadata) -> int | None:
    """A call's retry hint: RetryInfo in its rich status, else the `retry-after-ms` trailer, else None."""
    status = rich_status_of(trailing_metadata)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(0, info.retry_delay.ToMilliseconds())
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_MS:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class UpstreamStatus(ServiceError):
    """A peer's failure passed on as it is: its status code, details and trailing metadata (a
    retry hint, say), its rich status included, byte for byte. For the peer's own verdicts on a
    request, e.g. a decoder's INVALID_ARGUMENT relayed by the router; the table maps it to that
    same code. A peer that sent no rich status gets one here: ErrorInfo UPSTREAM_ERROR."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()):
        if code == grpc.StatusCode.OK:
            raise ValueError("UpstreamStatus: code OK is not a failure")
        super().__init__(details, reason=Reason.UPSTREAM_ERROR, metadata={"upstream_code": code.name},
                         retry_after_ms=retry_delay_ms(trailing_metadata))
        self.code = code
        self.trailing_metadata = tuple(trailing_metadata)

    def rich_status(self) -> status_pb2.Status:
        upstream = rich_status_of(self.trailing_metadata)
        if upstream is not None and upstream.code == self.code.value[0] and upstream.message == str(self):
            return upstream  # the peer's own, intact
        status = super().rich_status()
        if upstream is not None:  # inconsistent with the status it came with: keep its details
            status.details.extend(upstream.details)
        return status


def require(condition: bool, field: str, message: str, *, limit: int | float | str | None = None) -> None:
    """Validation helper: raises InvalidArgument('<field>: <message>') unless condition holds."""
    if not condition:
        raise InvalidArgument(f"{field}: {message}", field=field, limit=limit)
