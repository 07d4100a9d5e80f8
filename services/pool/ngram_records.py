"""Pure transform from incoming records to pool mutations (no Kafka, no RocksDB)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from adaccel.v1 import records_pb2
from common.drafting.trie import ngram_prefix_counts


class RejectedRecord(ValueError):
    """A record that cannot be applied; it goes to the dead-letter topic with this reason."""


@dataclass(slots=True, frozen=True)
class PoolMutation:
    pool_key: str
    # Trie node path -> count increment; every prefix of an inserted n-gram is a node.
    node_increments: Counter


def ngram_node_increments(sequences: Iterable[Sequence[int]], ngram_length: int) -> Counter:
    """Counts, for each trie node (a token path), how many inserted n-grams pass through it: the
    in-memory trie's own rule (`ngram_prefix_counts`), summed over sequences.

    >>> sorted(ngram_node_increments([[1, 2, 3]], 2).items())
    [((1,), 1), ((1, 2), 1), ((2,), 1), ((2, 3), 1), ((3,), 1)]
    """
    counts: Counter = Counter()
    for seq in sequences:
        counts.update(ngram_prefix_counts(seq, ngram_length))
    return counts


def check_token_ids(token_ids: Sequence[int], vocab_size: int, field: str) -> None:
    if vocab_size and any(t < 0 or t >= vocab_size for t in token_ids):
        bad = next(t for t in token_ids if t < 0 or t >= vocab_size)
        raise RejectedRecord(f"{field}: token id {bad} outside the vocabulary [0, {vocab_size})")


def generated_record_mutation(value: bytes | None, *, vocab_size: int, ngram_length: int,
                              max_tokens: int) -> PoolMutation:
    if not value:
        raise RejectedRecord("value: empty")
    try:
        record = records_pb2.GeneratedRecord.FromString(value)
    except DecodeError as exc:
        raise RejectedRecord(f"value: not a GeneratedRecord protobuf: {exc}") from exc
    if len(record.token_ids) > max_tokens:
        raise RejectedRecord(f"token_ids: {len(record.token_ids)} tokens, limit is {max_tokens}")
    check_token_ids(record.token_ids, vocab_size, "token_ids")
    return PoolMutation(record.pool_key, ngram_node_increments([record.token_ids], ngram_length))
