"""adaccel_client without servers: the retry policy on a fake channel, clock and sleep; errors;
requests built from typed inputs; the bearer token."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

CLIENT_SRC = Path(__file__).resolve().parents[3] / "clients" / "python" / "src"
if str(CLIENT_SRC) not in sys.path:
    sys.path.insert(0, str(CLIENT_SRC))

from adaccel_client import (  # noqa: E402
    AdaccelClient,
    AdaccelError,
    Advanced,
    Block,
    Relaxed,
    RetryPolicy,
    Sampling,
    build_request,
)
from adaccel_client._stubs import common_pb2, router_pb2  # noqa: E402

S = grpc.StatusCode


def packed(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def retry_info(ms: int) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(ms)
    return error_details_pb2.RetryInfo(retry_delay=delay)


class FakeError(grpc.RpcError):
    """What a failed gRPC call raises: a code, details and trailing metadata (rich status included)."""

    def __init__(self, code: grpc.StatusCode, message: str, *details, trailers=(), status_code=None):
        self._code, self._message = code, message
        self._trailers = list(trailers)
        if details:
            status = status_pb2.Status(code=status_code if status_code is not None else code.value[0],
                                       message=message, details=[packed(d) for d in details])
            self._trailers.append(("grpc-status-details-bin", status.SerializeToString()))

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        return tuple(self._trailers)


def busy(ms: int = 200, *, trailer_ms: int | None = None) -> FakeError:
    trailers = [("retry-after-ms", str(trailer_ms if trailer_ms is not None else ms))]
    info = error_details_pb2.ErrorInfo(reason="STREAM_LIMIT", domain="adaccel.v1", metadata={"limit": "1"})
    return FakeError(S.RESOURCE_EXHAUSTED, "router busy", info, retry_info(ms), trailers=trailers)


def delta(text: str, *ids: int) -> common_pb2.GenerateChunk:
    return common_pb2.GenerateChunk(delta=common_pb2.TokenDelta(text=text, token_ids=list(ids)))


def summary(text: str = "ab", new_tokens: int = 2) -> common_pb2.GenerateChunk:
    return common_pb2.GenerateChunk(summary=common_pb2.GenerationSummary(
        request_id="r1", text=text, token_ids=[1, 2], decoder_id="decoder-0", model_id="tiny",
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        stats=common_pb2.GenerationStats(new_tokens=new_tokens, steps=1, accepted_per_step=[2])))


OK = [delta("a", 1), delta("b", 2), summary()]


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeStream:
    def __init__(self, items, clock: FakeClock, duration_s: float):
        self._items, self._clock, self._duration_s = list(items), clock, duration_s
        self.cancelled = False

    def __iter__(self):
        self._clock.now += self._duration_s  # the attempt takes this long on the fake clock
        for item in self._items:
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self):
        self.cancelled = True


class FakeChannel:
    """Answers each call with the next script entry: chunks (maybe ending with an error) for
    Generate, a reply or an error for Info. Records the calls' timeouts and metadata."""

    def __init__(self, clock: FakeClock, *script, duration_s: float = 0.0):
        self.clock, self.script, self.duration_s = clock, list(script), duration_s
        self.calls: list[dict] = []
        self.streams: list[FakeStream] = []

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, **_):
        def call(request, timeout=None, metadata=None, **__):
            request_serializer(request)  # a real channel serializes it
            self.calls.append({"method": method, "timeout": timeout, "metadata": metadata})
            stream = FakeStream(self.script.pop(0), self.clock, self.duration_s)
            self.streams.append(stream)
            return stream
        return call

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, **_):
        def call(request, timeout=None, metadata=None, **__):
            self.calls.append({"method": method, "timeout": timeout, "metadata": metadata})
            self.clock.now += self.duration_s
            outcome = self.script.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return call

    def close(self):
        pass


def client_on(channel: FakeChannel, *, retry: RetryPolicy | None = None, timeout: float | None = 10.0,
              **kwargs) -> AdaccelClient:
    return AdaccelClient("fake:1", channel=channel, clock=channel.clock, sleep=channel.clock.sleep,
                         rng=random.Random(7), retry=retry or RetryPolicy(jitter=0.0), timeout=timeout,
                         **kwargs)


BLOCKS = [Block("item", "item-1", "Aurora headphones.\n")]


def test_resource_exhausted_is_retried_after_the_retry_info_delay():
    clock = FakeClock()
    channel = FakeChannel(clock, [busy(250, trailer_ms=999)], OK)  # RetryInfo wins over the trailer
    generation = client_on(channel).generate(BLOCKS, max_new_tokens=2)
    assert [d.text for d in generation] == ["a", "b"]
    assert generation.summary.text == "ab" and generation.summary.finish_reason == "length"
    assert generation.attempts == 2 and clock.sleeps == [pytest.approx(0.25)]
    # Each attempt gets what is left of the one deadline.
    assert [c["timeout"] for c in channel.calls] == [pytest.approx(10.0), pytest.approx(9.75)]


def test_jitter_only_lengthens_the_server_delay():
    clock = FakeClock()
    channel = FakeChannel(clock, [busy(200)], [busy(200)], OK)
    client_on(channel, retry=RetryPolicy(jitter=0.2)).generate_text(BLOCKS)
    assert len(clock.sleeps) == 2 and all(0.2 <= s <= 0.24 for s in clock.sleeps)
    assert clock.sleeps[0] != clock.sleeps[1]


def test_the_retry_after_ms_trailer_is_the_fallback_hint():
    clock = FakeClock()
    hinted = FakeError(S.RESOURCE_EXHAUSTED, "busy", trailers=[("retry-after-ms", "400")])
    channel = FakeChannel(clock, [hinted], OK)
    assert client_on(channel).generate_text(BLOCKS).attempts == 2
    assert clock.sleeps == [pytest.approx(0.4)]


def test_a_rich_status_that_contradicts_the_call_is_ignored():
    clock = FakeClock()
    contradicting = FakeError(S.RESOURCE_EXHAUSTED, "busy", retry_info(5000), status_code=S.INTERNAL.value[0],
                              trailers=[("retry-after-ms", "300")])
    channel = FakeChannel(clock, [contradicting], OK)
    client_on(channel).generate_text(BLOCKS)
    assert clock.sleeps == [pytest.approx(0.3)]


def test_without_a_hint_the_backoff_grows_exponentially_with_jitter():
    clock = FakeClock()
    down = FakeError(S.UNAVAILABLE, "connection refused")
    channel = FakeChannel(clock, [down], [down], [down], OK)
    result = client_on(channel, retry=RetryPolicy(max_retries=3, initial_backoff_s=0.1, max_backoff_s=0.3)) \
        .generate_text(BLOCKS)
    assert result.attempts == 4 and result.text == "ab"
    first, second, third = clock.sleeps
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2 and 0.15 <= third <= 0.3  # the last one capped


def test_attempts_are_bounded():
    clock = FakeClock()
    channel = FakeChannel(clock, *([[FakeError(S.UNAVAILABLE, "down")]] * 5))
    with pytest.raises(AdaccelError) as err:
        client_on(channel, retry=RetryPolicy(max_retries=2)).generate_text(BLOCKS)
    assert err.value.code == S.UNAVAILABLE and err.value.attempts == 3
    assert len(channel.calls) == 3 and len(clock.sleeps) == 2


def test_no_retry_once_output_started_streaming():
    clock = FakeClock()
    channel = FakeChannel(clock, [delta("a", 1), FakeError(S.UNAVAILABLE, "decoder died mid-stream")], OK)
    generation = client_on(channel).generate(BLOCKS)
    received = []
    with pytest.raises(AdaccelError) as err:
        for piece in generation:
            received.append(piece.text)
    # A retry would stream "a" again: the caller gets the error, and the partial output is void.
    assert received == ["a"] and err.value.output_started and err.value.attempts == 1
    assert len(channel.calls) == 1 and clock.sleeps == []


@pytest.mark.parametrize("error", [
    FakeError(S.INVALID_ARGUMENT, "blocks[0].id: must not be empty",
              error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="adaccel.v1"),
              error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
                  field="blocks[0].id", description="must not be empty")])),
    FakeError(S.RESOURCE_EXHAUSTED, "blocks[0].text: over 65536 characters",
              error_details_pb2.ErrorInfo(reason="FIELD_TOO_LARGE", domain="adaccel.v1")),
    FakeError(S.UNAUTHENTICATED, "authorization: token not accepted"),
    FakeError(S.DEADLINE_EXCEEDED, "Deadline Exceeded"),
])
def test_errors_about_the_request_are_not_retried(error):
    clock = FakeClock()
    channel = FakeChannel(clock, [error], OK)
    with pytest.raises(AdaccelError) as err:
        client_on(channel).generate_text(BLOCKS)
    assert err.value.code == error.code() and err.value.message == error.details() and err.value.attempts == 1
    assert len(channel.calls) == 1 and clock.sleeps == []


def test_error_carries_the_rich_status_details():
    clock = FakeClock()
    invalid = FakeError(S.INVALID_ARGUMENT, "blocks[0].id: must not be empty",
                        error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="adaccel.v1",
                                                    metadata={"field": "blocks[0].id"}),
                        error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
                            field="blocks[0].id", description="must not be empty")]))
    with pytest.raises(AdaccelError) as err:
        client_on(FakeChannel(clock, [invalid])).generate_text(BLOCKS)
    e = err.value
    assert (e.reason, e.domain) == ("INVALID_FIELD", "adaccel.v1")
    assert dict(e.metadata) == {"field": "blocks[0].id"}
    assert [(v.field, v.description) for v in e.field_violations] == [("blocks[0].id", "must not be empty")]
    assert str(e) == "INVALID_ARGUMENT: blocks[0].id: must not be empty" and e.retry_delay_s is None
    with pytest.raises(AdaccelError) as err:
        client_on(FakeChannel(clock, [busy(200)]), retry=RetryPolicy(max_retries=0)).generate_text(BLOCKS)
    assert err.value.reason == "STREAM_LIMIT" and err.value.retry_delay_s == pytest.approx(0.2)


def test_no_retry_whose_wait_passes_the_deadline():
    clock = FakeClock()
    channel = FakeChannel(clock, [busy(2000)], OK)
    with pytest.raises(AdaccelError) as err:
        client_on(channel, timeout=1.0).generate_text(BLOCKS)
    # Raised at once with the server's delay, instead of sleeping past the caller's deadline.
    assert err.value.code == S.RESOURCE_EXHAUSTED and err.value.retry_delay_s == pytest.approx(2.0)
    assert clock.sleeps == [] and len(channel.calls) == 1


def test_retries_stay_within_the_deadline():
    clock = FakeClock()
    started = clock.now
    channel = FakeChannel(clock, *([[busy(200)]] * 10), duration_s=0.15)  # each refusal takes 150 ms
    with pytest.raises(AdaccelError) as err:
        client_on(channel, timeout=1.0, retry=RetryPolicy(max_retries=10, jitter=0.0)).generate_text(BLOCKS)
    # 150 + 200 + 150 + 200 + 150 = 850 ms; another 200 ms wait would end past 1 s.
    assert err.value.attempts == 3 and clock.sleeps == [pytest.approx(0.2)] * 2
    assert clock.now - started < 1.0
    timeouts = [c["timeout"] for c in channel.calls]
    assert timeouts == [pytest.approx(1.0), pytest.approx(0.65), pytest.approx(0.3)]


def test_info_is_retried_too():
    clock = FakeClock()
    reply = router_pb2.RouterInfo(policy="affinity", replicas=[router_pb2.ReplicaState(
        address="127.0.0.1:1", healthy=True, decoder_id="decoder-0", pool_keys=["a/b"])])
    channel = FakeChannel(clock, FakeError(S.UNAVAILABLE, "down", trailers=[("retry-after-ms", "50")]), reply)
    info = client_on(channel).info()
    assert info.policy == "affinity" and info.replicas[0].decoder_id == "decoder-0"
    assert info.replicas[0].pool_keys == ("a/b",) and clock.sleeps == [pytest.approx(0.05)]


def test_leaving_a_stream_early_cancels_the_call():
    clock = FakeClock()
    channel = FakeChannel(clock, OK)
    with client_on(channel).generate(BLOCKS) as generation:
        assert next(generation).text == "a"
    assert channel.streams[0].cancelled
    with pytest.raises(AdaccelError) as err:
        generation.summary
    assert err.value.code == S.CANCELLED


def test_bearer_token_is_sent_and_a_rotated_token_file_is_read_again(tmp_path):
    clock = FakeClock()
    token = tmp_path / "token"
    token.write_text("# the ranking service's\nsecret-1\n")
    channel = FakeChannel(clock, OK, OK, OK)
    client = client_on(channel, token_file=token)
    client.generate_text(BLOCKS)
    token.write_text("secret-22\n")  # rotated in place
    client.generate_text(BLOCKS, metadata=[("x-trace", "t")])
    token.unlink()  # missing for a moment mid-rotation: the last token is kept
    client.generate_text(BLOCKS)
    assert [c["metadata"] for c in channel.calls] == [
        (("authorization", "Bearer secret-1"),),
        (("authorization", "Bearer secret-22"), ("x-trace", "t")),
        (("authorization", "Bearer secret-22"),)]
    with pytest.raises(FileNotFoundError):
        client_on(FakeChannel(clock), token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no token"):
        client_on(FakeChannel(clock), token_file=tmp_path / "empty")


def test_requests_from_typed_inputs():
    request = build_request([Block("instruction", "i-1", "Describe.\n"), ("item", "item-1", "Shoes.\n")],
                            pool_key="apparel/shoes", max_new_tokens=12, relaxed=Relaxed(top_k=3),
                            sampling=Sampling(temperature=0.7, seed=0), request_id="r-9", publish=True)
    assert [(b.kind, b.id) for b in request.blocks] == [(common_pb2.BLOCK_KIND_INSTRUCTION, "i-1"),
                                                        (common_pb2.BLOCK_KIND_ITEM, "item-1")]
    params = request.params
    assert params.mode == common_pb2.VERIFICATION_MODE_RELAXED and params.max_new_tokens == 12
    # Unset optionals stay unset (the server's defaults apply); seed 0 is a seed.
    assert params.relaxed.HasField("top_k") and not params.relaxed.HasField("min_prob")
    assert params.sampling.HasField("seed") and params.sampling.seed == 0
    assert not params.HasField("advanced") and request.publish and request.request_id == "r-9"
    strict = build_request(BLOCKS, advanced=Advanced(disable_drafting=True, decoding_length=4)).params
    assert strict.mode == common_pb2.VERIFICATION_MODE_STRICT and not strict.HasField("relaxed")
    assert strict.advanced.disable_drafting and strict.advanced.decoding_length == 4
    assert not build_request(BLOCKS, sampling=Sampling()).params.sampling.HasField("seed")
    with pytest.raises(ValueError, match="relaxed"):
        build_request(BLOCKS, mode="strict", relaxed=Relaxed(top_k=2))
    with pytest.raises(ValueError, match="block kind"):
        Block("image", "x", "y")


def test_retry_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)


def test_the_typed_stats_carry_every_field_of_the_message() -> None:
    import dataclasses

    from adaccel_client._stubs import common_pb2
    from adaccel_client.types import Stats

    assert {f.name for f in dataclasses.fields(Stats)} == set(common_pb2.GenerationStats.DESCRIPTOR.fields_by_name)
