"""Fuzzing the kv-store's gRPC boundary: mutated chunk streams, headers that lie about their data,
NaN/Inf tensors, huge repeated fields. Zero crashes; every block stored reads back byte for byte;
every block on disk verifies (checksum, header, finite values)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from adaccel.v1 import kvstore_pb2
from common.blocks.kv_codec import DTYPE_BYTES, checksum, non_finite_values
from common.rpc.channels import health_status, open_channel
from common.telemetry import null_telemetry
from services.kvstore.block_store import validate_block
from services.kvstore.server import SERVICE_NAME, create_kvstore_server
from services.kvstore.settings import KvStoreSettings
from tests.fuzz.conftest import FUZZ_SETTINGS
from tests.fuzz.wire import INVALID_UTF8, Mutator, field_bytes, raw_method

MAX_BLOCK_BYTES = 1 << 16
MUTATED_PER_METHOD = 1000


@pytest.fixture(scope="module")
def kv_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz-kv")
    # A small memory budget, so blocks move between the memory tier and the disk tier while fuzzing.
    settings = KvStoreSettings(data_dir=data_dir, memory_budget_bytes=8 << 10, max_block_bytes=MAX_BLOCK_BYTES,
                               chunk_bytes=1024, workers=4)
    handle = create_kvstore_server(settings, null_telemetry())
    channel = open_channel(handle.address)
    yield handle, channel, data_dir
    channel.close()
    handle.stop(0)


@pytest.fixture(scope="module")
def stored() -> dict[tuple[str, bytes], bytes]:
    """(model id, block hash) -> data of every Put the store acknowledged as stored."""
    return {}


def header_chunk(**fields) -> bytes:
    return kvstore_pb2.KvChunk(header=kvstore_pb2.KvHeader(**fields)).SerializeToString()


def data_chunk(data: bytes) -> bytes:
    return kvstore_pb2.KvChunk(data=data).SerializeToString()


def valid_block(i: int, dtype: str = "float16", n: int = 64) -> list[bytes]:
    data = np.arange(n, dtype=np.float32).astype(np.float16 if dtype == "float16" else np.float32).tobytes()
    return [header_chunk(block_hash=bytes([i]) * 16, model_id="m", dtype=dtype, shape=[n],
                         total_bytes=len(data), checksum=checksum(data), num_tokens=4),
            data_chunk(data[: len(data) // 2]), data_chunk(data[len(data) // 2:])]


def _header_fields(chunk: bytes) -> dict:
    header = kvstore_pb2.KvChunk.FromString(chunk).header
    return {f.name: v for f, v in header.ListFields()}


def remember_accepted(stored: dict, chunks: list[bytes], reply: bytes) -> None:
    if not kvstore_pb2.PutReply.FromString(reply).stored:
        return
    parsed = [kvstore_pb2.KvChunk.FromString(c) for c in chunks]
    header = next(c.header for c in parsed if c.HasField("header"))
    stored[(header.model_id, header.block_hash)] = b"".join(c.data for c in parsed if c.HasField("data"))


def test_mutated_put_streams(kv_server, stored, rng, tally):
    _, channel, _ = kv_server
    put = raw_method(channel, "/adaccel.v1.KvStore/Put", "client_stream")
    seeds = [c for i in range(4) for c in valid_block(i, ("float16", "float32")[i % 2])]
    mutate = Mutator(seeds, rng)
    t = tally("kvstore.Put")
    for i in range(MUTATED_PER_METHOD):
        chunks = valid_block(100 + i % 100, "float32")
        if rng.random() < 0.1:  # valid traffic between the garbage: new blocks, stored as sent
            chunks = valid_block(0, "float32", n=8 + i)
            chunks[0] = header_chunk(**{**_header_fields(chunks[0]), "block_hash": b"valid-%d" % i})
        else:  # mutate one or more of the chunks (often the header), keep the rest as sent
            for j in rng.sample(range(len(chunks)), rng.randint(1, len(chunks))):
                chunks[j] = mutate()
        if rng.random() < 0.1:
            chunks = chunks[: rng.randrange(len(chunks))]
        outcome = t.record(chunks, put(chunks))
        if outcome.ok:
            remember_accepted(stored, chunks, outcome.replies[0])
    t.check()
    assert t.codes.get("INVALID_ARGUMENT", 0) > MUTATED_PER_METHOD // 2, t.codes


@pytest.mark.parametrize("method, shape, seed_messages", [
    ("Get", "server_stream", [kvstore_pb2.GetRequest(block_hash=b"\x01" * 16, model_id="m"),
                              kvstore_pb2.GetRequest(block_hash=b"\x77" * 16, model_id="m")]),
    ("Contains", "unary", [kvstore_pb2.ContainsRequest(block_hashes=[b"\x01" * 16, b"zz"], model_id="m")]),
    ("Stats", "unary", [kvstore_pb2.KvStatsRequest()]),
])
def test_mutated_reads(kv_server, method, shape, seed_messages, rng, tally):
    _, channel, _ = kv_server
    call = raw_method(channel, f"/adaccel.v1.KvStore/{method}", shape)
    mutate = Mutator([m.SerializeToString() for m in seed_messages], rng)
    t = tally(f"kvstore.{method}")
    for _ in range(MUTATED_PER_METHOD):
        request = mutate()
        t.record(request, call(request))
    # Huge repeated fields and names: bounded by limits, not by luck.
    for request in (field_bytes(1, b"h" * 60_000) + field_bytes(2, b"m"), field_bytes(2, b"m" * 70_000),
                    b"".join(field_bytes(1, b"%016d" % i) for i in range(20_000)) + field_bytes(2, b"m")):
        outcome = t.record(request, call(request))
        assert outcome.code.name in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND", "OK"), outcome
    t.check()


DTYPES = st.sampled_from([*DTYPE_BYTES, "int128", "", "float32\x00"])
SPECIALS = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1.0, -0.0, 65504.0, 1e-45])


@st.composite
def put_streams(draw) -> list[bytes]:
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 64))
    values = np.array(draw(st.lists(st.one_of(st.floats(-1e4, 1e4), SPECIALS), min_size=n, max_size=n)))
    itemsize = DTYPE_BYTES.get(dtype, 4)
    if dtype in ("float32", "float16", "float64"):
        data = values.astype({"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]).tobytes()
    else:
        data = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    shape = draw(st.sampled_from([[n], [1, n], [n, 1, 1], [0, n], [-n], [n, 2**40], []]))
    total = draw(st.sampled_from([len(data), len(data) + 1, 0, -1, MAX_BLOCK_BYTES + 1]))
    crc = draw(st.sampled_from([checksum(data), checksum(data) ^ 1]))
    model_id = draw(st.sampled_from(["m", "", "m" * 300, "модель"]))
    chunks = [header_chunk(block_hash=draw(st.binary(min_size=0, max_size=70)), model_id=model_id, dtype=dtype,
                           shape=shape, total_bytes=total, checksum=crc, num_tokens=draw(st.integers(-5, 5)))]
    cut = draw(st.integers(0, len(data)))
    chunks += [data_chunk(data[:cut]), data_chunk(data[cut:])]
    order = draw(st.sampled_from(["as_is", "header_twice", "data_first", "utf8_dtype", "no_header"]))
    if order == "header_twice":
        chunks.insert(1, chunks[0])
    elif order == "data_first":
        chunks = chunks[1:] + chunks[:1]
    elif order == "utf8_dtype":  # a header whose dtype string is not UTF-8
        chunks[0] = field_bytes(1, field_bytes(3, draw(st.sampled_from(INVALID_UTF8))))
    elif order == "no_header":
        chunks = chunks[1:]
    return chunks


def test_structured_puts_with_nan_inf_and_lying_headers(kv_server, stored, tally):
    _, channel, _ = kv_server
    put = raw_method(channel, "/adaccel.v1.KvStore/Put", "client_stream")
    t = tally("kvstore.Put(structured)")

    @settings(FUZZ_SETTINGS, max_examples=500)
    @given(put_streams())
    def run(chunks):
        outcome = t.record(chunks, put(chunks))
        if outcome.ok:
            remember_accepted(stored, chunks, outcome.replies[0])
            data = b"".join(kvstore_pb2.KvChunk.FromString(c).data for c in chunks)
            header = kvstore_pb2.KvChunk.FromString(chunks[0]).header
            assert non_finite_values(header.dtype, data) == 0, "a NaN/Inf block was stored"

    run()
    t.check()
    # Inf/NaN in an otherwise valid float block: refused by name.
    nan = np.array([1.0, float("nan"), 2.0, 3.0], dtype=np.float32).tobytes()
    chunks = [header_chunk(block_hash=b"nan-block", model_id="m", dtype="float32", shape=[4], total_bytes=16,
                           checksum=checksum(nan)), data_chunk(nan)]
    outcome = t.record(chunks, put(chunks))
    assert outcome.code.name == "INVALID_ARGUMENT" and "Inf/NaN" in outcome.details


def test_store_still_serves_and_every_block_verifies(kv_server, stored, reliability_report):
    handle, channel, data_dir = kv_server
    assert health_status(channel, SERVICE_NAME) == "SERVING"
    assert len(stored) >= 10, "too few accepted puts to check anything"
    get = raw_method(channel, "/adaccel.v1.KvStore/Get", "server_stream")
    corrupt = 0
    for (model_id, block_hash), data in stored.items():
        outcome = get(kvstore_pb2.GetRequest(block_hash=block_hash, model_id=model_id).SerializeToString())
        chunks = [kvstore_pb2.KvChunk.FromString(r) for r in outcome.replies]
        corrupt += not outcome.ok or b"".join(c.data for c in chunks[1:]) != data
    handle.stop(0)
    # Independently of the service: every row on disk parses and verifies.
    db = Rdict(str(data_dir / "kvstore" / "shard-0"), Options(raw_mode=True))
    on_disk = 0
    try:
        for _key, raw in db.items():
            on_disk += 1
            n = int.from_bytes(raw[:4], "big")
            header = kvstore_pb2.KvHeader.FromString(raw[4:4 + n])
            data = raw[4 + n:]
            try:
                validate_block(header, data, MAX_BLOCK_BYTES)
            except Exception:  # noqa: BLE001 - any failure is a corrupt block
                corrupt += 1
    finally:
        db.close()
    reliability_report.corrupt_blocks += corrupt
    assert corrupt == 0
    assert on_disk == len(stored)  # nothing stored that was not acknowledged, nothing acknowledged lost

