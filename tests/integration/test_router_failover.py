"""Router failure handling on the real stack: a decoder killed mid-run, deadlines, back-pressure.

Its own stack (2 decoders): killing a replica would spoil the shared one of test_stack.py.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from adaccel.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.stack import Stack

# 1,843 tokens of the tiny model (512 bytes each, one token per character) per decoder: under
# its 2,048-token context, so a request can fit the model and still not fit the budget.
KV_BUDGET_MB = 0.9


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llama_path):
    env = {"decoder": {"TORCH_THREADS": "1", "KV_BUDGET_MB": str(KV_BUDGET_MB), "KVSTORE_ADDRS": ""}}
    with Stack(data_dir=tmp_path_factory.mktemp("failover"), model_path=tiny_llama_path, decoders=2,
               extra_env=env) as s:
        yield s


def request(request_id: str, max_new_tokens: int, text: str = "Aurora headphones, wireless.\n"):
    return common_pb2.GenerateRequest(
        request_id=request_id, pool_key="electronics/audio",
        blocks=[common_pb2.PromptBlock(id="item-42", kind=common_pb2.BLOCK_KIND_ITEM, text=text)],
        params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens))


def test_a_request_over_every_replicas_kv_budget_is_resource_exhausted(stack, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(stack.address("router")))
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(request("huge", 512, "many words " * 130 + "\n"), timeout=20))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "busy" in err.value.details() and "whole budget" in err.value.details()


def test_deadline_is_honoured_through_the_router(stack, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(stack.address("router")))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(request("slow", 500), timeout=0.05))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0  # returned at the deadline, not when generation ended


def test_killed_replica_requests_fail_over_or_fail_cleanly(stack, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(stack.address("router")))
    deadline_s = 30.0
    outcomes: dict[int, tuple[str, float, int]] = {}
    streaming = threading.Event()

    def run(i):
        started, chunks = time.monotonic(), 0
        try:
            for chunk in router.Generate(request(f"k{i}", 300), timeout=deadline_s):
                chunks += 1
                streaming.set()
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        outcomes[i] = (code, time.monotonic() - started, chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert streaming.wait(20)
    stack.process("decoder-0").process.kill()  # SIGKILL: no goodbye to anyone
    for t in threads:
        t.join(deadline_s + 5)
        assert not t.is_alive(), "a request hangs past its deadline"
    # Each request either finished (on decoder-1, or retried there before anything was streamed)
    # or failed with UNAVAILABLE because the dead replica had already streamed part of it.
    # RESOURCE_EXHAUSTED: the surviving replica's KV budget (0.9 MB here) was full; retryable too.
    assert {code for code, _, _ in outcomes.values()} <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, outcomes  # all retryable
    assert all(elapsed < deadline_s for _, elapsed, _ in outcomes.values())
    # New requests go to the survivor, with no error on the way.
    for i in range(3):
        summary = list(router.Generate(request(f"after-{i}", 8), timeout=20))[-1].summary
        assert summary.decoder_id == "decoder-1"
    info = router.Info(router_pb2.RouterInfoRequest(), timeout=5)
    assert sorted(r.healthy for r in info.replicas) == [False, True]
