"""How a prompt of blocks becomes token ids: each block tokenized alone, then joined.

Tokenizing blocks separately keeps a block's tokens identical wherever it appears (the property
block KV reuse needs); the first block gets the tokenizer's own special prefix (e.g. BOS) if it
adds one. Every component that turns blocks into ids (decoder, benchmarks, KV reuse) uses this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    # [start, end) token span of each block, in order.
    spans: list[tuple[int, int]]


class PromptTooLong(ValueError):
    pass


def tokenize_blocks(tokenizer, block_texts: Sequence[str], max_tokens: int | None = None) -> TokenizedPrompt:
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, text in enumerate(block_texts):
        start = len(ids)
        ids.extend(tokenizer(text, add_special_tokens=(i == 0))["input_ids"])
        spans.append((start, len(ids)))
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(f"prompt exceeds {max_tokens} tokens (at block {i})")
    return TokenizedPrompt(ids, spans)
