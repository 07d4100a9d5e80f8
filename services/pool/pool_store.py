"""Pools persisted in RocksDB: trie node counts, pool metadata and consumer offsets.

Layout (one column family per concern):
  nodes:   pool_key | 0x00 | token path (4-byte big-endian ids)  -> count (8-byte big-endian)
  meta:    pool_key                                              -> PoolInfo protobuf
  offsets: topic | 0x00 | partition (4 bytes)                    -> next offset (8 bytes)
Big-endian fixed-width ids make a prefix scan walk exactly one subtree. One record's effect and
its next offset go in one WriteBatch, so a crash and redelivery never counts a record twice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from adaccel.v1 import pool_pb2

COLUMN_FAMILIES = ("nodes", "meta", "offsets")


def node_key(pool_key: str, path: tuple[int, ...]) -> bytes:
    return pool_key.encode() + b"\x00" + b"".join(t.to_bytes(4, "big") for t in path)


def offset_key(topic: str, partition: int) -> bytes:
    return topic.encode() + b"\x00" + partition.to_bytes(4, "big")


class PoolStore:
    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        cf_options = {name: Options(raw_mode=True) for name in COLUMN_FAMILIES}
        self._db = Rdict(str(path), options, column_families=cf_options)
        self._cf = {name: self._db.get_column_family(name) for name in COLUMN_FAMILIES}
        self._handles = {name: self._db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        # One writer at a time: counts are read-modify-write.
        self._write_lock = threading.Lock()

    def apply(self, pool_key: str, node_increments: Counter,
              offset: tuple[str, int, int] | None = None) -> pool_pb2.PoolInfo:
        """Adds the increments to a pool (and stores the consumer's next offset) in one atomic batch."""
        with self._write_lock:
            nodes = self._cf["nodes"]
            info = self.pool_info(pool_key) or pool_pb2.PoolInfo(pool_key=pool_key)
            batch = WriteBatch(raw_mode=True)
            new_nodes = 0
            for path, inc in node_increments.items():
                key = node_key(pool_key, path)
                old = nodes.get(key)
                if old is None:
                    new_nodes += 1
                count = (int.from_bytes(old, "big") if old is not None else 0) + inc
                batch.put(key, count.to_bytes(8, "big"), self._handles["nodes"])
            info.version += 1
            info.nodes += new_nodes
            info.updated_at = time.time()
            batch.put(pool_key.encode(), info.SerializeToString(), self._handles["meta"])
            if offset is not None:
                topic, partition, next_offset = offset
                batch.put(offset_key(topic, partition), next_offset.to_bytes(8, "big"), self._handles["offsets"])
            self._db.write(batch)
            return info

    def store_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """For records that change no pool (dead-lettered): move the offset alone."""
        with self._write_lock:
            self._cf["offsets"][offset_key(topic, partition)] = next_offset.to_bytes(8, "big")

    def next_offset(self, topic: str, partition: int) -> int | None:
        raw = self._cf["offsets"].get(offset_key(topic, partition))
        return None if raw is None else int.from_bytes(raw, "big")

    def pool_info(self, pool_key: str) -> pool_pb2.PoolInfo | None:
        raw = self._cf["meta"].get(pool_key.encode())
        return None if raw is None else pool_pb2.PoolInfo.FromString(raw)

    def pools(self) -> list[pool_pb2.PoolInfo]:
        return [pool_pb2.PoolInfo.FromString(v) for _, v in self._cf["meta"].items()]

    def node_count(self, pool_key: str, path: tuple[int, ...]) -> int:
        raw = self._cf["nodes"].get(node_key(pool_key, path))
        return 0 if raw is None else int.from_bytes(raw, "big")

    def subtree(self, pool_key: str, path: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
        """All nodes under `path` (inclusive), by prefix scan."""
        prefix = node_key(pool_key, path)
        head = len(pool_key.encode()) + 1
        it = self._cf["nodes"].iter()
        it.seek(prefix)
        out = {}
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            ids = key[head:]
            out[tuple(int.from_bytes(ids[i:i + 4], "big") for i in range(0, len(ids), 4))] = \
                int.from_bytes(it.value(), "big")
            it.next()
        del it
        return out

    def close(self) -> None:
        # Column-family views hold the lock until dropped.
        self._cf.clear()
        self._handles.clear()
        self._db.close()
