"""Pool service in-process on 127.0.0.1:0 with a real RocksDB and real gRPC clients (no broker):
draft retrieval with fallback, snapshot version semantics, bounds, bad input, concurrency,
restart durability."""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.drafting.trie import TokenTrie
from common.telemetry import null_telemetry
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings
from tests.fuzz.pool_model import naive_counts

VOCAB = 100


def settings_for(tmp_path, **overrides) -> PoolSettings:
    fields = dict(data_dir=tmp_path, vocab_size=VOCAB, ngram_length=4, max_tokens_per_insert=64,
                  pool_capacity=10_000, max_pools=8)
    return PoolSettings(**{**fields, **overrides})


@pytest.fixture
def pool_server(tmp_path):
    handles = []

    def start(**overrides):
        handle = create_pool_server(settings_for(tmp_path, **overrides), null_telemetry())
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop(0)


@pytest.fixture
def stub(pool_server, channel_to):
    return pool_pb2_grpc.PoolStub(channel_to(pool_server().address))


def insert(stub, pool_key, *seqs, item_id="", kind=pool_pb2.SEQUENCE_KIND_OUTPUT):
    return stub.Insert(pool_pb2.InsertRequest(pool_key=pool_key, item_id=item_id, kind=kind,
                                              sequences=[pool_pb2.TokenSequence(token_ids=s) for s in seqs]),
                       timeout=10)


def fetch_snapshot(stub, pool_key, have_version=0):
    chunks = list(stub.GetSnapshot(pool_pb2.SnapshotRequest(pool_key=pool_key, have_version=have_version),
                                   timeout=10))
    header, data = chunks[0].header, b"".join(c.data for c in chunks[1:])
    assert header.total_bytes == len(data)
    return header, data


def test_drafts_come_from_the_pool_or_its_parents_or_the_global_pool(stub):
    insert(stub, "ads/shoes", [1, 2, 3, 4], [1, 2, 3, 5])
    insert(stub, "global", [1, 2, 7, 7])
    ask = lambda key, **kw: stub.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(  # noqa: E731
        pool_key=key, context=[9, 1, 2], decoding_length=8, branch_length=2, **kw), timeout=5)
    tree = ask("ads/shoes/running")
    assert tree.pool_key == "ads/shoes" and tree.pool_version == 1
    assert list(tree.tokens[:2]) == [3, 4] and list(tree.parents[:2]) == [-1, 0]
    assert ask("toys").pool_key == "global" and list(ask("").tokens[:2]) == [7, 7]
    with pytest.raises(grpc.RpcError) as err:
        ask("ads/shoes/running", exact=True)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    versions = stub.GetVersions(pool_pb2.VersionsRequest(pool_keys=["ads/shoes/running", "toys"]), timeout=5)
    assert [(v.resolved_key, v.version) for v in versions.pools] == [("ads/shoes", 1), ("global", 1)]


def test_snapshots_come_once_per_version(stub):
    insert(stub, "p", [1, 2, 3, 1, 2])
    header, data = fetch_snapshot(stub, "p")
    assert (header.version, header.nodes) == (1, 11)
    trie = TokenTrie.from_bytes(data)
    assert trie.count((1, 2)) == 2 and trie.count((1, 2, 3, 1)) == 1
    current, nothing = fetch_snapshot(stub, "p", have_version=1)  # the caller is current: header only
    assert (current.version, current.total_bytes, nothing) == (1, 0, b"")
    assert fetch_snapshot(stub, "p")[1] == data  # same version, same bytes (cached)
    insert(stub, "p", [2, 3])
    header, data = fetch_snapshot(stub, "p", have_version=1)
    assert header.version == 2 and TokenTrie.from_bytes(data).count((2, 3)) == 2


def test_snapshots_stream_in_chunks(pool_server, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool_server(snapshot_chunk_bytes=1024).address))
    rng = random.Random(0)
    for _ in range(5):
        insert(stub, "big", [rng.randrange(VOCAB) for _ in range(60)])
    chunks = list(stub.GetSnapshot(pool_pb2.SnapshotRequest(pool_key="big"), timeout=10))
    assert len(chunks) > 2 and all(len(c.data) <= 1024 for c in chunks[1:])


@pytest.mark.parametrize("call, code, detail", [
    (lambda s: insert(s, "p", [1, VOCAB]), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0]: token id 100"),
    (lambda s: insert(s, "p", [-1]), grpc.StatusCode.INVALID_ARGUMENT, "sequences[0]: token id -1"),
    (lambda s: insert(s, "p", list(range(40)), list(range(40))), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "sequences: at least 80 tokens, limit is 64"),
    (lambda s: insert(s, "", [1]), grpc.StatusCode.INVALID_ARGUMENT, "pool_key"),
    (lambda s: insert(s, "p", [1], item_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT, "item_id"),
    (lambda s: insert(s, "p"), grpc.StatusCode.INVALID_ARGUMENT, "sequences: nothing to insert"),
    (lambda s: s.Insert(pool_pb2.InsertRequest(pool_key="p", texts=["hi"]), timeout=5),
     grpc.StatusCode.FAILED_PRECONDITION, "texts: this pool service has no tokenizer"),
    (lambda s: fetch_snapshot(s, "nope"), grpc.StatusCode.NOT_FOUND, "pool_key: no pool 'nope'"),
    (lambda s: s.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(pool_key="p", context=[1, 500]), timeout=5),
     grpc.StatusCode.INVALID_ARGUMENT, "context: token id 500"),
    (lambda s: s.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(context=[1], decoding_length=1000), timeout=5),
     grpc.StatusCode.INVALID_ARGUMENT, "decoding_length"),
    (lambda s: s.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(context=[1] * 65), timeout=5),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "context: 65 tokens, limit is 64"),
    (lambda s: s.DeleteItem(pool_pb2.DeleteItemRequest(item_id="x", pool_key="nope"), timeout=5),
     grpc.StatusCode.NOT_FOUND, "pool_key: no pool 'nope'"),
    (lambda s: s.GetVersions(pool_pb2.VersionsRequest(pool_keys=["a"] * 1025), timeout=5),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "pool_keys: 1025 keys, limit is 1024"),
])
def test_bad_requests_fail_with_the_field_and_limit_named_and_change_nothing(stub, call, code, detail):
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() == code and err.value.details().startswith(detail), err.value.details()
    assert stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5).pools == []


def test_delete_item_takes_its_sequences_back(stub):
    insert(stub, "p", [1, 2, 3], item_id="it-1")
    insert(stub, "p", [1, 2, 4], item_id="it-2")
    reply = stub.DeleteItem(pool_pb2.DeleteItemRequest(item_id="it-1"), timeout=5)
    assert reply.sequences_removed == 1 and [(p.pool_key, p.version) for p in reply.pools] == [("p", 3)]
    tree = stub.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(pool_key="p", context=[1, 2]), timeout=5)
    assert list(tree.tokens) == [4]
    assert stub.DeleteItem(pool_pb2.DeleteItemRequest(item_id="it-1"), timeout=5).sequences_removed == 0


def test_pools_stay_within_their_bounds(pool_server, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool_server(pool_capacity=64, max_pools=2).address))
    rng = random.Random(1)
    for i in range(31):
        key = "p2" if i == 30 else f"p{i % 2}"  # the last one evicts p0, the least recently updated
        reply = insert(stub, key, [rng.randrange(VOCAB) for _ in range(rng.randint(5, 30))])
        assert reply.nodes <= 64
    stats = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
    assert sorted(p.pool_key for p in stats.pools) == ["p1", "p2"] and stats.pools_evicted == 1
    assert all(p.nodes <= p.capacity == 64 for p in stats.pools)
    assert next(p for p in stats.pools if p.pool_key == "p1").squeezes > 0  # decayed, not grown
    assert stats.max_pools == 2 and stats.pool_capacity == 64 and stats.disk_bytes > 0


def test_concurrent_inserts_and_reads_lose_nothing(stub):
    rng = random.Random(2)
    work = {key: [[rng.randrange(20) for _ in range(rng.randint(1, 12))] for _ in range(30)] for key in ("a", "b")}
    errors = []
    done = threading.Event()

    def writer(key, seqs):
        try:
            for seq in seqs:
                insert(stub, key, seq)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        try:
            while not done.is_set():
                for key in ("a", "b"):
                    stub.RetrieveDrafts(pool_pb2.RetrieveDraftsRequest(pool_key=key, context=[1, 2]), timeout=5)
                    stub.GetVersions(pool_pb2.VersionsRequest(pool_keys=[key]), timeout=5)
                    if key in {p.pool_key for p in stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5).pools}:
                        fetch_snapshot(stub, key)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(k, s[i::2])) for k, s in work.items() for i in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert errors == []
    for key, seqs in work.items():
        header, data = fetch_snapshot(stub, key)
        assert header.version == len(seqs)
        trie = TokenTrie.from_bytes(data)
        expected = naive_counts(seqs, 4)
        assert len(trie) == len(expected)
        assert all(trie.count(path) == count for path, count in expected.items())


def test_a_restart_serves_the_same_pools(pool_server, channel_to):
    handle = pool_server(pool_capacity=64)
    stub = pool_pb2_grpc.PoolStub(channel_to(handle.address))
    rng = random.Random(3)
    seqs = [[rng.randrange(6) for _ in range(20)] for _ in range(12)]
    for i, seq in enumerate(seqs):
        insert(stub, "p", seq, item_id=f"it-{i % 4}")
    stub.DeleteItem(pool_pb2.DeleteItemRequest(item_id="it-1"), timeout=5)
    before = fetch_snapshot(stub, "p")
    asks = [pool_pb2.RetrieveDraftsRequest(pool_key="p", context=[a, b]) for a in range(6) for b in range(6)]
    drafts = [stub.RetrieveDrafts(ask, timeout=5) for ask in asks]
    handle.stop(0)
    stub = pool_pb2_grpc.PoolStub(channel_to(pool_server(pool_capacity=64).address))
    after = fetch_snapshot(stub, "p")
    assert (after[0].version, after[0].nodes) == (before[0].version, before[0].nodes)
    old, new = TokenTrie.from_bytes(before[1]), TokenTrie.from_bytes(after[1])
    assert len(old) == len(new) > 0
    for path in naive_counts(seqs, 4):
        assert (old.count(path), old.count(path, "input")) == (new.count(path), new.count(path, "input"))
    assert [stub.RetrieveDrafts(ask, timeout=5) for ask in asks] == drafts
    info = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5).pools[0]
    assert info.squeezes > 0 and info.sequences > 0
