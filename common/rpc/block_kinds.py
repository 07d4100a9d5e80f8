"""The protobuf block kind (adaccel.v1.BlockKind) and the core's `common.blocks.hashing.BlockKind`.

The core (common/blocks/) names kinds with its own enum and never imports generated code; the
services turn the wire enum into it here, once, at their edge (the router's footprint of a request,
the decoder's block cache). Requests are validated first (common/requests.py), so an unknown or
unset kind never reaches this map.
"""

from __future__ import annotations

from collections.abc import Iterable

from adaccel.v1 import common_pb2
from common.blocks.hashing import BlockKind

KIND_OF_PROTO: dict[int, BlockKind] = {
    common_pb2.BLOCK_KIND_INSTRUCTION: BlockKind.INSTRUCTION,
    common_pb2.BLOCK_KIND_USER_HISTORY: BlockKind.USER_HISTORY,
    common_pb2.BLOCK_KIND_ITEM: BlockKind.ITEM,
    common_pb2.BLOCK_KIND_TEXT: BlockKind.FREE_TEXT,
}
PROTO_OF_KIND: dict[BlockKind, int] = {kind: proto for proto, kind in KIND_OF_PROTO.items()}


def kinds_and_texts(blocks: Iterable[common_pb2.PromptBlock]) -> list[tuple[BlockKind, str]]:
    """(kind, text) of each prompt block, in order: what `routing_keys.request_blocks` takes."""
    return [(KIND_OF_PROTO[block.kind], block.text) for block in blocks]
