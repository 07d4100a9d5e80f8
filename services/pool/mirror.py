"""One pool's in-memory trie, changed only by mutations that report the nodes they touched (pure).

The store holds one row per trie node and equals the mirror after every acknowledged write.
So a mutation needs to write only the nodes whose counts it changed, and the mirror can tell
which those are without asking the store: an inserted n-gram path gains counts (and may gain
nodes); a retracted sequence lowers counts of nodes that exist and never creates one. Every
other node is, on disk, what it is here.

A mutation that passes the capacity decays the pool (TokenTrie.enforce_capacity); its report
then holds the touched counts *before* the decay plus the number of passes, which is what
`decay.squeezed_rows` needs to rewrite the stored rows (see batch_writer.py).

No I/O and no clock; not thread-safe (the trie re-sorts siblings during retrieval), so the
pool manager holds the pool's lock around every call.

>>> mirror = PoolMirror(TrieSettings(ngram_length=2, capacity=100))
>>> sorted(mirror.insert([[1, 2, 1]], "output").counts.items())
[((1,), (2, 0)), ((1, 2), (1, 0)), ((2,), (1, 0)), ((2, 1), (1, 0))]
>>> sorted(mirror.remove([Retraction((2, 1), "output", 0)]).counts.items())
[((1,), (1, 0)), ((2,), (0, 0)), ((2, 1), (0, 0))]
>>> len(mirror)  # emptied nodes stay until the next decay
4
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.drafting.draft_tree import DraftTree
from common.drafting.trie import TokenTrie, TrieSettings
from services.pool.ngram_records import ngram_node_increments

Path = tuple[int, ...]
Counts = tuple[int, int]  # (output, input)


@dataclass(slots=True, frozen=True)
class Retraction:
    """Taking back one remembered sequence: what its insert added, halved once per decay pass since."""

    tokens: tuple[int, ...]
    kind: str  # "input" | "output"
    squeezes_since_insert: int


@dataclass(slots=True, frozen=True)
class MirrorChange:
    """What one mutation did to the mirror."""

    counts: Mapping[Path, Counts]  # every node whose counts changed or that was created, before decay
    squeezes: int  # decay passes the mutation triggered (0: `counts` are the final values)
    nodes: int  # nodes after the mutation, decay included


class PoolMirror:
    def __init__(self, settings: TrieSettings) -> None:
        self._trie = TokenTrie(settings)
        # Whether any node may hold an input count; while not, reading input counts back is
        # skipped (the hot path of ingesting generated text).
        self._has_input = False

    @classmethod
    def from_rows(cls, settings: TrieSettings, rows: Iterable[tuple[Path, int, int]]) -> PoolMirror:
        """The mirror of stored rows (path, output, input) in key order: a parent before its
        children, so each add_path only sets the last node of its path."""
        mirror = cls(settings)
        add_path = mirror._trie.add_path
        for path, output, input_ in rows:
            add_path(path, "output", count=output, skip=len(path) - 1)  # creates the node, 0 counts too
            if input_:
                add_path(path, "input", count=input_, skip=len(path) - 1)
                mirror._has_input = True
        return mirror

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self._trie)

    def count(self, path: Sequence[int], kind: str = "output") -> int:
        return self._trie.count(path, kind)

    def retrieve(self, context: Sequence[int], *, decoding_length: int, branch_length: int,
                 key_length: int) -> DraftTree:
        return self._trie.retrieve(context, decoding_length=decoding_length, branch_length=branch_length,
                                   key_length=key_length)

    def to_bytes(self) -> bytes:
        return self._trie.to_bytes()

    # ------------------------------------------------------------------ mutations
    def insert(self, sequences: Iterable[Sequence[int]], kind: str, *,
               retract: Iterable[Retraction] = ()) -> MirrorChange:
        """Retracts `retract` (an item's text being replaced), adds the n-grams of `sequences`,
        then decays if over capacity."""
        touched = self._retract(retract)
        increments = ngram_node_increments(sequences, self._trie.settings.ngram_length)
        add_path = self._trie.add_path
        for path in sorted(increments):  # parents first: each add_path then sets one node
            add_path(path, kind, count=increments[path], skip=len(path) - 1)
        self._has_input = self._has_input or kind == "input"
        touched.update(increments)
        counts = self._counts(touched)
        squeezes_before = self._trie.squeeze_count
        self._trie.enforce_capacity()
        return MirrorChange(counts, self._trie.squeeze_count - squeezes_before, len(self._trie))

    def remove(self, retract: Iterable[Retraction]) -> MirrorChange:
        """Retracts sequences; emptied nodes stay (count 0) until the next decay. Never decays:
        a removal does not add nodes."""
        return MirrorChange(self._counts(self._retract(retract)), 0, len(self._trie))

    def _retract(self, retract: Iterable[Retraction]) -> set[Path]:
        """Applies the retractions; returns the paths whose counts they changed. Comparing counts
        before and after is what tells existing nodes from missing ones (both read 0 when empty)
        without a lookup in the store."""
        changed: set[Path] = set()
        count = self._trie.count
        for item in retract:
            paths = ngram_node_increments([item.tokens], self._trie.settings.ngram_length)
            before = {path: count(path, item.kind) for path in paths}
            self._trie.remove(item.tokens, item.kind, squeezes_since_insert=item.squeezes_since_insert)
            changed.update(path for path, was in before.items() if count(path, item.kind) != was)
        return changed

    def _counts(self, paths: Iterable[Path]) -> dict[Path, Counts]:
        count = self._trie.count
        if self._has_input:
            return {path: (count(path, "output"), count(path, "input")) for path in paths}
        return {path: (count(path, "output"), 0) for path in paths}
