"""Fuzzing the generation path: router Generate/Info and decoder Generate/Info/Report with random and
mutated requests, invalid UTF-8 in block texts, wrong enum values, huge repeated blocks. Zero
crashes; both still SERVING and generating afterwards."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaccel.v1 import common_pb2, decoder_pb2, router_pb2, router_pb2_grpc
from common.rpc.channels import health_status, open_channel
from common.telemetry import null_telemetry
from services.decoder.server import SERVICE_NAME as DECODER_SERVICE
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from services.router.server import SERVICE_NAME as ROUTER_SERVICE
from services.router.server import create_router_server
from services.router.settings import RouterSettings
from tests.fuzz.conftest import FUZZ_SETTINGS
from tests.fuzz.wire import INVALID_UTF8, Mutator, field_bytes, field_varint, raw_method

MUTATED_PER_METHOD = 600
# The in-process servers use the global random module in their threads while hypothesis draws.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
MAX_NEW_TOKENS = 3


@pytest.fixture(scope="module")
def generation_servers(tmp_path_factory, tiny_llama_path, one_torch_thread):
    data_dir = tmp_path_factory.mktemp("fuzz-gen")
    # Small limits keep the valid requests among the fuzzed ones cheap to generate.
    decoder = create_decoder_server(DecoderSettings(
        data_dir=data_dir, model_path=tiny_llama_path, max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=256,
        torch_threads=1, decoder_id="decoder-fuzz", max_queue=4, workers=8), null_telemetry())
    router = create_router_server(RouterSettings(data_dir=data_dir, decoder_addrs=[decoder.address], heartbeat_s=0.5,
                                                 max_new_tokens=MAX_NEW_TOKENS, workers=4), null_telemetry())
    channels = {"router": open_channel(router.address), "decoder": open_channel(decoder.address)}
    yield channels
    for channel in channels.values():
        channel.close()
    router.stop(0)
    decoder.stop(0)


def request(text: str = "Aurora headphones, 30 h battery.", **params) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id="fuzz", pool_key="electronics/audio",
        blocks=[common_pb2.PromptBlock(id="instr-1", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text="Describe:\n"),
                common_pb2.PromptBlock(id="item-42", kind=common_pb2.BLOCK_KIND_ITEM, text=text)],
        params=common_pb2.GenerationParams(max_new_tokens=params.pop("max_new_tokens", 2), **params))


SEEDS = [request().SerializeToString(),
         request("x" * 50, mode=common_pb2.VERIFICATION_MODE_RELAXED).SerializeToString(),
         request(advanced=common_pb2.AdvancedParams(disable_drafting=True, decoding_length=4,
                                                    branch_length=2)).SerializeToString()]


@pytest.mark.parametrize("service, method, shape, seeds", [
    ("router", "Generate", "server_stream", SEEDS),
    ("decoder", "Generate", "server_stream", SEEDS),
    ("router", "Info", "unary", [router_pb2.RouterInfoRequest().SerializeToString()]),
    ("decoder", "Info", "unary", [decoder_pb2.DecoderInfoRequest().SerializeToString()]),
    ("decoder", "Report", "unary", [decoder_pb2.DecoderReportRequest().SerializeToString()]),
])
def test_mutated_wire_data_gets_clear_statuses(generation_servers, service, method, shape, seeds, rng, tally):
    name = "Router" if service == "router" else "Decoder"
    call = raw_method(generation_servers[service], f"/adaccel.v1.{name}/{method}", shape, timeout_s=30)
    mutate = Mutator(seeds, rng)
    t = tally(f"{service}.{method}")
    for _ in range(MUTATED_PER_METHOD):
        data = mutate()
        t.record(data, call(data))
    t.check()


DEFECTS = ["none", "none", "none", "block_kind", "block_text_utf8", "block_text_huge", "block_id", "no_blocks",
           "max_new_tokens", "mode", "decoding_length", "branch_length", "temperature", "pool_key", "request_id",
           "many_blocks", "unknown_field"]


@st.composite
def generate_requests(draw) -> bytes:
    """A valid request with at most one defect, so that each check at the edge is reached alone."""
    defect = draw(st.sampled_from(DEFECTS))
    pick = lambda good, bad: draw(st.sampled_from(bad)) if defect == name else good  # noqa: E731
    blocks = b""
    for i in range(0 if defect == "no_blocks" else draw(st.integers(1, 3))):
        name = "block_text_utf8"
        text = pick(draw(st.text(min_size=1, max_size=40)).encode(), list(INVALID_UTF8))
        name = "block_text_huge"
        text = pick(text, [b"w" * 70_000])
        name = "block_id"
        block_id = pick(b"item-%d" % i, [b"", b"bad id", b"x" * 200, b"it\n", b"\xff"])
        name = "block_kind"
        kind = pick(draw(st.integers(1, 4)), [0, 5, -1, 2**31 - 1])
        blocks += field_bytes(2, field_bytes(1, block_id) + field_varint(2, kind) + field_bytes(3, text))
    name = "max_new_tokens"
    params = field_varint(1, pick(draw(st.integers(1, MAX_NEW_TOKENS)), [0, MAX_NEW_TOKENS + 1, -1, 2**31 - 1]))
    name = "mode"
    params += field_varint(2, pick(draw(st.integers(0, 2)), [3, -7]))
    advanced = field_varint(1, draw(st.integers(0, 1)))  # params.advanced (9): disable_drafting
    name = "decoding_length"
    advanced += field_varint(2, pick(draw(st.sampled_from([0, 4, 16])), [129, -1]))
    name = "branch_length"
    advanced += field_varint(3, pick(draw(st.sampled_from([0, 2, 8])), [33, -1]))
    params += field_bytes(9, advanced)
    name = "temperature"  # float32 NaN / +Inf / -1 as raw fixed32
    params += field_bytes(4, pick(b"", [b"\x0d\x00\x00\xc0\x7f", b"\x0d\x00\x00\x80\x7f", b"\x0d\x00\x00\x80\xbf"]))
    name = "request_id"
    data = field_bytes(1, pick(b"r-1", [b"r" * 200, b"\xc3\x28"])) + blocks
    name = "pool_key"
    data += field_bytes(3, pick(b"electronics/audio", [b"bad key", b"a\n", b"\xc3\x28", b"p" * 129]))
    data += field_bytes(4, params)
    if defect == "many_blocks":  # a huge repeated field: thousands of blocks
        data += field_bytes(2, field_bytes(1, b"b") + field_varint(2, 4) + field_bytes(3, b"t")) * 3000
    if defect == "unknown_field":
        data += field_bytes(99, b"ignored") + field_varint(100, 7)
    return data


@pytest.mark.parametrize("service", ["router", "decoder"])
def test_structured_generate_requests(generation_servers, service, tally):
    name = "Router" if service == "router" else "Decoder"
    call = raw_method(generation_servers[service], f"/adaccel.v1.{name}/Generate", "server_stream", timeout_s=30)
    t = tally(f"{service}.Generate(structured)")

    @settings(FUZZ_SETTINGS, max_examples=250)
    @given(generate_requests())
    def run(data):
        outcome = t.record(data, call(data))
        if outcome.ok:  # a stream of deltas then exactly one summary
            chunks = [common_pb2.GenerateChunk.FromString(r) for r in outcome.replies]
            assert chunks and chunks[-1].HasField("summary")
            assert len(chunks[-1].summary.token_ids) <= MAX_NEW_TOKENS

    run()
    t.check()
    assert t.ok > 0 and t.codes.get("INVALID_ARGUMENT", 0) > 0, t.codes


def test_both_still_serve_and_generate(generation_servers):
    assert health_status(generation_servers["decoder"], DECODER_SERVICE) == "SERVING"
    assert health_status(generation_servers["router"], ROUTER_SERVICE) == "SERVING"
    chunks = list(router_pb2_grpc.RouterStub(generation_servers["router"]).Generate(request(), timeout=30))
    assert chunks[-1].summary.stats.new_tokens == 2
