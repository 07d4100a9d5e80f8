"""Block hashes: stable across runs and processes, and sensitive to every input they cover."""

from __future__ import annotations

import pytest

from common.blocks.hashing import Block, BlockKind, block_hash, hash_block, tokenizer_fingerprint
from common.modeling.tiny import byte_tokenizer

BASE = dict(model_id="tiny-llama@r1:fp32", tokenizer_fp="tokfp", kind=BlockKind.ITEM, token_ids=[5, 6, 7])


def test_hash_is_stable_and_pinned():
    assert block_hash(**BASE) == block_hash(**BASE)
    assert len(block_hash(**BASE)) == 32
    # Pinned: a change here silently orphans every stored block, so it must be deliberate
    # (bump HASH_FORMAT_VERSION).
    pinned = block_hash(model_id="m", tokenizer_fp="t", kind=BlockKind.ITEM, token_ids=[1, 2, 3])
    assert pinned.hex() == "90d020c642c14d3e0e4a104e1f425c7518aba43c2a84c4d16a0c5fbdfee311fa"


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "tiny-llama@r1:bf16"),
        ("tokenizer_fp", "tokfp2"),
        ("kind", BlockKind.USER_HISTORY),
        ("token_ids", [5, 6, 8]),
        ("token_ids", [7, 6, 5]),
        ("token_ids", [5, 6, 7, 0]),
        ("token_ids", [5, 6]),
    ],
)
def test_hash_changes_with_each_input(field, value):
    assert block_hash(**{**BASE, field: value}) != block_hash(**BASE)


def test_string_fields_cannot_run_into_each_other():
    a = block_hash(**{**BASE, "model_id": "ab", "tokenizer_fp": "c"})
    b = block_hash(**{**BASE, "model_id": "a", "tokenizer_fp": "bc"})
    assert a != b


def test_block_helper_and_tokenizer_fingerprint():
    fp = tokenizer_fingerprint(byte_tokenizer())
    assert fp == tokenizer_fingerprint(byte_tokenizer())  # two instances, same mapping
    changed = byte_tokenizer()
    changed.add_tokens(["<item>"])
    assert tokenizer_fingerprint(changed) != fp
    block = Block(BlockKind.INSTRUCTION, (1, 2))
    assert hash_block(block, model_id="m", tokenizer_fp=fp) == block_hash(
        model_id="m", tokenizer_fp=fp, kind=BlockKind.INSTRUCTION, token_ids=[1, 2]
    )
    with pytest.raises(AssertionError):
        Block(BlockKind.ITEM, ())
