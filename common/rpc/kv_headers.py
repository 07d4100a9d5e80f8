"""The kv-store's protobuf header (adaccel.v1.KvHeader) and the block codec's `BlockHeader`.

The codec (common/blocks/kv_codec.py) works on a plain record; a service that sends or receives
blocks maps it here, field for field (the decoder's kv-store client).
"""

from __future__ import annotations

from adaccel.v1 import kvstore_pb2
from common.blocks.hashing import BlockHash
from common.blocks.kv_codec import BlockHeader


def header_to_proto(header: BlockHeader) -> kvstore_pb2.KvHeader:
    return kvstore_pb2.KvHeader(
        block_hash=header.block_hash, model_id=header.model_id, dtype=header.dtype, shape=list(header.shape),
        total_bytes=header.total_bytes, checksum=header.checksum, num_tokens=header.num_tokens,
    )


def header_from_proto(message: kvstore_pb2.KvHeader) -> BlockHeader:
    return BlockHeader(
        block_hash=BlockHash(message.block_hash), model_id=message.model_id, dtype=message.dtype,
        shape=tuple(message.shape), total_bytes=message.total_bytes, checksum=message.checksum,
        num_tokens=message.num_tokens,
    )
