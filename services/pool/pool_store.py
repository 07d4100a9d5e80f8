"""Pools persisted in RocksDB: trie nodes, pool metadata, consumer offsets, remembered sequences.

The key layout is in `services.pool.layout`. This layer only reads and writes: callers build a
`StoreBatch` (one per Kafka record or RPC, spanning column families, the consumer offset
included) and `write` applies it atomically; a crash keeps all of a batch or none of it.

Pool metadata (PoolMeta) is stored as the PoolInfo protobuf message it has always been stored
as, so stores written before PoolMeta existed load unchanged; the message stays inside this
module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from adaccel.v1 import pool_pb2
from services.pool import layout
from services.pool.layout import StoredSequence
from services.pool.pool_meta import PoolMeta

COLUMN_FAMILIES = ("nodes", "meta", "offsets", "sequences", "items", "removed")


class StoreBatch:
    """Writes that land together or not at all."""

    def __init__(self, handles: dict) -> None:
        self._batch = WriteBatch(raw_mode=True)
        self._h = handles
        self.puts = 0

    def put_node(self, pool_key: str, path: Sequence[int], output: int, input_: int) -> None:
        self._batch.put(layout.node_key(pool_key, path), layout.encode_counts(output, input_), self._h["nodes"])
        self.puts += 1

    def put_nodes(self, pool_key: str, rows: Iterable[tuple[Sequence[int], int, int]]) -> int:
        """put_node for many rows (the hot path of ingest); returns how many."""
        prefix, put, handle = layout.pool_prefix(pool_key), self._batch.put, self._h["nodes"]
        encode, pack = layout.encode_path, layout.encode_counts
        n = 0
        for path, output, input_ in rows:
            put(prefix + encode(path), pack(output, input_), handle)
            n += 1
        self.puts += n
        return n

    def delete_nodes(self, pool_key: str) -> None:
        """Every node of the pool (later puts in the same batch win)."""
        prefix = layout.pool_prefix(pool_key)
        self._batch.delete_range(prefix, layout.prefix_end(prefix), self._h["nodes"])

    def put_meta(self, meta: PoolMeta) -> None:
        self._batch.put(meta.pool_key.encode(), _encode_meta(meta), self._h["meta"])

    def delete_meta(self, pool_key: str) -> None:
        self._batch.delete(pool_key.encode(), self._h["meta"])

    def put_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self._batch.put(layout.offset_key(topic, partition), layout.encode_offset(next_offset), self._h["offsets"])

    def put_sequence(self, pool_key: str, sequence_id: int, seq: StoredSequence) -> None:
        self._batch.put(layout.sequence_key(pool_key, sequence_id), layout.encode_sequence(seq),
                        self._h["sequences"])
        for item in seq.item_ids:
            self._batch.put(layout.item_key(item, pool_key, sequence_id), b"", self._h["items"])

    def put_removed(self, item_id: str, unix_s: float) -> None:
        self._batch.put(item_id.encode(), layout.encode_time(unix_s), self._h["removed"])

    def delete_removed(self, item_id: str) -> None:
        self._batch.delete(item_id.encode(), self._h["removed"])

    def delete_sequence(self, pool_key: str, sequence_id: int, item_ids: Sequence[str]) -> None:
        self._batch.delete(layout.sequence_key(pool_key, sequence_id), self._h["sequences"])
        for item in item_ids:
            self._batch.delete(layout.item_key(item, pool_key, sequence_id), self._h["items"])


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

    # ------------------------------------------------------------------ writes
    def batch(self) -> StoreBatch:
        return StoreBatch(self._handles)

    def write(self, batch: StoreBatch) -> None:
        self._db.write(batch._batch)

    def store_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """For records that change no pool (dead-lettered, no effect): move the offset alone."""
        batch = self.batch()
        batch.put_offset(topic, partition, next_offset)
        self.write(batch)

    # ------------------------------------------------------------------ reads
    def next_offset(self, topic: str, partition: int) -> int | None:
        raw = self._cf["offsets"].get(layout.offset_key(topic, partition))
        return None if raw is None else int.from_bytes(raw, "big")

    def pool_info(self, pool_key: str) -> PoolMeta | None:
        raw = self._cf["meta"].get(pool_key.encode())
        return None if raw is None else _decode_meta(raw)

    def pools(self) -> list[PoolMeta]:
        return [_decode_meta(v) for _, v in self._scan("meta", b"")]

    def node_count(self, pool_key: str, path: tuple[int, ...], kind: str = "output") -> int:
        raw = self._cf["nodes"].get(layout.node_key(pool_key, path))
        if raw is None:
            return 0
        output, input_ = layout.decode_counts(raw)
        return output if kind == "output" else input_

    def rows(self, pool_key: str, path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], int, int]]:
        """(path, output, input) of every node under `path` (inclusive), in key order (pre-order)."""
        head = len(layout.pool_prefix(pool_key))
        for key, value in self._scan("nodes", layout.node_key(pool_key, path)):
            yield (layout.decode_path(key[head:]), *layout.decode_counts(value))

    def subtree(self, pool_key: str, path: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
        """Output counts of all nodes under `path` (inclusive), by prefix scan."""
        return {p: output for p, output, _ in self.rows(pool_key, path)}

    def sequences(self, pool_key: str) -> Iterator[tuple[int, StoredSequence]]:
        for key, value in self._scan("sequences", layout.pool_prefix(pool_key)):
            yield layout.sequence_id_of(key), layout.decode_sequence(value)

    def sequence(self, pool_key: str, sequence_id: int) -> StoredSequence | None:
        raw = self._cf["sequences"].get(layout.sequence_key(pool_key, sequence_id))
        return None if raw is None else layout.decode_sequence(raw)

    def last_sequence_id(self, pool_key: str) -> int:
        """Largest sequence id of the pool (0 when none)."""
        last = 0
        for key, _ in self._scan("sequences", layout.pool_prefix(pool_key)):
            last = max(last, layout.sequence_id_of(key))
        return last

    def item_sequences(self, item_id: str) -> list[tuple[str, int]]:
        """(pool_key, sequence id) of every remembered sequence of the item, in every pool."""
        return [layout.parse_item_key(key)[1:] for key, _ in self._scan("items", layout.item_prefix(item_id))]

    def removed_items(self, item_ids: Sequence[str]) -> list[str]:
        """Those of `item_ids` removed from the inventory (and not added back since)."""
        cf = self._cf["removed"]
        return [item for item in item_ids if cf.get(item.encode()) is not None]

    def disk_bytes(self) -> int:
        total = 0
        for cf in self._cf.values():
            for prop in ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"):
                total += cf.property_int_value(prop) or 0
        return total

    def _scan(self, cf: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        # Seek and stop at the first key past the prefix (iterate bounds misbehave in raw mode).
        it = self._cf[cf].iter()
        try:
            it.seek(prefix)
            while it.valid():
                key = it.key()
                if not key.startswith(prefix):
                    break
                yield key, it.value()
                it.next()
        finally:
            del it

    def close(self) -> None:
        # Column-family views hold the lock until dropped.
        self._cf.clear()
        self._handles.clear()
        self._db.close()


def _encode_meta(meta: PoolMeta) -> bytes:
    return pool_pb2.PoolInfo(
        pool_key=meta.pool_key, version=meta.version, nodes=meta.nodes, capacity=meta.capacity,
        updated_at=meta.updated_at, squeezes=meta.squeezes, sequences=meta.sequences,
        sequence_tokens=meta.sequence_tokens, bytes=meta.size_bytes).SerializeToString()


def _decode_meta(raw: bytes) -> PoolMeta:
    info = pool_pb2.PoolInfo.FromString(raw)
    return PoolMeta(pool_key=info.pool_key, version=info.version, nodes=info.nodes, capacity=info.capacity,
                    updated_at=info.updated_at, squeezes=info.squeezes, sequences=info.sequences,
                    sequence_tokens=info.sequence_tokens, size_bytes=info.bytes)
