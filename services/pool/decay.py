"""Decay-and-prune of a stored pool (pure): what TokenTrie.squeeze does, over key-ordered rows.

The in-memory trie halves every count per squeeze and drops a node once both its counts reach 0,
with its subtree. Applied `s` times that is a right shift by `s` (floor(floor(x/2)/2) = x >> 2),
and a node survives `s` squeezes iff every node on its path (itself included) still has a
nonzero count after the shift, i.e. iff `s` is below the smallest bit length of max(output,
input) along the path: its *life*. Rows come in key order (pre-order: a parent right before its
subtree), so one pass with a stack of the ancestors' lives decides every node.

>>> rows = [((1,), 4, 0), ((1, 2), 3, 0), ((1, 2, 3), 1, 0), ((5,), 1, 2)]
>>> list(squeezed_rows(rows, 1))
[((1,), 2, 0), ((1, 2), 1, 0), ((5,), 0, 1)]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

Path = tuple[int, ...]
Row = tuple[Path, int, int]  # (path, output count, input count)


def node_life(output: int, input_: int) -> int:
    """Squeezes a node's own counts survive: bit length of the larger count."""
    return max(output, input_).bit_length()


def squeezed_rows(rows: Iterable[Row], squeezes: int) -> Iterator[Row]:
    """The rows that survive `squeezes` decay passes, counts shifted, in the same order."""
    lives: list[int] = []  # lives[d] = life of the current path's ancestor at depth d + 1
    for path, output, input_ in rows:
        depth = len(path)
        del lives[depth - 1:]
        assert len(lives) == depth - 1, f"rows out of key order or missing a parent at {path}"
        life = node_life(output, input_)
        if lives:
            life = min(life, lives[-1])
        lives.append(life)
        if life > squeezes:
            yield path, output >> squeezes, input_ >> squeezes


def merged_rows(stored: Iterable[Row], pending: Mapping[Path, tuple[int, int]]) -> Iterator[Row]:
    """Stored rows (key order) with pending new values laid over them, still in key order:
    the pool as it will be once a batch holding `pending` is written.

    >>> list(merged_rows([((1,), 1, 0), ((3,), 1, 0)], {(2,): (5, 0), (3,): (2, 0)}))
    [((1,), 1, 0), ((2,), 5, 0), ((3,), 2, 0)]
    """
    overlay = sorted(pending.items())
    i = 0
    for path, output, input_ in stored:
        while i < len(overlay) and overlay[i][0] < path:
            yield overlay[i][0], *overlay[i][1]
            i += 1
        if i < len(overlay) and overlay[i][0] == path:
            yield path, *overlay[i][1]
            i += 1
        else:
            yield path, output, input_
    for path, (output, input_) in overlay[i:]:
        yield path, output, input_

