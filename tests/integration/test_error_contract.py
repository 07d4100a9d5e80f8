"""The error contract through the router: a decoder's verdict reaches the router's caller with its
rich status intact (google.rpc.Status in grpc-status-details-bin), and the router's own errors
carry details too. A real decoder (tiny random Llama) and real routers in-process, on loopback."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from adaccel.v1 import common_pb2, decoder_pb2_grpc, router_pb2, router_pb2_grpc
from common.broker import free_port
from common.telemetry import null_telemetry
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from services.router.server import create_router_server
from services.router.settings import RouterSettings

MAX_PROMPT_TOKENS = 16  # the decoder's; the router cannot tokenize, so it lets longer prompts through


@pytest.fixture(scope="module")
def servers(tiny_llama_path, tmp_path_factory, one_torch_thread):
    data_dir = tmp_path_factory.mktemp("errors")
    decoder = create_decoder_server(DecoderSettings(
        data_dir=data_dir, model_path=tiny_llama_path, kafka_bootstrap="", decoder_id="decoder-errors",
        max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=4, torch_threads=1, max_queue=2, workers=4,
        telemetry_exporter="none"), null_telemetry())
    router = create_router_server(RouterSettings(
        data_dir=data_dir, decoder_addrs=[decoder.address], heartbeat_s=0.2, max_new_tokens=4, workers=4,
        telemetry_exporter="none"), null_telemetry())
    lonely = create_router_server(RouterSettings(  # its only decoder is not there
        data_dir=data_dir, decoder_addrs=[f"127.0.0.1:{free_port()}"], heartbeat_s=0.2, workers=4,
        telemetry_exporter="none"), null_telemetry())
    yield decoder, router, lonely
    for handle in (lonely, router, decoder):
        handle.stop(0)


def request(text: str, max_new_tokens: int = 2) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id="e1", raw_prompt=True,
        blocks=[common_pb2.PromptBlock(id="u1", kind=common_pb2.BLOCK_KIND_USER_HISTORY, text=text)],
        params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens))


def wait_healthy(router: router_pb2_grpc.RouterStub) -> None:
    deadline = time.monotonic() + 20
    while not any(r.healthy for r in router.Info(router_pb2.RouterInfoRequest(), timeout=5).replicas):
        assert time.monotonic() < deadline, "the router never saw its decoder healthy"
        time.sleep(0.05)


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(call())
    return err.value


def unpack(status, kind):
    (found,) = [d for d in status.details if d.Is(kind.DESCRIPTOR)]
    message = kind()
    found.Unpack(message)
    return message


def test_a_decoders_invalid_argument_keeps_its_bad_request_through_the_router(servers, channel_to):
    decoder, router_handle, _ = servers
    router = router_pb2_grpc.RouterStub(channel_to(router_handle.address))
    wait_healthy(router)
    too_long = request("a prompt far longer than sixteen tokens of the tiny model\n")
    decoder_stub = decoder_pb2_grpc.DecoderStub(channel_to(decoder.address))
    direct = failure(lambda: decoder_stub.Generate(too_long, timeout=20))
    relayed = failure(lambda: router.Generate(too_long, timeout=20))
    assert relayed.code() == direct.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert relayed.details() == direct.details()
    status = rpc_status.from_call(relayed)
    assert status == rpc_status.from_call(direct)  # the decoder's own, intact
    (violation,) = unpack(status, error_details_pb2.BadRequest).field_violations
    assert violation.field == "blocks" and str(MAX_PROMPT_TOKENS) in violation.description
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, info.metadata["limit"]) == ("PROMPT_TOO_LONG", "adaccel.v1",
                                                                  str(MAX_PROMPT_TOKENS))


def test_the_routers_own_validation_errors_carry_details(servers, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(servers[1].address))
    err = failure(lambda: router.Generate(request("hi\n", max_new_tokens=5), timeout=20))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    (violation,) = unpack(status, error_details_pb2.BadRequest).field_violations
    assert (violation.field, violation.description) == ("params.max_new_tokens", "must be in 1..4, got 5")
    assert unpack(status, error_details_pb2.ErrorInfo).reason == "INVALID_FIELD"


def test_no_healthy_replica_is_unavailable_with_its_reason(servers, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(servers[2].address))
    err = failure(lambda: router.Generate(request("hi\n"), timeout=20))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info = unpack(rpc_status.from_call(err), error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("NO_HEALTHY_REPLICA", "adaccel.v1")
