"""The kv-store's disk tier budget: LRU and idle-model eviction, the index rebuilt at open, stats
without a scan; against a real RocksDB directory (and, last, a real server on loopback)."""

from __future__ import annotations

import random
import threading

import grpc
import numpy as np
import pytest

from adaccel.v1 import kvstore_pb2, kvstore_pb2_grpc
from common.blocks.kv_codec import checksum
from common.rpc.channels import open_channel
from common.rpc.errors import NotFound, ResourceExhausted
from common.telemetry import null_telemetry
from services.kvstore.block_store import BlockStore, storage_key
from services.kvstore.server import create_kvstore_server
from services.kvstore.settings import KvStoreSettings

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def block(i: int, *, model: str = "m", floats: int = 64) -> tuple[kvstore_pb2.KvHeader, bytes]:
    data = (np.arange(floats, dtype=np.float32) + i).tobytes()
    header = kvstore_pb2.KvHeader(block_hash=b"%08d" % i, model_id=model, dtype="float32", shape=[floats],
                                  total_bytes=len(data), checksum=checksum(data), num_tokens=1)
    return header, data


def stored_size(header: kvstore_pb2.KvHeader, data: bytes) -> int:
    """What the store documents it counts: key + 4-byte length + serialized header + data."""
    key = storage_key(header.model_id, header.block_hash)
    return len(key) + 4 + len(header.SerializeToString()) + len(data)


def scanned(store: BlockStore) -> tuple[int, int]:
    """(rows, bytes) by iterating the DB, independently of the store's index."""
    rows = size = 0
    for key, raw in store._db.items():
        rows += 1
        size += len(key) + len(raw)
    return rows, size


def present(store: BlockStore, model: str, ids) -> list[bool]:
    return store.contains(model, [b"%08d" % i for i in ids])


def on_disk(store: BlockStore, model: str, ids) -> list[bool]:
    """Presence read from the DB itself: unlike a Contains, it does not refresh the model's stamp."""
    return [store._db.get(storage_key(model, b"%08d" % i)) is not None for i in ids]


def test_disk_budget_is_respected_after_many_puts(tmp_path):
    one = stored_size(*block(0))
    budget = 10 * one + one // 2
    store = BlockStore(tmp_path, memory_budget_bytes=1 * MiB, max_block_bytes=MiB, disk_budget_bytes=budget)
    for i in range(200):
        assert store.put(*block(i)) is True
        assert store.stats()["disk_bytes"] <= budget
    stats = store.stats()
    assert (stats["disk_blocks"], stats["disk_bytes"]) == scanned(store) == (10, 10 * one)
    assert stats["evicted_lru_blocks"] == 190 and stats["evicted_lru_bytes"] == 190 * one
    assert stats["evicted_idle_model_blocks"] == 0
    assert present(store, "m", range(190, 200)) == [True] * 10
    assert present(store, "m", range(190)) == [False] * 190
    # Evicted blocks left the memory tier too: a Get of one is NOT_FOUND, not served from memory.
    assert stats["memory_blocks"] == 10
    with pytest.raises(NotFound, match="not stored"):
        store.get("m", b"%08d" % 0)
    assert store.get("m", b"%08d" % 199).data == block(199)[1]
    store.close()


def test_recently_read_block_survives_and_the_oldest_goes(tmp_path):
    budget = 3 * stored_size(*block(0))
    store = BlockStore(tmp_path, memory_budget_bytes=0, max_block_bytes=MiB, disk_budget_bytes=budget)
    for i in (0, 1, 2):
        store.put(*block(i))
    store.get("m", b"%08d" % 0)  # 0 is now the most recently used; 1 the least
    store.put(*block(3))
    assert present(store, "m", [0, 1, 2, 3]) == [True, False, True, True]
    store.put(*block(0))  # a duplicate Put stores nothing but counts as a use: 2 is now the oldest
    store.put(*block(4))
    assert present(store, "m", [0, 2, 3, 4]) == [True, False, True, True]
    # A Contains reads nothing and does not reorder blocks: 3 is the oldest and goes next.
    present(store, "m", [3])
    store.put(*block(5))
    assert present(store, "m", [0, 3, 4, 5]) == [True, False, True, True]
    store.close()


def test_blocks_of_an_idle_model_are_evicted_first(tmp_path):
    clock = FakeClock()
    one = stored_size(*block(0, model="new"))
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, disk_budget_bytes=100 * one,
                       model_idle_eviction_s=100, clock=clock)
    store.put(*block(1, model="new"))
    store.put(*block(2, model="new"))
    clock.now += 10
    store.put(*block(1, model="old"))  # the most recently used blocks, of a model nobody asks for again
    store.put(*block(2, model="old"))
    store.put(*block(1, model="kept"))
    clock.now += 50
    store.get("new", b"%08d" % 1)
    store.contains("kept", [b"nope"])  # naming the model keeps it alive, even for a block it lacks
    clock.now += 55  # old: last asked 105 s ago; new, kept: 55 s ago
    assert store.stats()["models"] == 3  # nothing happens without a Put
    store.put(*block(3, model="new"))  # well under the budget: the idle sweep still runs
    assert on_disk(store, "old", [1, 2]) == [False, False]
    assert on_disk(store, "new", [1, 2, 3]) == [True, True, True]
    assert on_disk(store, "kept", [1]) == [True]
    stats = store.stats()
    assert stats["evicted_idle_model_blocks"] == 2 and stats["evicted_idle_model_bytes"] == 2 * one
    assert stats["evicted_lru_blocks"] == 0 and stats["models"] == 2
    kept = stored_size(*block(1, model="kept"))  # a model id one byte longer
    assert (stats["disk_blocks"], stats["disk_bytes"]) == scanned(store) == (4, 3 * one + kept)
    assert stats["memory_blocks"] == 4
    # Asking for a model with no blocks creates no state for it.
    store.contains("ghost", [b"x"])
    with pytest.raises(NotFound):
        store.get("ghost", b"x")
    assert store.stats()["models"] == 2
    store.close()


def test_idle_models_go_before_lru_when_space_is_needed(tmp_path):
    clock = FakeClock()
    one = stored_size(*block(0))
    store = BlockStore(tmp_path, memory_budget_bytes=0, max_block_bytes=MiB, disk_budget_bytes=3 * one,
                       model_idle_eviction_s=60, clock=clock)
    store.put(*block(1, model="a"))
    store.put(*block(2, model="a"))
    clock.now += 30
    store.put(*block(1, model="b"))  # newest block; b goes idle first, though, since a is read later
    clock.now += 20
    store.get("a", b"%08d" % 1)
    clock.now += 15  # b: 35 s; a: 15 s; nothing idle yet, so the next Put evicts by LRU
    store.put(*block(3, model="a"))
    assert on_disk(store, "a", [1, 2, 3]) == [True, False, True] and on_disk(store, "b", [1]) == [True]
    clock.now += 30  # b: 65 s (idle), a: 0 s
    store.put(*block(4, model="a"))
    assert on_disk(store, "b", [1]) == [False] and on_disk(store, "a", [1, 3, 4]) == [True] * 3
    stats = store.stats()
    assert (stats["evicted_lru_blocks"], stats["evicted_idle_model_blocks"]) == (1, 1)
    store.close()


def test_idle_eviction_off_keeps_every_model(tmp_path):
    clock = FakeClock()
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, model_idle_eviction_s=0,
                       clock=clock)
    store.put(*block(1, model="old"))
    clock.now += 10**9
    store.put(*block(1, model="new"))
    assert present(store, "old", [1]) == [True]
    store.close()


def test_block_larger_than_the_disk_budget_is_refused_by_name(tmp_path):
    small = block(0, floats=4)
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, disk_budget_bytes=200)
    assert store.put(*small) is True
    with pytest.raises(ResourceExhausted, match=r"disk_budget_bytes=200") as err:
        store.put(*block(1, floats=64))
    assert "limit is disk_budget_bytes=200" in str(err.value)
    # Nothing was evicted for it, nothing stored.
    assert present(store, "m", [0, 1]) == [True, False]
    stats = store.stats()
    assert stats["disk_blocks"] == 1 and stats["evicted_lru_blocks"] == 0
    store.close()


def test_reopen_rebuilds_the_index_exactly(tmp_path):
    one = stored_size(*block(0, model="a"))
    budget = 25 * one
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, disk_budget_bytes=budget)
    for i in range(40):
        store.put(*block(i, model="a" if i % 3 else "bb", floats=64 + 16 * (i % 4)))
    before = store.stats()
    kept = {m: present(store, m, range(40)) for m in ("a", "bb")}
    store.close()

    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, disk_budget_bytes=budget)
    after = store.stats()
    for name in ("disk_blocks", "disk_bytes", "models"):
        assert after[name] == before[name], name
    assert (after["disk_blocks"], after["disk_bytes"]) == scanned(store)
    assert after["disk_bytes"] <= budget and after["memory_blocks"] == 0
    assert {m: present(store, m, range(40)) for m in ("a", "bb")} == kept
    for i in range(40):
        model = "a" if i % 3 else "bb"
        if kept[model][i]:
            assert store.get(model, b"%08d" % i).data == block(i, model=model, floats=64 + 16 * (i % 4))[1]
    # Puts keep the rebuilt accounting exact.
    for i in range(40, 60):
        store.put(*block(i, model="a"))
    stats = store.stats()
    assert (stats["disk_blocks"], stats["disk_bytes"]) == scanned(store) and stats["disk_bytes"] <= budget
    store.close()


def test_reopen_with_a_smaller_budget_evicts_down_to_it(tmp_path):
    one = stored_size(*block(0))
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB)  # unbounded
    for i in range(10):
        store.put(*block(i))
    store.close()
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, disk_budget_bytes=4 * one)
    stats = store.stats()
    assert (stats["disk_blocks"], stats["disk_bytes"]) == scanned(store) == (4, 4 * one)
    # After a restart the LRU order is the DB's iteration order (key order): the first keys went.
    assert present(store, "m", range(10)) == [False] * 6 + [True] * 4
    store.close()


class NoScan:
    """Wraps the store's Rdict: any iteration of the DB fails the test."""

    def __init__(self, db) -> None:
        self._inner = db

    def __getattr__(self, name):
        if name in ("keys", "values", "items", "iter", "__iter__"):
            raise AssertionError(f"the DB was iterated ({name})")
        return getattr(self._inner, name)

    def __iter__(self):
        raise AssertionError("the DB was iterated")

    def __getitem__(self, key):
        return self._inner[key]

    def __setitem__(self, key, value):
        self._inner[key] = value

    def __delitem__(self, key):
        del self._inner[key]


def test_stats_and_serving_never_iterate_the_db(tmp_path):
    store = BlockStore(tmp_path, memory_budget_bytes=4096, max_block_bytes=MiB,
                       disk_budget_bytes=1500 * stored_size(*block(0, floats=4)))
    db = store._db
    store._db = NoScan(db)
    for i in range(2000):
        store.put(*block(i, floats=4))
    for _ in range(2000):
        stats = store.stats()
    assert stats["disk_blocks"] == 1500 and stats["evicted_lru_blocks"] == 500
    assert store.get("m", b"%08d" % 1999).data == block(1999, floats=4)[1]
    assert store.contains("m", [b"%08d" % 0, b"%08d" % 1999]) == [False, True]
    # RocksDB's own estimates come along (keys counted from the memtable; SST bytes once flushed).
    assert stats["disk_estimated_keys"] > 0
    db.flush()
    flushed = store.stats()
    assert flushed["disk_sst_bytes"] > 0 and flushed["disk_live_data_bytes"] >= 0
    store._db = db
    assert scanned(store) == (1500, flushed["disk_bytes"])
    store.close()


def test_corrupted_and_malformed_blocks_are_still_dropped_on_get(tmp_path):
    one = stored_size(*block(0))
    store = BlockStore(tmp_path, memory_budget_bytes=0, max_block_bytes=MiB, disk_budget_bytes=10 * one)
    for i in range(3):
        store.put(*block(i))
    key = storage_key("m", b"%08d" % 0)
    raw = bytearray(store._db[key])
    raw[-1] ^= 0xFF
    store._db[key] = bytes(raw)
    with pytest.raises(NotFound, match="checksum"):
        store.get("m", b"%08d" % 0)
    store._db[storage_key("m", b"%08d" % 1)] = b"\x00\x00"  # truncated: not even a length prefix
    with pytest.raises(NotFound, match="malformed"):
        store.get("m", b"%08d" % 1)
    assert present(store, "m", [0, 1, 2]) == [False, False, True]
    stats = store.stats()
    assert stats["dropped_corrupt_blocks"] == 2 and stats["disk_blocks"] == 1
    assert (stats["disk_blocks"], stats["disk_bytes"]) == scanned(store) == (1, one)
    assert store.put(*block(0)) is True  # the caller recomputes and re-puts
    assert store.get("m", b"%08d" % 0).data == block(0)[1]
    store.close()


def test_a_block_corrupted_in_the_memory_tier_is_dropped_everywhere(tmp_path):
    store = BlockStore(tmp_path, memory_budget_bytes=MiB, max_block_bytes=MiB, disk_budget_bytes=MiB)
    store.put(*block(0))
    key = storage_key("m", b"%08d" % 0)
    store._memory[key].data = b"\x00" * len(store._memory[key].data)
    with pytest.raises(NotFound, match="checksum"):
        store.get("m", b"%08d" % 0)
    stats = store.stats()
    assert stats["memory_blocks"] == stats["disk_blocks"] == 0 and scanned(store) == (0, 0)
    store.close()


def test_concurrent_puts_and_gets_keep_the_accounting_exact(tmp_path):
    one = stored_size(*block(0))
    budget = 30 * one
    store = BlockStore(tmp_path, memory_budget_bytes=8 * one, max_block_bytes=MiB, disk_budget_bytes=budget)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                i = rng.randrange(80)
                if rng.random() < 0.5:
                    store.put(*block(i))
                else:
                    try:
                        assert store.get("m", b"%08d" % i).data == block(i)[1]
                    except NotFound:
                        pass  # never stored, or evicted: callers recompute
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = store.stats()
    assert (stats["disk_blocks"], stats["disk_bytes"]) == scanned(store)
    assert stats["disk_bytes"] <= budget and stats["memory_bytes"] <= 8 * one
    assert stats["dropped_corrupt_blocks"] == 0
    store.close()


# ---- the gRPC boundary -------------------------------------------------------------------------

def put_stream(header, data, chunk=1024):
    yield kvstore_pb2.KvChunk(header=header)
    for i in range(0, len(data), chunk):
        yield kvstore_pb2.KvChunk(data=data[i:i + chunk])


def test_grpc_put_over_the_disk_budget_is_resource_exhausted(tmp_path):
    one = stored_size(*block(0, floats=256))
    settings = KvStoreSettings(data_dir=tmp_path, max_block_bytes=MiB, chunk_bytes=1024,
                               telemetry_exporter="none", disk_budget_bytes=3 * one, model_idle_eviction_s=0)
    handle = create_kvstore_server(settings, null_telemetry())
    channel = open_channel(handle.address)
    try:
        stub = kvstore_pb2_grpc.KvStoreStub(channel)
        # Data alone over the budget: refused at the header, before the data arrives.
        header, data = block(9, floats=4 * one)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(put_stream(header, data), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"disk_budget_bytes={3 * one}" in err.value.details()
        # Data under the budget but not with its key and header: refused by the store, by name too.
        floats = (3 * one - 4) // 4
        header, data = block(8, floats=floats)
        assert len(data) <= 3 * one < stored_size(header, data)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(put_stream(header, data), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "disk_budget_bytes" in err.value.details()
        # Within the budget: stored, and the oldest evicted; a Get of it is NOT_FOUND.
        for i in range(5):
            assert stub.Put(put_stream(*block(i, floats=256)), timeout=5).stored
        stats = stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5)
        assert (stats.disk_blocks, stats.disk_bytes, stats.disk_budget_bytes) == (3, 3 * one, 3 * one)
        assert (stats.evicted_lru_blocks, stats.evicted_lru_bytes, stats.models) == (2, 2 * one, 1)
        assert stats.disk_estimated_keys > 0
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Get(kvstore_pb2.GetRequest(block_hash=b"%08d" % 0, model_id="m"), timeout=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        chunks = list(stub.Get(kvstore_pb2.GetRequest(block_hash=b"%08d" % 4, model_id="m"), timeout=5))
        assert b"".join(c.data for c in chunks[1:]) == block(4, floats=256)[1]
    finally:
        channel.close()
        handle.stop(0)
