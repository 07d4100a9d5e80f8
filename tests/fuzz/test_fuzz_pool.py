"""Fuzzing the retrieval-pool's gRPC boundary: random and mutated protobufs, wrong types, invalid
UTF-8, token ids out of range, huge repeated fields. Zero crashes, the service still SERVING, and
afterwards the pools on disk equal an independent model of every accepted write."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.rpc.channels import health_status, open_channel
from common.telemetry import null_telemetry
from services.pool.server import SERVICE_NAME, create_pool_server
from services.pool.settings import PoolSettings
from tests.fuzz.conftest import FUZZ_SETTINGS
from tests.fuzz.pool_model import PoolModel, mismatched_pools
from tests.fuzz.wire import INVALID_UTF8, Mutator, field_bytes, field_varint, packed_varints, raw_method

VOCAB = 300
NGRAM = 4
MAX_TOKENS = 2048
MUTATED_PER_METHOD = 1000

POOL_KEYS = ["shop", "shop/shoes", "a/b/c", "x", "", "bad key", "ü/ß", "a" * 129, "../..", "shop/"]
ITEM_IDS = ["", "it-1", "it-2", "sku:9/x", "bad id", "it-1" * 40]
KINDS = [0, 1, 2, 3, -1, 2**31 - 1]
TOKEN = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)]))


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz-pool")
    settings = PoolSettings(data_dir=data_dir, vocab_size=VOCAB, ngram_length=NGRAM, pool_capacity=10**8,
                            max_pools=10**6, max_tokens_per_insert=MAX_TOKENS, snapshot_chunk_bytes=4096, workers=4)
    handle = create_pool_server(settings, null_telemetry())
    channel = open_channel(handle.address)
    yield handle, channel, data_dir
    channel.close()
    handle.stop(0)


@pytest.fixture(scope="module")
def model() -> PoolModel:
    return PoolModel(ngram_length=NGRAM)


def apply_accepted(model: PoolModel, method: str, request: bytes) -> None:
    """Replays an accepted write on the model, decoding the very bytes the server accepted."""
    if method == "Insert":
        req = pool_pb2.InsertRequest.FromString(request)
        kind = "input" if req.kind == pool_pb2.SEQUENCE_KIND_INPUT else "output"
        model.insert(req.pool_key, [list(s.token_ids) for s in req.sequences], kind,
                     (req.item_id,) if req.item_id else ())
    elif method == "DeleteItem":
        req = pool_pb2.DeleteItemRequest.FromString(request)
        model.remove_item(req.item_id, req.pool_key or None)


METHODS = {  # method -> (shape, writes)
    "RetrieveDrafts": ("unary", False),
    "GetSnapshot": ("server_stream", False),
    "Insert": ("unary", True),
    "DeleteItem": ("unary", True),
    "GetVersions": ("unary", False),
    "Stats": ("unary", False),
    "Info": ("unary", False),
}


def seeds(method: str) -> list[bytes]:
    if method == "RetrieveDrafts":
        msgs = [pool_pb2.RetrieveDraftsRequest(pool_key="shop", context=[1, 2], decoding_length=8, branch_length=4),
                pool_pb2.RetrieveDraftsRequest(pool_key="a/b/c", context=list(range(50)), exact=True)]
    elif method == "GetSnapshot":
        msgs = [pool_pb2.SnapshotRequest(pool_key="shop"), pool_pb2.SnapshotRequest(pool_key="", have_version=3)]
    elif method == "Insert":
        msgs = [pool_pb2.InsertRequest(pool_key="shop", item_id="it-1",
                                       sequences=[pool_pb2.TokenSequence(token_ids=[1, 2, 3, 4, 5])]),
                pool_pb2.InsertRequest(pool_key="shop/shoes", kind=pool_pb2.SEQUENCE_KIND_INPUT,
                                       sequences=[pool_pb2.TokenSequence(token_ids=[7, 8, 9]),
                                                  pool_pb2.TokenSequence(token_ids=[9, 8, 7, 6])])]
    elif method == "DeleteItem":
        msgs = [pool_pb2.DeleteItemRequest(item_id="it-1"), pool_pb2.DeleteItemRequest(item_id="it-2", pool_key="shop")]
    elif method == "GetVersions":
        msgs = [pool_pb2.VersionsRequest(pool_keys=["shop", "a/b/c", ""])]
    elif method == "Info":
        msgs = [pool_pb2.PoolServiceInfoRequest()]
    else:
        msgs = [pool_pb2.PoolStatsRequest()]
    return [m.SerializeToString() for m in msgs]


@pytest.mark.parametrize("method", list(METHODS))
def test_mutated_wire_data_gets_clear_statuses(pool_server, model, method, rng, tally):
    handle, channel, _ = pool_server
    shape, writes = METHODS[method]
    call = raw_method(channel, f"/adaccel.v1.Pool/{method}", shape)
    mutate = Mutator(seeds(method), rng)
    t = tally(f"pool.{method}")
    for _ in range(MUTATED_PER_METHOD):
        request = mutate()
        outcome = t.record(request, call(request))
        if writes and outcome.ok:
            apply_accepted(model, method, request)
    t.check()
    assert t.codes.get("INVALID_ARGUMENT", 0) > 0 or method in ("Stats", "Info"), t.codes  # the parser saw garbage


@st.composite
def insert_requests(draw) -> bytes:
    message = pool_pb2.InsertRequest(pool_key=draw(st.sampled_from(POOL_KEYS)),
                                     item_id=draw(st.sampled_from(ITEM_IDS)))
    for _ in range(draw(st.integers(0, 3))):
        message.sequences.add(token_ids=draw(st.lists(TOKEN, max_size=24)))
    if draw(st.booleans()) and draw(st.booleans()):
        message.texts.append(draw(st.text(max_size=20)))
    data = message.SerializeToString()
    # Fields proto3 cannot express through the API: unknown enum values, invalid UTF-8, huge repeats.
    extra = draw(st.sampled_from(["none", "kind", "utf8", "huge", "negative_packed"]))
    if extra == "kind":
        data += field_varint(5, draw(st.sampled_from(KINDS)))
    elif extra == "utf8":
        data += field_bytes(draw(st.sampled_from([1, 3, 4])), draw(st.sampled_from(INVALID_UTF8)))
    elif extra == "huge":
        data += field_bytes(2, packed_varints(1, [1] * draw(st.sampled_from([MAX_TOKENS + 1, 50_000]))))
    elif extra == "negative_packed":
        data += field_bytes(2, packed_varints(1, [1, 2, -5]))
    return data


def test_structured_inserts_and_deletes_are_validated(pool_server, model, tally):
    _, channel, _ = pool_server
    insert = raw_method(channel, "/adaccel.v1.Pool/Insert", "unary")
    delete = raw_method(channel, "/adaccel.v1.Pool/DeleteItem", "unary")
    t = tally("pool.Insert+DeleteItem(structured)")

    deletes = st.builds(lambda i, p: pool_pb2.DeleteItemRequest(item_id=i, pool_key=p).SerializeToString(),
                        st.sampled_from(ITEM_IDS), st.sampled_from(POOL_KEYS))

    @settings(FUZZ_SETTINGS, max_examples=300)
    @given(st.lists(st.one_of(insert_requests().map(lambda b: ("Insert", b)),
                              deletes.map(lambda b: ("DeleteItem", b))), min_size=1, max_size=4))
    def run(requests):
        for method, request in requests:
            outcome = t.record(request, (delete if method == "DeleteItem" else insert)(request))
            if outcome.ok:
                apply_accepted(model, method, request)

    run()
    t.check()
    assert t.ok > 20, t.codes  # some inputs were valid, so the model has something to check


def test_service_still_serves_and_pools_equal_the_model(pool_server, model, reliability_report):
    handle, channel, data_dir = pool_server
    assert health_status(channel, SERVICE_NAME) == "SERVING"
    stub = pool_pb2_grpc.PoolStub(channel)
    reply = stub.Insert(pool_pb2.InsertRequest(pool_key="after/fuzz", sequences=[
        pool_pb2.TokenSequence(token_ids=[1, 2, 3])]), timeout=5)
    model.insert("after/fuzz", [[1, 2, 3]], "output")
    assert reply.version >= 1
    with pytest.raises(grpc.RpcError) as err:
        stub.Insert(pool_pb2.InsertRequest(pool_key="after/fuzz"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    handle.stop(0)  # the store on disk is what counts: what a restart would serve
    mismatched = mismatched_pools(data_dir / "pool", model)
    reliability_report.pool_mismatches += len(mismatched)
    assert not mismatched, f"pools differing from the model: {mismatched[:5]}"
    assert len(model.pools) >= 3
