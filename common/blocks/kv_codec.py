"""One block's KV as bytes: the layout, the header that describes it, and the checksum.

The decoder encodes a block (`encode_block`) and decodes what the kv-store returns
(`decode_block`); the kv-store checks every block it is sent and re-checks every block it reads
(services/kvstore/block_store.py) with the same `checksum` and dtype sizes. Nothing else
defines either.

Layout: one tensor [layers, 2 (K, V), kv_heads, tokens, head_dim], its raw bytes in C order (the
machine's byte order; any torch dtype, bfloat16 included).

Checksum: CRC-32, the IEEE 802.3 polynomial (zlib.crc32, as in gzip and PNG), of the raw bytes,
as an unsigned 32-bit integer. It is not CRC-32C (Castagnoli): no package for that is a dependency.

No protobuf here: `BlockHeader` is a plain record with the fields of the kv-store's
adaccel.v1.KvHeader message; services map it to and from the message (common/rpc/kv_headers.py).
Torch (for the tensor side) is imported where a tensor is encoded or decoded, so the kv-store,
which only checks bytes, runs without it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.blocks.hashing import BlockHash

if TYPE_CHECKING:
    import torch

    from common.blocks.assembly import BlockKV

# Bytes per element of the dtypes a block may have (torch dtype names without "torch.").
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}
# Float dtypes as (unsigned view, exponent mask): all exponent bits set is Inf or NaN. Bit tests
# cover bfloat16, which numpy has no type for.
FLOAT_EXPONENT_MASKS = {"float32": (np.uint32, 0x7F800000), "float16": (np.uint16, 0x7C00),
                        "bfloat16": (np.uint16, 0x7F80), "float64": (np.uint64, 0x7FF0000000000000)}


def checksum(data: bytes) -> int:
    """CRC-32 (IEEE, zlib) of `data` as an unsigned 32-bit integer (the header's `checksum`)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def non_finite_values(dtype: str, data: bytes) -> int:
    """How many elements of a float tensor's raw bytes are Inf or NaN (0 for integer dtypes)."""
    if dtype not in FLOAT_EXPONENT_MASKS or not data:
        return 0
    view, mask = FLOAT_EXPONENT_MASKS[dtype]
    bits = np.frombuffer(data, dtype=view)
    return int(np.count_nonzero((bits & view(mask)) == view(mask)))


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What travels before a block's bytes (the fields of adaccel.v1.KvHeader)."""

    block_hash: BlockHash  # content hash (common/blocks/hashing.py)
    model_id: str  # the cache model key: model and dtype (`cache_model_key`)
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]  # [layers, 2, kv_heads, tokens, head_dim]
    total_bytes: int
    checksum: int  # `checksum` of the bytes
    num_tokens: int


class CorruptBlock(ValueError):
    """A stored block that does not match what was asked for (model, hash, dtype, shape, checksum)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_model_key(model_id: str, dtype: torch.dtype) -> str:
    """What block KV and the accuracy gate are keyed by: the model and its dtype."""
    return f"{model_id}:{dtype_name(dtype)}"


def block_nbytes(kv: BlockKV) -> int:
    """Bytes of a block's K and V tensors (what `encode_block` writes)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(kv.keys, kv.values))


def encode_block(kv: BlockKV, *, hash_: BlockHash, model_id: str) -> tuple[BlockHeader, bytes]:
    """One tensor [layers, 2 (K, V), kv_heads, tokens, head_dim], raw bytes in C order, and its header."""
    import torch

    # The header has no field for where a block was computed: only standalone blocks (computed at
    # position 0, what the decoder publishes) travel; a context-conditioned one would be moved wrongly.
    assert kv.base_position == 0, f"only standalone blocks are stored, got base_position {kv.base_position}"
    stacked = torch.stack([torch.stack((k[0], v[0])) for k, v in zip(kv.keys, kv.values, strict=True)])
    stacked = stacked.detach().to("cpu").contiguous()  # [L, 2, Hkv, T, D]
    data = stacked.view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
    header = BlockHeader(
        block_hash=hash_, model_id=model_id, dtype=dtype_name(stacked.dtype), shape=tuple(stacked.shape),
        total_bytes=len(data), checksum=checksum(data), num_tokens=kv.num_tokens,
    )
    return header, data


def decode_block(header: BlockHeader, data: bytes, *, hash_: BlockHash, model_id: str,
                 expected_shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> BlockKV:
    """The block's KV on `device`. Checks every header field and the bytes against what the caller
    expects (expected_shape: [layers, 2, kv_heads, tokens, head_dim]); raises CorruptBlock on any
    mismatch."""
    import torch

    from common.blocks.assembly import BlockKV

    expected_shape = tuple(expected_shape)
    if header.block_hash != hash_:
        raise CorruptBlock("block hash differs from the one asked for")
    if header.model_id != model_id:
        raise CorruptBlock(f"block of model {header.model_id!r}, expected {model_id!r}")
    if header.dtype != dtype_name(dtype):
        raise CorruptBlock(f"dtype {header.dtype!r}, expected {dtype_name(dtype)!r}")
    if tuple(header.shape) != expected_shape or header.num_tokens != expected_shape[3]:
        raise CorruptBlock(f"shape {list(header.shape)}, expected {list(expected_shape)}")
    if len(data) != header.total_bytes or len(data) != math.prod(expected_shape) * dtype.itemsize:
        raise CorruptBlock(f"{len(data)} bytes, header says {header.total_bytes}")
    if checksum(data) != header.checksum:
        raise CorruptBlock("checksum mismatch")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(expected_shape)
    tensor = tensor.to(device)  # [L, 2, Hkv, T, D]
    return BlockKV(
        keys=tuple(tensor[layer, 0][None] for layer in range(expected_shape[0])),
        values=tuple(tensor[layer, 1][None] for layer in range(expected_shape[0])),
    )
