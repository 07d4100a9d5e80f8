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
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from common.blocks.hashing import BlockKind

CACHEABLE_KINDS = frozenset({BlockKind.INSTRUCTION, BlockKind.USER_HISTORY, BlockKind.ITEM})


def routing_key(kind: BlockKind, text: str) -> int:
    """uint64 key of a block (fits the proto's fixed64): blake2b over the length-prefixed kind
    name, then the text."""
    assert isinstance(kind, BlockKind), kind
    name = kind.value.encode()
    h = hashlib.blake2b(digest_size=8, person=b"adaccel-route")
    h.update(struct.pack("<I", len(name)) + name)
    h.update(text.encode())
    return int.from_bytes(h.digest(), "little")


@dataclass(slots=True, frozen=True)
class RequestBlocks:
    """The cacheable blocks of one request: key -> weight (characters, a proxy of prefill work)."""

    weights: dict[int, int]

    @property
    def total_weight(self) -> int:
        return sum(self.weights.values())


def request_blocks(blocks: Iterable[tuple[BlockKind, str]]) -> RequestBlocks:
    """blocks: (kind, text) of each prompt block, in any order."""
    weights: dict[int, int] = {}
    for kind, text in blocks:
        if kind in CACHEABLE_KINDS:
            key = routing_key(kind, text)
            weights[key] = weights.get(key, 0) + len(text)
    return RequestBlocks(weights)
