"""Routing keys: what the router and the decoders call a prompt block when they talk affinity.

The KV store addresses a block by `hashing.block_hash`, which needs the token ids, so the
tokenizer and the model id. The router has neither (it routes for any model and never loads a
tokenizer), so replicas report the blocks they hold under a key both sides compute from the
request alone: 8 bytes of blake2b over (block kind, block text). The text, not the block id:
a changed item text is a different block (its old KV no longer applies), and two ids with the
same text share KV. A key is a hint for scheduling, never a cache lookup, so a rare collision
only costs a less good replica choice.

Only kinds whose KV is reused across requests get a key (instruction, user history, item);
free text (the question) is always computed. Kinds are `hashing.BlockKind`; callers map the
protobuf enum (common/rpc/block_kinds.py).

A block's KV computed in its request (exact, reused by prefix caching: `hashing.prefix_hash`)
is only valid after the very blocks that came before it, so it is reported under a *prefix key*
instead: the key chained over every block so far, free text included (`prefix_routing_keys`).
A replica holding a request's first k prefix keys holds the exact KV of its first k blocks.

>>> a, b = (BlockKind.INSTRUCTION, "Describe the item."), (BlockKind.USER_HISTORY, "bought: boots")
>>> first = prefix_routing_keys([a, b])
>>> first[0] == prefix_routing_keys([a])[0]          # a prefix's keys do not depend on what follows
True
>>> prefix_routing_keys([b, a])[1] == first[1]       # ... but do depend on what came before
False
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.blocks.hashing import BlockKind

CACHEABLE_KINDS = frozenset({BlockKind.INSTRUCTION, BlockKind.USER_HISTORY, BlockKind.ITEM})


def _kind_and_text(h, kind: BlockKind, text: str) -> None:
    name = kind.value.encode()
    h.update(struct.pack("<I", len(name)) + name)
    h.update(text.encode())


def routing_key(kind: BlockKind, text: str) -> int:
    """uint64 key of a block (fits the proto's fixed64): blake2b over the length-prefixed kind
    name, then the text."""
    assert isinstance(kind, BlockKind), kind
    h = hashlib.blake2b(digest_size=8, person=b"adaccel-route")
    _kind_and_text(h, kind, text)
    return int.from_bytes(h.digest(), "little")


def prefix_routing_keys(blocks: Iterable[tuple[BlockKind, str]]) -> list[int]:
    """One uint64 key per block, in prompt order: key i names blocks 0..i together (blake2b
    over the previous key, then the block's length-prefixed kind name and its text)."""
    keys: list[int] = []
    parent = b""
    for kind, text in blocks:
        assert isinstance(kind, BlockKind), kind
        h = hashlib.blake2b(digest_size=8, person=b"adaccel-prefix")
        h.update(parent)
        _kind_and_text(h, kind, text)
        parent = h.digest()
        keys.append(int.from_bytes(parent, "little"))
    return keys


@dataclass(slots=True, frozen=True)
class RequestBlocks:
    """What of one request a replica may hold, weighed in characters (a proxy of prefill work):
    weights: routing key -> weight of each cacheable block (KV reusable anywhere in a prompt);
    prefix: (prefix key, weight) of every block in prompt order (KV exact after its prefix)."""

    weights: dict[int, int]
    prefix: tuple[tuple[int, int], ...] = ()

    @property
    def total_weight(self) -> int:
        return sum(self.weights.values())

    @property
    def prefix_weight(self) -> int:
        return sum(w for _, w in self.prefix)


def request_blocks(blocks: Sequence[tuple[BlockKind, str]]) -> RequestBlocks:
    """blocks: (kind, text) of each prompt block, in prompt order."""
    weights: dict[int, int] = {}
    for kind, text in blocks:
        if kind in CACHEABLE_KINDS:
            key = routing_key(kind, text)
            weights[key] = weights.get(key, 0) + len(text)
    prefix = tuple(zip(prefix_routing_keys(blocks), (len(text) for _, text in blocks)))
    return RequestBlocks(weights, prefix)
