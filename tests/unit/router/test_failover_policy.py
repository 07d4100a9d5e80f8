"""The router's failover policy without servers: scripted replicas whose streams fail on cue."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest

from common.rpc.errors import RETRY_AFTER_MS, DeadlineExceeded, ResourceExhausted, Unavailable, UpstreamStatus
from services.router.failover import RETRYABLE, stream_with_failover

S = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    """What a failed client call raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def busy(ms: int | None = None) -> FakeRpcError:
    trailers = ((RETRY_AFTER_MS, str(ms)),) if ms is not None else ()
    return FakeRpcError(S.RESOURCE_EXHAUSTED, f"busy ({ms} ms)", trailers)


@dataclass
class Script:
    """One replica's answer: these chunks, then this error (None: the stream ends well)."""

    chunks: tuple[str, ...] = ()
    error: FakeRpcError | None = None


@dataclass
class FakeReplicas:
    """Replicas in address order; `choose` takes the first healthy untried one."""

    scripts: dict[str, Script]
    healthy: dict[str, bool] = field(default_factory=dict)
    opened: list[tuple[str, float]] = field(default_factory=list)
    open_now: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)

    def choose(self, tried):
        return next((a for a in self.scripts if self.healthy.get(a, True) and a not in tried), None)

    @contextmanager
    def open(self, address, timeout_s):
        self.opened.append((address, timeout_s))
        self.open_now.add(address)
        try:
            yield self._stream(self.scripts[address])
        finally:
            self.open_now.discard(address)

    @staticmethod
    def _stream(script: Script):
        yield from script.chunks
        if script.error is not None:
            raise script.error

    def mark_failed(self, address):
        self.failed.append(address)
        self.healthy[address] = False

    @property
    def addresses(self) -> list[str]:
        return [a for a, _ in self.opened]


def run(replicas: FakeReplicas, deadline: float = 10.0, now: float = 0.0) -> list[str]:
    return list(stream_with_failover(replicas, deadline, clock=lambda: now))


def test_a_healthy_replica_streams_its_answer_once():
    replicas = FakeReplicas({"a": Script(("x", "y")), "b": Script(("never",))})
    assert run(replicas, deadline=10.0, now=4.0) == ["x", "y"]
    assert replicas.opened == [("a", 6.0)]  # the caller's remaining time
    assert not replicas.open_now and not replicas.failed


@pytest.mark.parametrize("code", sorted(RETRYABLE, key=lambda c: c.name))
def test_a_retryable_failure_before_any_chunk_goes_to_another_replica(code):
    replicas = FakeReplicas({"a": Script(error=FakeRpcError(code, "gone")), "b": Script(("ok",))})
    assert run(replicas) == ["ok"]
    assert replicas.addresses == ["a", "b"]
    # Only an unreachable replica is taken out of the rotation.
    assert replicas.failed == (["a"] if code == S.UNAVAILABLE else [])
    assert not replicas.open_now


@pytest.mark.parametrize("code", [S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.PERMISSION_DENIED,
                                  S.UNIMPLEMENTED, S.OUT_OF_RANGE])
def test_a_replicas_verdict_on_the_request_is_passed_on_as_it_is(code):
    trailers = (("why", "field x"), (RETRY_AFTER_MS, "7"))
    replicas = FakeReplicas({"a": Script(error=FakeRpcError(code, "blocks[0]: empty", trailers)),
                             "b": Script(("never",))})
    with pytest.raises(UpstreamStatus) as err:
        run(replicas)
    assert (err.value.code, str(err.value), err.value.trailing_metadata) == (code, "blocks[0]: empty", trailers)
    assert replicas.addresses == ["a"] and not replicas.failed


def test_a_deadline_hit_on_a_replica_is_final():
    replicas = FakeReplicas({"a": Script(error=FakeRpcError(S.DEADLINE_EXCEEDED)), "b": Script(("never",))})
    with pytest.raises(DeadlineExceeded, match="while generating"):
        run(replicas)
    assert replicas.addresses == ["a"]


def test_no_replica_is_tried_once_the_deadline_passed():
    replicas = FakeReplicas({"a": Script(("never",))})
    with pytest.raises(DeadlineExceeded, match="before a replica answered"):
        run(replicas, deadline=5.0, now=5.0)
    assert replicas.opened == []


@pytest.mark.parametrize("code", [S.UNAVAILABLE, S.RESOURCE_EXHAUSTED, S.INTERNAL])
def test_a_failure_after_the_first_chunk_is_unavailable_and_not_retried(code):
    replicas = FakeReplicas({"a": Script(("x",), FakeRpcError(code, "boom")), "b": Script(("never",))})
    chunks = stream_with_failover(replicas, 10.0, clock=lambda: 0.0)
    assert next(chunks) == "x"  # passed on before the failure
    with pytest.raises(Unavailable, match="failed mid-stream .*partial output was sent"):
        next(chunks)
    assert replicas.addresses == ["a"] and not replicas.open_now


@pytest.mark.parametrize(("scripts", "healthy", "error", "message", "hint"), [
    # Every replica tried refused for load: back-pressure, with the soonest hint.
    ({"a": Script(error=busy(40)), "b": Script(error=busy(15)), "c": Script(("never",))}, {},
     ResourceExhausted, r"all decoder replicas tried are busy \(busy \(15 ms\)\)", "15"),
    # One busy and no other healthy replica: still back-pressure.
    ({"a": Script(error=busy(40)), "b": Script(("never",))}, {"b": False},
     ResourceExhausted, "all decoder replicas tried are busy", "40"),
    # A busy replica, then a broken one: the last failure says what happened.
    ({"a": Script(error=busy(40)), "b": Script(error=FakeRpcError(S.UNAVAILABLE, "down"))}, {},
     Unavailable, "decoders failed twice, last b: down", None),
    ({"a": Script(error=FakeRpcError(S.INTERNAL, "bug")), "b": Script(error=FakeRpcError(S.UNKNOWN, "?"))}, {},
     Unavailable, r"decoders failed twice, last b: \?", None),
    ({"a": Script(error=FakeRpcError(S.UNAVAILABLE, "down"))}, {},
     Unavailable, "no healthy decoder replica left to retry on", None),
    ({"a": Script(("never",))}, {"a": False},
     Unavailable, "^no healthy decoder replica$", None),
])
def test_giving_up(scripts, healthy, error, message, hint):
    replicas = FakeReplicas(scripts, healthy=dict(healthy))
    with pytest.raises(error, match=message) as err:
        run(replicas)
    assert len(replicas.opened) <= 2 and not replicas.open_now
    assert dict(err.value.trailing_metadata).get(RETRY_AFTER_MS) == hint


def test_busy_replicas_without_hints_give_no_hint():
    replicas = FakeReplicas({"a": Script(error=busy()), "b": Script(error=busy())})
    with pytest.raises(ResourceExhausted) as err:
        run(replicas)
    assert err.value.retry_after_ms is None and err.value.trailing_metadata == ()


def test_a_caller_that_leaves_mid_stream_ends_the_replica_call():
    replicas = FakeReplicas({"a": Script(("x", "y", "z"))})
    chunks = stream_with_failover(replicas, 10.0, clock=lambda: 0.0)
    assert next(chunks) == "x"
    assert replicas.open_now == {"a"}
    chunks.close()  # what gRPC does to the servicer's generator when the caller cancels
    assert not replicas.open_now
