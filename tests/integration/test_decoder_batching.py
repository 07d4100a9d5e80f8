"""The decoder serving several requests at once: continuous batching and KV-budget admission.

A real decoder server in-process (tiny random Llama, no broker, no pool service) and real gRPC
clients on loopback.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from common.rpc.errors import RETRY_AFTER_MS
from common.telemetry import null_telemetry
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings

BUDGET_TOKENS = 600  # KV budget of the test decoder, in tokens of the tiny model


@pytest.fixture(scope="module")
def decoder(tiny_llama_path, tmp_path_factory):
    from common.modeling.loading import load_model
    from services.decoder.batcher import kv_bytes_per_token

    per_token = kv_bytes_per_token(load_model(tiny_llama_path).model)
    settings = DecoderSettings(
        model_path=tiny_llama_path, data_dir=tmp_path_factory.mktemp("decoder"), kafka_bootstrap="",
        decoder_id="decoder-batching", torch_threads=1, max_queue=4, max_batch_size=3, workers=8,
        decoding_length=8, branch_length=4, kv_budget_mb=BUDGET_TOKENS * per_token / (1 << 20),
        telemetry_exporter="none")
    handle = create_decoder_server(settings, null_telemetry())
    yield handle
    handle.stop(0)


def request(request_id: str, text: str, max_new_tokens: int) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=request_id,
        blocks=[common_pb2.PromptBlock(id="u1", kind=common_pb2.BLOCK_KIND_USER_HISTORY, text=text)],
        params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens))


def tokens_of(stub, req) -> list[int]:
    chunks = list(stub.Generate(req, timeout=60))
    assert [t for c in chunks[:-1] for t in c.delta.token_ids] == list(chunks[-1].summary.token_ids)
    return list(chunks[-1].summary.token_ids)


def test_concurrent_requests_get_the_tokens_they_get_alone(decoder, channel_to):
    stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
    requests = [request(f"r{i}", text, n) for i, (text, n) in enumerate([
        ("likes hiking boots and tents\n", 130), ("bought a kettle\n", 60),
        ("reads mystery novels, crime fiction and thrillers every week\n", 100), ("cats\n", 80)])]
    alone = [tokens_of(stub, r) for r in requests]
    together: dict[int, list[int]] = {}
    depth = []

    def run(i):
        time.sleep(0.02 * i)  # staggered: later requests join a batch that is already running
        together[i] = tokens_of(stub, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        depth.append(stub.Report(decoder_pb2.DecoderReportRequest(), timeout=5).queue_depth)
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(requests))] == alone
    assert max(depth) >= 2  # they were in the decoder at the same time


def test_over_the_kv_budget_is_resource_exhausted_with_a_retry_hint(decoder, channel_to):
    stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
    long_running = stub.Generate(request("long", "a long answer please\n", 480), timeout=60)
    next(long_running)  # admitted and decoding: it holds most of the budget
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request("second", "and another one\n", 100), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV budget full" in err.value.details()
    hints = dict(err.value.trailing_metadata())
    assert int(hints[RETRY_AFTER_MS]) >= 50
    # The caller leaving frees its reservation: the same request is admitted afterwards.
    long_running.close()  # behind the tracing interceptor a call is a generator; closing it cancels the call
    deadline = time.monotonic() + 10
    while stub.Report(decoder_pb2.DecoderReportRequest(), timeout=5).queue_depth:
        assert time.monotonic() < deadline, "cancelled request still admitted"
        time.sleep(0.05)
    assert len(tokens_of(stub, request("second", "and another one\n", 100))) == 100


def test_a_request_larger_than_the_whole_budget_is_refused_without_a_hint(decoder, channel_to):
    stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request("huge", "many words " * 100 + "\n", 500), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "whole budget" in err.value.details()
    assert RETRY_AFTER_MS not in dict(err.value.trailing_metadata())


def test_an_unknown_pool_key_falls_back_to_the_global_pool_and_says_so(decoder, channel_to):
    stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
    unknown = request("pool-unknown", "likes hiking boots\n", 8)
    unknown.pool_key = "garden/tools"
    summary = list(stub.Generate(unknown, timeout=60))[-1].summary
    assert summary.stats.new_tokens == 8 and summary.stats.pool_key_used == "global"
    plain = request("pool-off", "likes hiking boots\n", 8)
    plain.params.advanced.disable_drafting = True
    assert list(stub.Generate(plain, timeout=60))[-1].summary.stats.pool_key_used == ""
