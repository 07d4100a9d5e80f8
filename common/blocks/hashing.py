"""Typed prompt blocks and their content hashes (the key under which a block's KV is stored).

A block's KV, computed standalone at positions [0, n), is a function of exactly:
  * the model weights and their dtype -> `model_id` (callers must make it name both, e.g.
    "org/name@revision:bf16"; two dtypes of one checkpoint give different KV),
  * the token ids of the block -> `token_ids`,
and the token ids only mean something together with the tokenizer that produced them, so the
hash also covers a fingerprint of that tokenizer (the same text under a retrained tokenizer must
not hit). The block kind is hashed too: the KV store places kinds differently (user histories are
replicated, items sharded), so the same tokens under two kinds are two entries by design.
Position is not hashed: every stored block starts at position 0.

A block's KV computed *in its request* (after the blocks before it, at its own positions) is
exact, but only after that very prefix: prefix caching keeps it under `prefix_hash`, a chain of
block hashes (as vLLM's automatic prefix caching chains a block's hash to its parent's), so the
key of block i names blocks 0..i, model and tokenizer included. Such KV stays in the decoder that
computed it; the kv-store keeps standalone blocks only.

The encoding is unambiguous (length-prefixed strings, fixed-width little-endian token ids) and
versioned, so a change of layout can never collide with old keys.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

HASH_FORMAT_VERSION = 1
DIGEST_BYTES = 32


class BlockKind(enum.Enum):
    INSTRUCTION = "instruction"
    USER_HISTORY = "user_history"
    ITEM = "item"
    FREE_TEXT = "free_text"


@dataclass(frozen=True)
class Block:
    kind: BlockKind
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        assert isinstance(self.kind, BlockKind), self.kind
        assert len(self.token_ids) > 0, "a block has at least one token"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hex digest of everything that maps text to ids: the fast tokenizer's full JSON
    (vocab, merges, normalizer, pre-tokenizer, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return hashlib.blake2b(backend.to_str().encode(), digest_size=16).hexdigest()


def _length_prefixed(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def block_hash(*, model_id: str, tokenizer_fp: str, kind: BlockKind, token_ids: Sequence[int]) -> BlockHash:
    """blake2b-256 over (format version, model id, tokenizer fingerprint, kind, token ids)."""
    assert model_id and tokenizer_fp, "model id and tokenizer fingerprint must be non-empty"
    assert isinstance(kind, BlockKind), kind
    assert len(token_ids) > 0 and all(0 <= int(t) < 2**32 for t in token_ids), "token ids must fit uint32"
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"adaccel-block")
    h.update(struct.pack("<H", HASH_FORMAT_VERSION))
    h.update(_length_prefixed(model_id))
    h.update(_length_prefixed(tokenizer_fp))
    h.update(_length_prefixed(kind.value))
    h.update(struct.pack("<I", len(token_ids)))
    h.update(struct.pack(f"<{len(token_ids)}I", *(int(t) for t in token_ids)))
    return BlockHash(h.digest())


def hash_block(block: Block, *, model_id: str, tokenizer_fp: str) -> BlockHash:
    return block_hash(
        model_id=model_id, tokenizer_fp=tokenizer_fp, kind=block.kind, token_ids=block.token_ids
    )


def prefix_hash(parent: BlockHash | None, block: BlockHash) -> BlockHash:
    """Key of a block's in-prompt KV: blake2b-256 over (format version, the previous block's
    prefix hash or nothing for the first block, the block's own hash)."""
    assert len(block) == DIGEST_BYTES and (parent is None or len(parent) == DIGEST_BYTES)
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"adaccel-prefix")
    h.update(struct.pack("<H", HASH_FORMAT_VERSION))
    h.update(parent or b"")
    h.update(block)
    return BlockHash(h.digest())
