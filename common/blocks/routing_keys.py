"""Routing keys: what the router and the decoders call a prompt block when they talk affinity.

The KV store addresses a block by `hashing.block_hash`, which needs the token ids, so the
tokenizer and the model id. The router has neither (it routes for any model and never loads a
tokenizer), so replicas report the blocks they hold under a key both sides compute from the
request alone: 8 bytes of blake2b over (block kind, block text). The text, not the block id:
a changed item text is a different block (its old KV no longer applies), and two ids with the
same text share KV. A key is a hint for scheduling, never a cache lookup, so a rare collision
only costs a less good replica choice.

Only kinds whose KV is reused across requests get a key (instruction, user history, item);
free text (the question) is always computed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from adaccel.v1 import common_pb2

CACHEABLE_KINDS = frozenset({
    common_pb2.BLOCK_KIND_INSTRUCTION, common_pb2.BLOCK_KIND_USER_HISTORY, common_pb2.BLOCK_KIND_ITEM,
})


def routing_key(kind: int, text: str) -> int:
    """uint64 key of a block (fits the proto's fixed64)."""
    h = hashlib.blake2b(digest_size=8, person=b"adaccel-route")
    h.update(struct.pack("<I", kind))
    h.update(text.encode())
    return int.from_bytes(h.digest(), "little")


@dataclass(slots=True, frozen=True)
class RequestBlocks:
    """The cacheable blocks of one request: key -> weight (characters, a proxy of prefill work)."""

    weights: dict[int, int]

    @property
    def total_weight(self) -> int:
        return sum(self.weights.values())


def request_blocks(blocks: Iterable[common_pb2.PromptBlock]) -> RequestBlocks:
    weights: dict[int, int] = {}
    for block in blocks:
        if block.kind in CACHEABLE_KINDS:
            key = routing_key(block.kind, block.text)
            weights[key] = weights.get(key, 0) + len(block.text)
    return RequestBlocks(weights)
