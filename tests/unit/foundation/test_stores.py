"""Block store and pool store against a real RocksDB directory."""

import pytest

from adaccel.v1 import kvstore_pb2
from common.blocks.kv_codec import checksum
from common.rpc.errors import InvalidArgument, NotFound, ResourceExhausted
from services.kvstore.block_store import BlockStore, storage_key
from services.pool.ngram_records import ngram_node_increments
from services.pool.pool_meta import PoolMeta
from services.pool.pool_store import PoolStore


def header(data: bytes, **overrides) -> kvstore_pb2.KvHeader:
    fields = dict(block_hash=b"h1", model_id="m", dtype="float32", shape=[len(data) // 4],
                  total_bytes=len(data), checksum=checksum(data), num_tokens=1)
    fields.update(overrides)
    return kvstore_pb2.KvHeader(**fields)


def test_block_roundtrip_survives_reopen(tmp_path):
    data = bytes(range(64))
    store = BlockStore(tmp_path, memory_budget_bytes=1 << 20, max_block_bytes=1 << 20)
    assert store.put(header(data), data) is True
    assert store.put(header(data), data) is False
    store.close()
    store = BlockStore(tmp_path, memory_budget_bytes=1 << 20, max_block_bytes=1 << 20)
    assert store.get("m", b"h1").data == data
    assert store.contains("m", [b"h1", b"nope"]) == [True, False]
    with pytest.raises(NotFound):
        store.get("other-model", b"h1")
    store.close()


def test_memory_tier_respects_its_budget(tmp_path):
    store = BlockStore(tmp_path, memory_budget_bytes=100, max_block_bytes=1 << 20)
    for i in range(5):
        data = bytes([i]) * 40
        store.put(header(data, block_hash=bytes([i])), data)
    stats = store.stats()
    assert stats["memory_bytes"] <= 100 and stats["disk_blocks"] == 5
    assert store.get("m", bytes([0])).data == bytes([0]) * 40  # evicted from memory, served from disk
    store.close()


@pytest.mark.parametrize("overrides, error", [
    (dict(dtype="complex7"), InvalidArgument),
    (dict(shape=[3]), InvalidArgument),
    (dict(checksum=1), InvalidArgument),
    (dict(model_id=""), InvalidArgument),
    (dict(block_hash=b""), InvalidArgument),
    (dict(shape=[1 << 20], total_bytes=4 << 20), ResourceExhausted),
])
def test_bad_blocks_are_rejected_and_not_stored(tmp_path, overrides, error):
    data = bytes(16)
    store = BlockStore(tmp_path, memory_budget_bytes=1 << 20, max_block_bytes=1 << 20)
    with pytest.raises(error):
        store.put(header(data, **overrides), data)
    assert store.stats()["disk_blocks"] == 0
    store.close()


def test_corrupted_block_is_never_served(tmp_path):
    data = bytes(range(32))
    store = BlockStore(tmp_path, memory_budget_bytes=0, max_block_bytes=1 << 20)
    store.put(header(data), data)
    key = storage_key("m", b"h1")
    raw = bytearray(store._db[key])
    raw[-1] ^= 0xFF
    store._db[key] = bytes(raw)
    with pytest.raises(NotFound, match="checksum"):
        store.get("m", b"h1")
    assert store.contains("m", [b"h1"]) == [False]
    store.close()


def test_pool_store_writes_counts_with_offsets_atomically(tmp_path):
    store = PoolStore(tmp_path)
    batch = store.batch()
    batch.put_nodes("a/b", [(p, c, 0) for p, c in ngram_node_increments([[1, 2, 3], [1, 2]], 2).items()])
    batch.put_meta(PoolMeta(pool_key="a/b", version=2, nodes=5))
    batch.put_offset("t", 0, 2)
    store.write(batch)
    assert store.node_count("a/b", (1, 2)) == 2
    assert store.subtree("a/b", (1,)) == {(1,): 2, (1, 2): 2}
    store.close()
    store = PoolStore(tmp_path)
    assert store.next_offset("t", 0) == 2
    assert store.pool_info("a/b").version == 2
    assert store.subtree("other") == {}
    store.close()
