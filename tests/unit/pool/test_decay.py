"""Decay over stored rows equals TokenTrie.squeeze, pass for pass."""

import random

import pytest

from common.drafting.trie import TokenTrie, TrieSettings, ngram_prefix_counts
from services.pool.decay import merged_rows, squeezed_rows


def random_trie(seed: int) -> tuple[TokenTrie, set]:
    rng = random.Random(seed)
    trie = TokenTrie(TrieSettings(ngram_length=4, capacity=10**6))
    paths = set()
    for _ in range(60):
        seq = [rng.randrange(6) for _ in range(rng.randint(1, 12))]
        kind = rng.choice(["input", "output", "output"])
        trie.insert(seq, kind, source=str(rng.randrange(5)))
        paths.update(ngram_prefix_counts(seq, 4))
    for source in rng.sample(trie.sources, 2):  # zero-count nodes too
        trie.remove_source(source)
    return trie, paths


def rows_of(trie: TokenTrie, paths) -> list:
    """The trie's nodes as stored rows (path, output, input), in key order."""
    # Test-only peek at node existence: nodes emptied by removal exist with count 0.
    return [(p, trie.count(p), trie.count(p, "input")) for p in sorted(paths) if trie._find(p) != -1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("squeezes", [1, 2, 3])
def test_squeezed_rows_match_the_tries_squeeze(seed, squeezes):
    trie, paths = random_trie(seed)
    rows = rows_of(trie, paths)
    assert len(rows) == len(trie)
    for _ in range(squeezes):
        trie.squeeze()
    assert list(squeezed_rows(rows, squeezes)) == rows_of(trie, paths)


def test_merged_rows_lay_pending_values_over_stored_ones_in_key_order():
    stored = [((1,), 3, 0), ((1, 2), 2, 0), ((4,), 1, 1)]
    pending = {(1, 2): (5, 0), (1, 2, 3): (1, 0), (0,): (1, 0)}
    assert list(merged_rows(stored, pending)) == [
        ((0,), 1, 0), ((1,), 3, 0), ((1, 2), 5, 0), ((1, 2, 3), 1, 0), ((4,), 1, 1)]
    assert list(merged_rows([], pending)) == sorted((p, *v) for p, v in pending.items())

