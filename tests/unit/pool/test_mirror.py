"""PoolMirror without a store: what each mutation reports is exactly what a store needs to stay
equal to the mirror (the batch writer's contract), decay included."""

from __future__ import annotations

import doctest
import random

import pytest

from common.drafting.trie import TokenTrie, TrieSettings, ngram_prefix_counts
from services.pool import decay
from services.pool import mirror as mirror_module
from services.pool.mirror import PoolMirror, Retraction

ROOMY = TrieSettings(ngram_length=3, capacity=10_000)


def test_doctests() -> None:
    assert doctest.testmod(mirror_module).failed == 0


@pytest.mark.parametrize("sequences, kind", [
    ([[1, 2, 3]], "output"),
    ([[1, 2, 1, 2], [2, 1]], "output"),
    ([[5, 5, 5, 5]], "input"),
    ([[]], "output"),
])
def test_insert_reports_every_node_it_adds_to_with_its_new_counts(sequences, kind) -> None:
    mirror = PoolMirror(ROOMY)
    mirror.insert([[1, 2]], "output")  # an existing pool: counts reported are totals, not increments
    reference = TokenTrie(ROOMY)
    reference.insert([1, 2], "output")
    for seq in sequences:
        reference.insert(seq, kind)
    change = mirror.insert(sequences, kind)
    paths = {p for seq in sequences for p in ngram_prefix_counts(seq, ROOMY.ngram_length)}
    assert set(change.counts) == paths
    for path, (output, input_) in change.counts.items():
        assert (output, input_) == (reference.count(path, "output"), reference.count(path, "input")), path
    assert change.squeezes == 0 and change.nodes == len(mirror) == len(reference)


@pytest.mark.parametrize("retraction, changed", [
    # every node of the sequence's n-grams loses what the insert gave it
    (Retraction((1, 2, 3), "output", 0), {(1,), (1, 2), (1, 2, 3), (2,), (2, 3), (3,)}),
    # nodes that do not exist are neither created nor reported: (9,), (2, 9), (1, 2, 9)
    (Retraction((1, 2, 9), "output", 0), {(1,), (1, 2), (2,)}),
    # a squeeze since the insert halves what is taken back, rounded up: 1 occurrence still
    # takes back 1 (rounding down left two such sources' squeezed 1 behind for good)
    (Retraction((1, 2, 3), "output", 1), {(1,), (1, 2), (1, 2, 3), (2,), (2, 3), (3,)}),
    (Retraction((1, 2, 1, 2), "output", 1), {(1,), (1, 2), (1, 2, 1), (2,), (2, 1), (2, 1, 2)}),
    # another kind's counts are untouched
    (Retraction((1, 2, 3), "input", 0), set()),
])
def test_a_retraction_reports_only_the_nodes_it_changed(retraction, changed) -> None:
    mirror = PoolMirror(ROOMY)
    mirror.insert([[1, 2, 3], [1, 2, 1, 2]], "output")
    nodes = len(mirror)
    change = mirror.remove([retraction])
    assert set(change.counts) == changed
    for path, counts in change.counts.items():
        assert counts == (mirror.count(path), 0)
    assert change.nodes == len(mirror) == nodes  # emptied nodes stay until the next decay


def test_replacing_an_item_text_reports_the_retracted_and_the_inserted_nodes() -> None:
    mirror = PoolMirror(ROOMY)
    mirror.insert([[1, 2, 3]], "input")
    change = mirror.insert([[1, 2, 5]], "input", retract=[Retraction((1, 2, 3), "input", 0)])
    assert change.counts[(1, 2, 3)] == change.counts[(2, 3)] == change.counts[(3,)] == (0, 0)
    assert change.counts[(1, 2)] == (0, 1) and change.counts[(1, 2, 5)] == (0, 1)


def test_output_only_pools_report_input_counts_as_zero_until_input_arrives() -> None:
    mirror = PoolMirror(ROOMY)
    assert mirror.insert([[1, 2]], "output").counts[(1, 2)] == (1, 0)
    assert mirror.insert([[1, 2]], "input").counts[(1, 2)] == (1, 1)
    assert mirror.insert([[1, 2]], "output").counts[(1, 2)] == (2, 1)


def test_rows_rebuild_the_same_mirror_zero_count_nodes_and_input_included() -> None:
    mirror = PoolMirror(ROOMY)
    mirror.insert([[1, 2, 3]], "output")
    mirror.insert([[4, 5]], "input")
    mirror.remove([Retraction((1, 2, 3), "output", 0)])
    rows = [((1,), 0, 0), ((1, 2), 0, 0), ((1, 2, 3), 0, 0), ((2,), 0, 0), ((2, 3), 0, 0), ((3,), 0, 0),
            ((4,), 0, 1), ((4, 5), 0, 1), ((5,), 0, 1)]
    rebuilt = PoolMirror.from_rows(ROOMY, rows)
    assert len(rebuilt) == len(mirror) == len(rows)
    for path, output, input_ in rows:
        assert (rebuilt.count(path), rebuilt.count(path, "input")) == (output, input_)
    # input counts are read back after a rebuild: the rebuilt mirror knows it has input
    assert rebuilt.insert([[4]], "output").counts[(4,)] == (1, 1)


def apply_like_the_batch_writer(rows: dict, change) -> dict:
    """A store that only ever sees what the mirror reports (no reads of its own per node)."""
    if not change.squeezes:
        return {**rows, **change.counts}
    merged = decay.merged_rows(((p, *c) for p, c in sorted(rows.items())), change.counts)
    return {p: (o, i) for p, o, i in decay.squeezed_rows(merged, change.squeezes)}


@pytest.mark.parametrize("seed", range(4))
def test_a_store_fed_only_the_reported_counts_stays_equal_to_the_mirror(seed) -> None:
    settings = TrieSettings(ngram_length=3, capacity=60, squeeze_to=0.75)
    rng = random.Random(seed)
    mirror, rows = PoolMirror(settings), {}
    inserted: list[tuple[tuple[int, ...], str, int]] = []  # (tokens, kind, squeezes at insert)
    squeezes, paths = 0, set()
    for _ in range(150):
        if inserted and rng.random() < 0.2:
            tokens, kind, at = inserted.pop(rng.randrange(len(inserted)))
            change = mirror.remove([Retraction(tokens, kind, squeezes - at)])
        else:
            tokens = tuple(rng.randrange(10) for _ in range(rng.randint(1, 8)))
            kind = rng.choice(["output", "output", "input"])
            retract = []
            if inserted and rng.random() < 0.2:  # an item text replaced
                old, old_kind, at = inserted.pop()
                retract = [Retraction(old, old_kind, squeezes - at)]
            change = mirror.insert([tokens], kind, retract=retract)
            inserted.append((tokens, kind, squeezes))
            paths.update(ngram_prefix_counts(tokens, settings.ngram_length))
        squeezes += change.squeezes
        rows = apply_like_the_batch_writer(rows, change)
        assert len(rows) == change.nodes == len(mirror) <= settings.capacity
        for path in paths:
            assert rows.get(path, (0, 0)) == (mirror.count(path), mirror.count(path, "input")), path
    assert squeezes > 0  # decay was exercised
