"""The block codec: layout round trip, every mismatch refused, the checksum is CRC-32 (not CRC-32C)."""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from common.blocks.assembly import BlockKV
from common.blocks.kv_codec import (
    BlockHeader,
    CorruptBlock,
    block_nbytes,
    cache_model_key,
    checksum,
    decode_block,
    dtype_name,
    encode_block,
    non_finite_values,
)

LAYERS, KV_HEADS, TOKENS, HEAD_DIM = 3, 2, 5, 4
SHAPE = (LAYERS, 2, KV_HEADS, TOKENS, HEAD_DIM)
HASH = b"h" * 32


def block_kv(dtype=torch.float32, seed=0) -> BlockKV:
    g = torch.Generator().manual_seed(seed)

    def one():
        return torch.randn(1, KV_HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype)  # [1, Hkv, T, D]

    return BlockKV(keys=tuple(one() for _ in range(LAYERS)), values=tuple(one() for _ in range(LAYERS)))


def decode(header, data, **overrides):
    args = {"hash_": HASH, "model_id": "m:float32", "expected_shape": SHAPE, "dtype": torch.float32,
            "device": torch.device("cpu")}
    args.update(overrides)
    return decode_block(header, data, **args)


def test_checksum_is_crc32_ieee_not_crc32c():
    assert checksum(b"123456789") == 0xCBF43926  # the CRC-32 check value; CRC-32C's is 0xE3069283
    assert checksum(b"") == 0 and checksum(b"\xff" * 7) == zlib.crc32(b"\xff" * 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_keeps_every_bit_and_the_layout(dtype):
    kv = block_kv(dtype)
    header, data = encode_block(kv, hash_=HASH, model_id=f"m:{dtype_name(dtype)}")
    assert header == BlockHeader(block_hash=HASH, model_id=f"m:{dtype_name(dtype)}", dtype=dtype_name(dtype),
                                 shape=SHAPE, total_bytes=len(data), checksum=checksum(data), num_tokens=TOKENS)
    assert len(data) == block_nbytes(kv)
    # Layout [layers, 2 (K, V), kv_heads, tokens, head_dim], C order: layer 1's V starts after
    # layer 0's K and V and layer 1's K.
    plane = KV_HEADS * TOKENS * HEAD_DIM * dtype.itemsize
    start = 3 * plane
    assert data[start:start + plane] == kv.values[1][0].contiguous().view(torch.uint8).numpy().tobytes()
    back = decode(header, data, model_id=f"m:{dtype_name(dtype)}", dtype=dtype)
    for a, b in zip(kv.keys + kv.values, back.keys + back.values, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def test_every_mismatch_is_refused():
    header, data = encode_block(block_kv(), hash_=HASH, model_id="m:float32")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(CorruptBlock, match="checksum"):
        decode(header, bytes(flipped))
    with pytest.raises(CorruptBlock, match="model"):
        decode(header, data, model_id="other:float32")
    with pytest.raises(CorruptBlock, match="hash"):
        decode(header, data, hash_=b"x" * 32)
    with pytest.raises(CorruptBlock, match="shape"):
        decode(header, data, expected_shape=(LAYERS, 2, KV_HEADS, TOKENS + 1, HEAD_DIM))
    with pytest.raises(CorruptBlock, match="dtype"):
        decode(header, data, dtype=torch.bfloat16)
    with pytest.raises(CorruptBlock, match="bytes"):
        decode(header, data[:-4])


def test_non_finite_values_are_counted_by_bits_bfloat16_included():
    values = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        raw = values.to(dtype).view(torch.uint8).numpy().tobytes()
        assert non_finite_values(dtype_name(dtype), raw) == 3
    assert non_finite_values("int8", np.array([-1, 127], dtype=np.int8).tobytes()) == 0


def test_model_key_names_the_dtype():
    assert cache_model_key("org/tiny@rev", torch.bfloat16) == "org/tiny@rev:bfloat16"


def test_the_byte_side_imports_without_torch():
    """The kv-store uses the checksum and dtype table and never loads torch through the codec."""
    code = "import sys, common.blocks.kv_codec; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
