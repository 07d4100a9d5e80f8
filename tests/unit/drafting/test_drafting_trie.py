"""Token trie: n-gram counts, retrieval, decay, removal, snapshots (no model)."""

from __future__ import annotations

import doctest
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common.drafting.trie as trie_module
from common.drafting.trie import (
    StreamingInserter,
    TokenTrie,
    TrieSettings,
    extract_ngrams,
    ngram_prefix_counts,
)

FAST = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
sequences = st.lists(st.integers(0, 6), min_size=0, max_size=30)  # small alphabet: many repeats


def all_counts(trie: TokenTrie, kind: str = "output") -> dict[tuple[int, ...], int]:
    """Every stored n-gram with a positive count, by walking the trie's public lookups."""
    found: dict[tuple[int, ...], int] = {}
    frontier: list[tuple[int, ...]] = [()]
    while frontier:
        path = frontier.pop()
        for token in range(0, 10):
            child = path + (token,)
            if trie._find(child) != trie_module.NO_NODE:
                if trie.count(child, kind) > 0:
                    found[child] = trie.count(child, kind)
                frontier.append(child)
    return found


def test_docstring_examples() -> None:
    result = doctest.testmod(trie_module)
    assert result.failed == 0 and result.attempted >= 5


def test_extract_ngrams_one_path_per_start_position() -> None:
    assert extract_ngrams([1, 2, 3], 2) == [(1, 2), (2, 3), (3,)]
    assert extract_ngrams([], 4) == []


@FAST
@given(st.lists(sequences, max_size=4), st.integers(1, 5))
def test_node_counts_are_ngram_occurrences(seqs: list[list[int]], n: int) -> None:
    trie = TokenTrie(TrieSettings(ngram_length=n))
    expected: dict[tuple[int, ...], int] = {}
    for seq in seqs:
        trie.insert(seq)
        for path, count in ngram_prefix_counts(seq, n).items():
            expected[path] = expected.get(path, 0) + count
    assert all_counts(trie) == expected


@FAST
@given(st.lists(st.lists(st.integers(0, 6), max_size=6), max_size=6), st.integers(1, 5))
def test_streaming_insert_counts_each_start_once(chunks: list[list[int]], n: int) -> None:
    streamed = TokenTrie(TrieSettings(ngram_length=n))
    writer = StreamingInserter(streamed)
    for chunk in chunks:
        writer.extend(chunk)
    whole = TokenTrie(TrieSettings(ngram_length=n))
    whole.insert([t for chunk in chunks for t in chunk])
    assert all_counts(streamed) == all_counts(whole)


@FAST
@given(st.lists(st.lists(st.integers(0, 6), max_size=7), max_size=8), st.integers(1, 6), st.integers(3, 40))
def test_streaming_insert_equals_walking_every_open_ngram(chunks, n, capacity) -> None:
    """The writer's kept open paths give the counts and drafts of walking each open n-gram from
    the root on every extend, squeezes (node renumbering) in between included."""
    settings_ = TrieSettings(ngram_length=n, capacity=capacity)
    streamed, walked = TokenTrie(settings_), TokenTrie(settings_)
    writer = StreamingInserter(streamed)
    tokens: list[int] = []
    for chunk in [[0]] + [c for c in chunks if c]:  # a first chunk: later ones stream, not build
        writer.extend(chunk)
        old_length = len(tokens)
        tokens.extend(chunk)
        for start in range(max(0, old_length - n + 1), len(tokens)):
            walked.add_path(tokens[start : start + n], skip=max(0, min(n, old_length - start)))
        walked.enforce_capacity()
        assert streamed.squeeze_count == walked.squeeze_count
        assert all_counts(streamed) == all_counts(walked)
    for key in {tuple(tokens[i : i + k]) for i in range(len(tokens)) for k in (1, 2)}:
        a = streamed.retrieve(list(key), decoding_length=12, branch_length=n)
        b = walked.retrieve(list(key), decoding_length=12, branch_length=n)
        assert (a.tokens, a.parents, a.scores) == (b.tokens, b.parents, b.scores)


@FAST
@given(sequences, st.lists(st.integers(0, 6), max_size=8), st.integers(1, 5), st.sampled_from(["input", "output"]),
       st.integers(3, 60))
def test_vectorized_build_equals_node_by_node_insertion(seq, more, n, kind, capacity) -> None:
    """An overlay's prompt goes in with build(); counts, retrieval and later streaming are as if
    every n-gram had been added one by one (capacity squeezes included)."""
    settings_ = TrieSettings(ngram_length=n, capacity=capacity)
    built, stepwise = TokenTrie(settings_), TokenTrie(settings_)
    built.build(seq, kind)
    for path in extract_ngrams(seq, n):
        stepwise.add_path(path, kind)
    stepwise.enforce_capacity()
    assert len(built) == len(stepwise)
    assert all_counts(built, kind) == all_counts(stepwise, kind)
    for key in {tuple(seq[i : i + k]) for i in range(len(seq)) for k in (1, 2)}:
        a = built.retrieve(list(key), decoding_length=12, branch_length=4)
        b = stepwise.retrieve(list(key), decoding_length=12, branch_length=4)
        assert (a.tokens, a.parents, a.scores) == (b.tokens, b.parents, b.scores)
    # Streaming on from a built prefix counts each start position once, as before.
    streamed, whole = TokenTrie(TrieSettings(ngram_length=n)), TokenTrie(TrieSettings(ngram_length=n))
    writer = StreamingInserter(streamed)
    writer.extend(seq, kind)
    writer.extend(more, kind)
    for path in extract_ngrams(seq + more, n):
        whole.add_path(path, kind)
    assert all_counts(streamed, kind) == all_counts(whole, kind)


def test_build_refuses_a_trie_that_holds_something() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=3))
    trie.insert([1, 2, 3])
    with pytest.raises(AssertionError):
        trie.build([4, 5])


def brute_force_top_weights(trie_seqs, key, n, budget, depth) -> list[int]:
    counts: dict[tuple[int, ...], int] = {}
    for seq in trie_seqs:
        for path, count in ngram_prefix_counts(seq, n).items():
            counts[path] = counts.get(path, 0) + count
    below = [c for p, c in counts.items() if p[: len(key)] == key and len(key) < len(p) <= len(key) + depth]
    return sorted(below, reverse=True)[:budget]


@FAST
@given(st.lists(sequences, min_size=1, max_size=4), st.integers(1, 40), st.integers(1, 6), st.integers(1, 2))
def test_retrieval_takes_the_most_frequent_nodes(seqs, budget, depth, key_length) -> None:
    n = 8
    trie = TokenTrie(TrieSettings(ngram_length=n))
    for seq in seqs:
        trie.insert(seq)
    context = seqs[0][:key_length] if len(seqs[0]) >= key_length else [0] * key_length
    key = tuple(context[-key_length:])
    found = trie._best_first(trie._find(key), budget, depth) if trie._find(key) > 0 else None
    key_count = trie.count(key)
    got = sorted((round(score * key_count) for score in (found.scores if found else [])), reverse=True)
    assert got == brute_force_top_weights(seqs, key, n, budget, depth)
    # ... and the draft tree built from them is a tree within the budgets.
    draft = trie.retrieve(context, decoding_length=budget, branch_length=depth, key_length=key_length)
    assert len(draft) <= budget and all(d <= depth for d in draft.depths())
    assert all(p < i for i, p in enumerate(draft.parents))
    siblings = {}
    for index, (token, parent) in enumerate(zip(draft.tokens, draft.parents)):
        assert (parent, token) not in siblings, "shared prefixes are merged"
        siblings[(parent, token)] = index


def test_retrieval_falls_back_to_a_shorter_key() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=4))
    trie.insert([5, 6, 7, 8])
    # (9, 5) was never seen; the 1-token key (5,) was.
    draft = trie.retrieve([9, 5], decoding_length=8, branch_length=3, key_length=2)
    assert draft.tokens == [6, 7, 8]
    assert trie.retrieve([9, 4], decoding_length=8, branch_length=3).tokens == []


def test_retrieval_prefers_frequent_branches_and_lays_the_best_one_out_first() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=5))
    for _ in range(3):
        trie.insert([1, 2, 3, 4, 5])
    trie.insert([1, 2, 9, 9])
    draft = trie.retrieve([1, 2], decoding_length=4, branch_length=3, key_length=2)
    assert draft.tokens == [3, 4, 5, 9]
    assert draft.parents == [-1, 0, 1, -1]
    assert draft.scores[0] == pytest.approx(0.75)


def test_input_ngrams_weigh_less_than_output_ngrams() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=3, input_weight=0.5))
    trie.insert([1, 2, 3], "input")
    trie.insert([1, 2, 3], "input")
    trie.insert([1, 2, 7], "output")
    trie.insert([1, 2, 7], "output")
    draft = trie.retrieve([1, 2], decoding_length=1, branch_length=1)
    assert draft.tokens == [7]


def test_squeeze_halves_counts_and_prunes_rare_nodes() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=3))
    for _ in range(4):
        trie.insert([1, 2, 3])
    trie.insert([1, 5])
    trie.squeeze()
    assert trie.count([1, 2, 3]) == 2
    assert trie.count([1]) == 2  # 5 // 2
    assert trie.count([1, 5]) == 0 and trie._find([1, 5]) == trie_module.NO_NODE
    assert trie.squeeze_count == 1


@FAST
@given(st.lists(sequences, min_size=1, max_size=8), st.integers(5, 60))
def test_capacity_is_enforced_and_the_trie_stays_consistent(seqs, capacity) -> None:
    trie = TokenTrie(TrieSettings(ngram_length=4, capacity=capacity))
    for seq in seqs:
        trie.insert(seq)
        assert len(trie) <= capacity
    # Consistency after compaction: every node reachable by its path, counts non-increasing.
    for path, count in all_counts(trie).items():
        assert trie._find(path) > 0
        if len(path) > 1:
            assert trie.count(path[:-1]) >= count
    # Snapshot of a squeezed trie round-trips too.
    assert all_counts(TokenTrie.from_bytes(trie.to_bytes())) == all_counts(trie)


def test_remove_source_takes_back_its_ngrams() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=3))
    trie.insert([1, 2, 3, 4], source="item-1")
    trie.insert([1, 2, 9], source="item-2")
    assert trie.remove_source("item-1")
    assert not trie.remove_source("item-1")
    assert trie.count([1, 2, 3]) == 0 and trie.count([1, 2]) == 1
    assert trie.retrieve([1, 2], decoding_length=8, branch_length=2).tokens == [9]
    trie.prune()
    assert all_counts(trie) == ngram_prefix_counts([1, 2, 9], 3)


def test_remove_source_after_squeeze_takes_back_the_decayed_share_rounded_up() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=2))
    for i in range(4):
        trie.insert([1, 2], source=f"s{i}")
    trie.squeeze()  # (1, 2): 4 -> 2
    trie.remove_source("s0")  # its 1 occurrence is worth 1/2 now: 1 taken back
    assert trie.count([1, 2]) == 1
    trie.insert([1, 2], source="late")
    trie.remove_source("late")
    assert trie.count([1, 2]) == 1
    for i in range(1, 4):  # the rest: the node empties (rounding down left 2 here)
        trie.remove_source(f"s{i}")
    assert trie.count([1, 2]) == 0 and trie.count([1]) == 0


@pytest.mark.parametrize("seed", range(30))
def test_removing_every_source_that_reached_a_node_empties_it_whatever_the_decay_between(seed) -> None:
    rng = random.Random(seed)
    trie = TokenTrie(TrieSettings(ngram_length=3))
    item, others = [100, 101, 102, 103], []
    sources = []
    for step in range(rng.randint(2, 12)):
        action = rng.random()
        if action < 0.4:
            sources.append(f"item-{step}")
            trie.insert(item[: rng.randint(1, 4)] * rng.randint(1, 3), source=sources[-1])
        elif action < 0.7:
            others.append([rng.randrange(10) for _ in range(6)])
            trie.insert(others[-1])
        elif action < 0.85:
            trie.squeeze()
        elif sources:
            trie.remove_source(sources.pop(rng.randrange(len(sources))))
    for source in sources:
        trie.remove_source(source)
    assert all(trie.count(item[s:s + n]) == 0 for n in (1, 2, 3) for s in range(4 - n + 1))


def test_snapshot_round_trip_keeps_counts_retrieval_and_sources() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=5, capacity=1000, input_weight=0.25))
    trie.insert([3, 1, 4, 1, 5, 9, 2, 6], "input")
    trie.insert([3, 1, 4, 1, 5, 3, 5], source="doc")
    trie.squeeze()
    data = trie.to_bytes(include_sources=True)
    copy = TokenTrie.from_bytes(data)
    assert copy.settings == trie.settings and copy.squeeze_count == 1
    assert all_counts(copy) == all_counts(trie)
    assert all_counts(copy, "input") == all_counts(trie, "input")
    assert copy.retrieve([3, 1], decoding_length=8, branch_length=4) == trie.retrieve(
        [3, 1], decoding_length=8, branch_length=4
    )
    assert copy.sources == ["doc"]
    assert TokenTrie.from_bytes(trie.to_bytes()).sources == []
    for broken in (b"X" * 64, data[:10], data[:-5]):
        with pytest.raises(ValueError):
            TokenTrie.from_bytes(broken)


def test_ranked_children_cache_is_invalidated_by_inserts() -> None:
    trie = TokenTrie(TrieSettings(ngram_length=2))
    trie.insert([1, 2])
    assert trie.retrieve([1], decoding_length=1, branch_length=1, key_length=1).tokens == [2]
    trie.insert([1, 3])
    trie.insert([1, 3])
    assert trie.retrieve([1], decoding_length=1, branch_length=1, key_length=1).tokens == [3]
