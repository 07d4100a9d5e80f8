"""Key and value layout of the pool store in RocksDB (pure: bytes in, bytes out).

Column families:
  nodes:     pool_key 0x00 token path (4-byte big-endian ids)       -> output, input counts (2 x u64 BE)
  meta:      pool_key                                               -> PoolInfo protobuf (PoolMeta's fields)
  offsets:   topic 0x00 partition (u32 BE)                          -> next offset (u64 BE)
  sequences: pool_key 0x00 sequence id (u64 BE)                     -> StoredSequence (see encode_sequence)
  items:     item_id 0x00 pool_key 0x00 sequence id (u64 BE)         -> b"" (item -> its sequences, all pools)
  removed:   item_id                                                -> unix time of removal (f64 BE)

Why this shape:
- Pool keys and item ids never contain 0x00 (their patterns forbid it), so `pool_key 0x00` is a
  prefix of exactly one pool's keys, and "a" never captures "a/b".
- Fixed-width big-endian ids sort like the token tuples they encode, and a path sorts right
  before its extensions: a prefix scan of `node_key(pool, path)` walks exactly that subtree, in
  pre-order (parents before children), which is the order a trie can be rebuilt in.
- Every node of the in-memory trie is stored, zero counts included (a node an item removal
  emptied stays until the next decay, in memory and on disk alike), so a restart rebuilds the
  very same trie.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

SEP = b"\x00"
TOKEN_BYTES = 4
_COUNTS = struct.Struct(">QQ")
_SEQUENCE_HEAD = struct.Struct(">BIH")  # kind, squeezes at insert, number of item ids
KINDS = ("input", "output")  # the trie's kinds; the index is the stored byte


def pool_prefix(pool_key: str) -> bytes:
    return pool_key.encode() + SEP


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (for delete_range).

    >>> prefix_end(b"a/b\\x00")
    b'a/b\\x01'
    """
    assert prefix and prefix[-1] < 0xFF
    return prefix[:-1] + bytes([prefix[-1] + 1])


def encode_path(path: Sequence[int]) -> bytes:
    return struct.pack(f">{len(path)}I", *path)


def decode_path(raw: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(raw) // TOKEN_BYTES}I", raw)


def node_key(pool_key: str, path: Sequence[int]) -> bytes:
    """The node of `path` in `pool_key`'s trie.

    >>> node_key("p", (1, 258)).hex()
    '70000000000100000102'
    """
    return pool_prefix(pool_key) + encode_path(path)


def encode_counts(output: int, input_: int) -> bytes:
    return _COUNTS.pack(output, input_)


def decode_counts(raw: bytes) -> tuple[int, int]:
    """(output, input); an 8-byte value (the first layout) is an output count alone."""
    if len(raw) == 8:
        return int.from_bytes(raw, "big"), 0
    return _COUNTS.unpack(raw)


def node_bytes(pool_key: str, depth: int) -> int:
    """Key plus value bytes of one stored node (what PoolInfo.bytes sums)."""
    return len(pool_key.encode()) + 1 + TOKEN_BYTES * depth + _COUNTS.size


def offset_key(topic: str, partition: int) -> bytes:
    return topic.encode() + SEP + partition.to_bytes(4, "big")


def encode_offset(next_offset: int) -> bytes:
    return next_offset.to_bytes(8, "big")


def sequence_key(pool_key: str, sequence_id: int) -> bytes:
    return pool_prefix(pool_key) + sequence_id.to_bytes(8, "big")


def sequence_id_of(key: bytes) -> int:
    return int.from_bytes(key[-8:], "big")


def encode_time(unix_s: float) -> bytes:
    return struct.pack(">d", unix_s)


def item_prefix(item_id: str) -> bytes:
    return item_id.encode() + SEP


def item_key(item_id: str, pool_key: str, sequence_id: int) -> bytes:
    return item_prefix(item_id) + pool_prefix(pool_key) + sequence_id.to_bytes(8, "big")


def parse_item_key(key: bytes) -> tuple[str, str, int]:
    """(item_id, pool_key, sequence id) of an items key.

    >>> parse_item_key(item_key("it-1", "a/b", 7))
    ('it-1', 'a/b', 7)
    """
    item, pool = key[:-9].split(SEP, 1)
    return item.decode(), pool.decode(), int.from_bytes(key[-8:], "big")


@dataclass(slots=True, frozen=True)
class StoredSequence:
    """A sequence inserted on behalf of items, kept so that removing an item can take it back."""

    kind: str  # "input" | "output"
    squeezes_at_insert: int  # the pool's decay count when inserted: removal halves per squeeze since
    item_ids: tuple[str, ...]
    tokens: tuple[int, ...]


def encode_sequence(seq: StoredSequence) -> bytes:
    """kind u8, squeezes u32, n_items u16, (len u16, id bytes) per item, token ids u32 BE.

    >>> decode_sequence(encode_sequence(StoredSequence("output", 3, ("a", "bc"), (1, 2))))
    StoredSequence(kind='output', squeezes_at_insert=3, item_ids=('a', 'bc'), tokens=(1, 2))
    """
    parts = [_SEQUENCE_HEAD.pack(KINDS.index(seq.kind), seq.squeezes_at_insert, len(seq.item_ids))]
    for item in seq.item_ids:
        raw = item.encode()
        parts.append(len(raw).to_bytes(2, "big") + raw)
    parts.append(encode_path(seq.tokens))
    return b"".join(parts)


def decode_sequence(raw: bytes) -> StoredSequence:
    kind, squeezes, n_items = _SEQUENCE_HEAD.unpack_from(raw)
    offset = _SEQUENCE_HEAD.size
    items = []
    for _ in range(n_items):
        length = int.from_bytes(raw[offset:offset + 2], "big")
        items.append(raw[offset + 2:offset + 2 + length].decode())
        offset += 2 + length
    return StoredSequence(KINDS[kind], squeezes, tuple(items), decode_path(raw[offset:]))
