"""Token trie of n-gram counts: the draft source for lookahead-style (PIA / DARE) decoding.

Every start position of an inserted sequence adds the path tokens[i : i + ngram_length], and
every node on that path gets +1, so a node's count is the number of occurrences of the n-gram
it spells. Retrieval walks the last few context tokens (the lookup key) down from the root and
returns the most frequent continuations below that node as a draft tree.

Two counts per node: "input" (prompt n-grams) and "output" (generated text); the score is
output + input_weight * input, so prompt evidence weighs less than generated evidence.

Layout (why arrays, not node objects): a pool of 1M nodes must stay compact in decoder memory
and load from a snapshot in well under a second. Nodes are ids into parallel `array`s
(token, parent, first child, next sibling, two counts); a dict maps (parent, token) to the child
id. Ids only grow, and a child always has a larger id than its parent; compaction (after
squeeze) keeps that order, which lets numpy process nodes level by level.

Why retrieval is cheap whatever the fan-out: each node's sibling list is kept in descending
weight order - sorted (vectorized) whenever the index is rebuilt (snapshot load, squeeze), and
re-sorted lazily, at the next retrieval that reaches it, for a node whose children changed.
Best-first selection then only ever looks at a node's first child and a popped node's next
sibling: O(budget log budget) per step, even below a key like ", the" with 10k continuations.

Decay (PIA's squeeze): when the node count exceeds `capacity`, all counts are halved (floor) and
nodes whose counts both reach 0 (those at <= 1 before) are dropped with their subtrees; this
repeats until the trie is under `squeeze_to * capacity`. Counts never increase down a path, so
the pruned set is always whole subtrees.

Removal of a source (e.g. an item that left inventory): `insert(..., source=...)` remembers the
sequence; `remove_source` walks its n-grams again and decrements the counts it added, scaled
down by the squeezes since (each halved its contribution) and rounded up. Rounding up is what
makes removal complete: a node's count never exceeds the sum of its sequences' shares
occurrences / 2^squeezes_since (a squeeze floors), and taking back the ceiling of a share
keeps that so, so once every sequence that reached a node is taken back the node reads 0 -
however the inserts, squeezes and removals interleaved. Rounding down left a residue: two
sources of 1 at a node squeezed to 1, and each then took back 1 >> 1 = 0. The price: at a node
other texts share, a removal may take up to 1 more than its share from theirs. Nodes that reach
0 stay until the next squeeze/prune but are invisible to retrieval.
"""

from __future__ import annotations

import heapq
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from common.drafting.draft_tree import ROOT_PARENT, DraftTree, merge_drafts
from common.drafting.geometry import DEFAULT_GEOMETRY

Kind = Literal["input", "output"]
KINDS: tuple[Kind, Kind] = ("input", "output")
ROOT = 0
NO_NODE = -1
_TOKEN_SPACE = 1 << 31  # edge key = parent * _TOKEN_SPACE + token; tokens are stored as int32
_MAGIC = b"ADTRIE"
_FORMAT_VERSION = 1
_HEADER = struct.Struct(
    "<6sBHQddIQB"
)  # magic, version, ngram, capacity, squeeze_to, input_w, squeezes, n, flags
_FLAG_SOURCES = 1


def extract_ngrams(tokens: Sequence[int], ngram_length: int) -> list[tuple[int, ...]]:
    """One path per start position, tokens[i : i + ngram_length] (shorter at the tail).

    Adding +1 on every node of each path makes a node's count the number of occurrences of its
    n-gram. Pure function: the RocksDB-backed pool service reuses it.

    >>> extract_ngrams([5, 6, 7, 8], 3)
    [(5, 6, 7), (6, 7, 8), (7, 8), (8,)]
    """
    assert ngram_length >= 1
    return [tuple(tokens[i : i + ngram_length]) for i in range(len(tokens))]


def ngram_prefix_counts(tokens: Sequence[int], ngram_length: int) -> dict[tuple[int, ...], int]:
    """Occurrences of every n-gram (length 1..ngram_length) in `tokens`: the count each trie
    node on the inserted paths gains; what a key-per-node store increments in one batch.

    >>> ngram_prefix_counts([1, 2, 1, 2], 2)
    {(1,): 2, (1, 2): 2, (2,): 2, (2, 1): 1}
    """
    counts: dict[tuple[int, ...], int] = {}
    for path in extract_ngrams(tokens, ngram_length):
        for end in range(1, len(path) + 1):
            counts[path[:end]] = counts.get(path[:end], 0) + 1
    return dict(sorted(counts.items()))


@dataclass(slots=True, frozen=True)
class TrieSettings:
    # Deepest stored path: lookup key + default branch_length (common/drafting/geometry.py).
    ngram_length: int = DEFAULT_GEOMETRY.ngram_length
    capacity: int = 1 << 20  # nodes, root excluded
    squeeze_to: float = 0.75  # squeeze until len <= squeeze_to * capacity (hysteresis)
    input_weight: float = 0.5


@dataclass(slots=True)
class _SourceRecord:
    kind: Kind
    tokens: array  # array("i")
    squeezes_at_insert: int


class TokenTrie:
    """N-gram trie with frequency-ranked retrieval.

    Not thread-safe: retrieval may re-sort sibling lists of nodes changed since the last sort,
    so one thread (the decode loop) owns a trie at a time.

    Worked example (ngram_length 5): two sequences share "1 2 3 4", one continues "1 2 5".

    >>> trie = TokenTrie(TrieSettings(ngram_length=5))
    >>> trie.insert([1, 2, 3, 4])
    >>> trie.insert([1, 2, 3, 4, 9])
    >>> trie.insert([1, 2, 5])
    >>> draft = trie.retrieve([7, 1, 2], decoding_length=8, branch_length=2, key_length=2)

    The key is the last two context tokens (1, 2): count(1 2) = 3, count(1 2 3) = 2,
    count(1 2 3 4) = 2, count(1 2 5) = 1. Scores are count(key + path) / count(key); branches
    come best first, depth-first, so the top branch 3 -> 4 is the contiguous run [0:2]; the
    stored "9" after "3 4" is deeper than branch_length = 2 and not drafted.

    >>> draft.tokens, draft.parents
    ([3, 4, 5], [-1, 0, -1])
    >>> [round(s, 3) for s in draft.scores]
    [0.667, 0.667, 0.333]
    """

    def __init__(self, settings: TrieSettings | None = None) -> None:
        self.settings = settings or TrieSettings()
        assert self.settings.ngram_length >= 1 and self.settings.capacity >= 1
        self._squeezes = 0
        self._sources: dict[str, list[_SourceRecord]] = {}
        self.generation = 0  # bumped whenever node ids change (build, squeeze, prune, load)
        self._reset_nodes(
            token=np.array([NO_NODE], np.int32),
            parent=np.array([NO_NODE], np.int32),
            output=np.zeros(1, np.int64),
            input_=np.zeros(1, np.int64),
        )

    # ------------------------------------------------------------------ size and counts
    def __len__(self) -> int:
        """Nodes held, root excluded (counts zeroed by removal until the next prune)."""
        return len(self._token) - 1

    @property
    def squeeze_count(self) -> int:
        return self._squeezes

    def count(self, path: Sequence[int], kind: Kind = "output") -> int:
        """Count of the n-gram `path` (0 when absent)."""
        node = self._find(path)
        if node == NO_NODE:
            return 0
        return (self._output if kind == "output" else self._input)[node]

    def _weight(self, node: int) -> float:
        return self._output[node] + self.settings.input_weight * self._input[node]

    # ------------------------------------------------------------------ insertion
    def insert(self, tokens: Sequence[int], kind: Kind = "output", *, source: str | None = None) -> None:
        """Adds all n-grams of `tokens`; with `source`, remembers them for `remove_source`."""
        assert kind in KINDS
        for path in extract_ngrams(tokens, self.settings.ngram_length):
            self.add_path(path, kind)
        if source is not None:
            record = _SourceRecord(kind, array("i", tokens), self._squeezes)
            self._sources.setdefault(source, []).append(record)
        self.enforce_capacity()

    def build(self, tokens: Sequence[int], kind: Kind = "output") -> None:
        """`insert(tokens, kind)` into an empty trie, vectorized: a request's overlay holds its
        whole prompt (thousands of tokens x ngram_length nodes), which node-by-node insertion
        took ~10% of a request's time to add. Level d's nodes are the distinct (level d-1 node,
        token) pairs over all start positions (np.unique); each one's count is how many start
        positions reach it, exactly what inserting one path per start position counts."""
        assert kind in KINDS and len(self) == 0 and not self._sources, "build() fills an empty trie"
        sequence = np.asarray(tokens, dtype=np.int64)
        assert sequence.size == 0 or (sequence.min() >= 0 and sequence.max() < _TOKEN_SPACE)
        token_levels, parent_levels, count_levels = [np.array([NO_NODE], np.int64)], [np.array([NO_NODE], np.int64)], []
        count_levels.append(np.zeros(1, np.int64))
        prefix_node = np.zeros(len(sequence), np.int64)  # node of tokens[i : i + depth], per start i
        next_id = 1
        for depth in range(1, min(self.settings.ngram_length, len(sequence)) + 1):
            starts = len(sequence) - depth + 1
            keys = prefix_node[:starts] * _TOKEN_SPACE + sequence[depth - 1 : depth - 1 + starts]
            unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            parent_levels.append(unique // _TOKEN_SPACE)
            token_levels.append(unique % _TOKEN_SPACE)
            count_levels.append(counts.astype(np.int64))
            prefix_node = next_id + inverse.reshape(-1).astype(np.int64)
            next_id += len(unique)
        counts = np.concatenate(count_levels)
        zeros = np.zeros_like(counts)
        self._reset_nodes(
            np.concatenate(token_levels).astype(np.int32),
            np.concatenate(parent_levels).astype(np.int32),
            counts if kind == "output" else zeros,
            zeros if kind == "output" else counts,
        )
        self.enforce_capacity()

    def add_path(self, path: Sequence[int], kind: Kind = "output", count: int = 1, skip: int = 0) -> int:
        """Adds `count` to every node of `path` below depth `skip` (creating nodes as needed)
        and returns the path's last node (NO_NODE when a decrement found it missing).

        `skip` lets a caller walk to a path it inserted earlier without counting it twice.
        Negative `count` decrements, floored at 0. Node ids stay valid until `generation`
        changes. Does not enforce capacity: callers batch that (`enforce_capacity`).
        """
        counts = self._output if kind == "output" else self._input
        edges, unsorted = self._edges, self._unsorted
        node = ROOT
        for depth, token in enumerate(path):
            child = edges.get(node * _TOKEN_SPACE + token)
            if child is None:
                if count < 0:
                    return NO_NODE  # nothing to decrement below a missing node
                child = self._new_node(node, token)
            if depth >= skip:
                counts[child] = max(0, counts[child] + count)
                unsorted[node] = 1  # node's children may have changed order
            node = child
        return node

    def add_child(self, node: int, token: int, kind: Kind = "output") -> int:
        """Counts one more occurrence of `node`'s path followed by `token` (creating the child)
        and returns the child: one step of add_path, for a writer that keeps its open paths."""
        child = self._edges.get(node * _TOKEN_SPACE + token)
        if child is None:
            child = self._new_node(node, token)
        (self._output if kind == "output" else self._input)[child] += 1
        self._unsorted[node] = 1
        return child

    def _new_node(self, parent: int, token: int) -> int:
        assert 0 <= token < _TOKEN_SPACE, token
        child = len(self._token)
        self._token.append(token)
        self._parent.append(parent)
        self._first_child.append(NO_NODE)
        self._next_sibling.append(self._first_child[parent])
        self._first_child[parent] = child
        self._output.append(0)
        self._input.append(0)
        self._unsorted.append(0)
        self._unsorted[parent] = 1
        self._edges[parent * _TOKEN_SPACE + token] = child
        return child

    # ------------------------------------------------------------------ removal and decay
    def remove(self, tokens: Sequence[int], kind: Kind = "output", *, squeezes_since_insert: int = 0) -> None:
        """Takes back what `insert(tokens, kind)` added, halved once per squeeze since then and
        rounded up (see the module note: what makes a removal complete)."""
        per_node: dict[int, int] = {}
        for path in extract_ngrams(tokens, self.settings.ngram_length):
            node = ROOT
            for token in path:
                node = self._edges.get(node * _TOKEN_SPACE + token, NO_NODE)
                if node == NO_NODE:
                    break
                per_node[node] = per_node.get(node, 0) + 1
        counts = self._output if kind == "output" else self._input
        for node, occurrences in per_node.items():
            share = -(-occurrences >> squeezes_since_insert)  # ceil(occurrences / 2^squeezes)
            counts[node] = max(0, counts[node] - share)
            self._unsorted[self._parent[node]] = 1

    def remove_source(self, source: str) -> bool:
        """Removes the n-grams inserted under `source`; False when the source is unknown."""
        records = self._sources.pop(source, None)
        if records is None:
            return False
        for record in records:
            self.remove(
                record.tokens, record.kind, squeezes_since_insert=self._squeezes - record.squeezes_at_insert
            )
        return True

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    def enforce_capacity(self) -> None:
        if len(self) <= self.settings.capacity:
            return
        target = int(self.settings.squeeze_to * self.settings.capacity)
        while len(self) > target:
            self.squeeze()

    def squeeze(self) -> None:
        """Halves all counts and drops nodes whose counts reach 0 (with their subtrees)."""
        self._squeezes += 1
        self._compact(_as_numpy(self._output, np.int64) // 2, _as_numpy(self._input, np.int64) // 2)

    def prune(self) -> None:
        """Drops nodes whose counts are 0 (left by `remove`) without decaying the others."""
        self._compact(_as_numpy(self._output, np.int64), _as_numpy(self._input, np.int64))

    def _compact(self, output: np.ndarray, input_: np.ndarray) -> None:
        parent = _as_numpy(self._parent, np.int32)
        keep = (output > 0) | (input_ > 0)
        keep[ROOT] = True
        # A node survives only if its parent does. Propagating the parent's flag once per tree
        # level settles it (ngram_length levels for paths inserted by `insert`).
        while True:
            propagated = keep.copy()
            propagated[1:] &= keep[parent[1:]]
            if np.array_equal(propagated, keep):
                break
            keep = propagated
        new_id = np.cumsum(keep, dtype=np.int64) - 1
        kept_parent = parent[keep]
        kept_parent[1:] = new_id[kept_parent[1:]]
        self._reset_nodes(_as_numpy(self._token, np.int32)[keep], kept_parent, output[keep], input_[keep])

    def _reset_nodes(
        self, token: np.ndarray, parent: np.ndarray, output: np.ndarray, input_: np.ndarray
    ) -> None:
        """Installs node arrays (root at 0, parent ids < child ids) and rebuilds the indexes."""
        size = len(token)
        assert len(parent) == len(output) == len(input_) == size and parent[0] == NO_NODE
        child_ids = np.arange(1, size, dtype=np.int64)
        child_parents = parent[1:].astype(np.int64)
        assert np.all(child_parents < child_ids), "parent ids must precede child ids"
        # Sibling chains: group children by parent, heaviest first (ties: lower token), and link
        # each child to the next one of its group.
        weight = output[1:] + self.settings.input_weight * input_[1:]
        order = child_ids[np.lexsort((token[1:], -weight, child_parents))]
        sorted_parents = parent[order]
        same_parent = sorted_parents[:-1] == sorted_parents[1:]
        next_sibling = np.full(size, NO_NODE, np.int32)
        next_sibling[order[:-1][same_parent]] = order[1:][same_parent]
        group_start = np.ones(len(order), dtype=bool)
        group_start[1:] = ~same_parent
        first_child = np.full(size, NO_NODE, np.int32)
        first_child[sorted_parents[group_start]] = order[group_start]

        self._token = array("i", token.astype(np.int32).tobytes())
        self._parent = array("i", parent.astype(np.int32).tobytes())
        self._first_child = array("i", first_child.tobytes())
        self._next_sibling = array("i", next_sibling.tobytes())
        self._output = array("q", output.astype(np.int64).tobytes())
        self._input = array("q", input_.astype(np.int64).tobytes())
        keys = child_parents * _TOKEN_SPACE + token[1:].astype(np.int64)
        self._edges = dict(zip(keys.tolist(), range(1, size)))
        self._unsorted = bytearray(size)  # 1: the node's sibling list needs re-sorting
        self.generation += 1

    # ------------------------------------------------------------------ retrieval
    def _find(self, path: Sequence[int]) -> int:
        node = ROOT
        edges = self._edges
        for token in path:
            node = edges.get(node * _TOKEN_SPACE + token, NO_NODE)
            if node == NO_NODE:
                return NO_NODE
        return node

    def _sorted_first_child(self, node: int) -> int:
        """node's heaviest child (NO_NODE if none), re-linking its children in descending
        weight order (ties: lower token) first if they changed since the last sort."""
        if self._unsorted[node]:
            token, next_sibling = self._token, self._next_sibling
            children = []
            child = self._first_child[node]
            while child != NO_NODE:
                children.append((-self._weight(child), token[child], child))
                child = next_sibling[child]
            children.sort()
            following = NO_NODE
            for _, _, child in reversed(children):
                next_sibling[child] = following
                following = child
            self._first_child[node] = following
            self._unsorted[node] = 0
        return self._first_child[node]

    def _best_first(self, match: int, budget: int, max_depth: int) -> DraftTree:
        """The `budget` heaviest nodes below `match` (depth <= max_depth), in pop order, as a
        candidate tree (parents index into it; scores are weight / weight of `match`).

        Weights never increase down a path, so best-first order yields the top nodes of the
        subtree. Sibling lists are sorted, so a node's children enter the heap one at a time
        (its first child; then each popped node's next sibling).
        """
        result = DraftTree()
        norm = self._weight(match)
        if norm <= 0 or budget <= 0 or max_depth <= 0:
            return result
        output, input_, input_weight = self._output, self._input, self.settings.input_weight
        next_sibling, token = self._next_sibling, self._token

        def weight_of(node: int) -> float:
            return output[node] + input_weight * input_[node]

        # heap entry: (-weight, tie, node, depth, parent's position in result); the tie counter
        # keeps pops deterministic and never lets the comparison reach the other fields
        heap: list[tuple[float, int, int, int, int]] = []
        tie = 0
        first = self._sorted_first_child(match)
        if first != NO_NODE and weight_of(first) > 0:
            heap.append((-weight_of(first), tie, first, 1, -1))
        while heap and len(result.tokens) < budget:
            negative_weight, _, node, depth, parent_position = heapq.heappop(heap)
            position = len(result.tokens)
            result.tokens.append(token[node])
            result.parents.append(parent_position)
            result.scores.append(-negative_weight / norm)
            sibling = next_sibling[node]
            if sibling != NO_NODE and weight_of(sibling) > 0:  # zero-weight (removed) nodes sort last
                tie += 1
                heapq.heappush(heap, (-weight_of(sibling), tie, sibling, depth, parent_position))
            if depth < max_depth:
                child = self._sorted_first_child(node)
                if child != NO_NODE and weight_of(child) > 0:
                    tie += 1
                    heapq.heappush(heap, (-weight_of(child), tie, child, depth + 1, position))
        return result

    def candidates(
        self, context: Sequence[int], *, decoding_length: int, branch_length: int, key_length: int = 2
    ) -> list[DraftTree]:
        """Candidate continuations of `context`, one tree per lookup key tried, longest first.

        Tries the last `key_length` tokens as the key, then shorter suffixes; stops falling back
        once one key yields at least min(decoding_length, branch_length) nodes (as PIA does).
        Keys are capped so that key + branch fits in the stored n-gram length.
        """
        found: list[DraftTree] = []
        enough = min(decoding_length, branch_length)
        longest = min(key_length, len(context), self.settings.ngram_length - 1)
        for length in range(longest, 0, -1):
            match = self._find(context[len(context) - length :])
            if match == NO_NODE:
                continue
            depth = min(branch_length, self.settings.ngram_length - length)
            found.append(self._best_first(match, decoding_length, depth))
            if len(found[-1]) >= enough:
                break
        return found

    def context_support(self, context: Sequence[int], tree: DraftTree) -> list[int]:
        """For each node of `tree` (a draft continuing `context`, parents before children): the
        longest suffix of `context` after which the node's whole path is stored here (0: after
        none). A draft from a 2-token key mixes every stored text holding those 2 tokens; a node
        still stored after 6 context tokens continues a text the request is following token for
        token, and is accepted far more often (SuffixDecoding's match length, in an n-gram trie:
        context + path fit in `ngram_length`).

        >>> trie = TokenTrie(TrieSettings(ngram_length=5))
        >>> trie.insert([1, 2, 3, 4])
        >>> trie.insert([9, 2, 3, 5])
        >>> draft = trie.retrieve([1, 2, 3], decoding_length=4, branch_length=1, key_length=2)
        >>> draft.tokens, trie.context_support([1, 2, 3], draft)
        ([4, 5], [3, 2])
        """
        support = [0] * len(tree)
        if not len(tree):
            return support
        depths = tree.depths()
        edges, output, input_ = self._edges, self._output, self._input
        longest = min(len(context), self.settings.ngram_length - 1)
        for length in range(longest, 0, -1):  # longest first: a node's first match is its support
            start = self._find(context[len(context) - length :])
            if start == NO_NODE:
                continue
            matched = [NO_NODE] * len(tree)
            for index, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
                if length + depths[index] > self.settings.ngram_length:
                    continue
                above = start if parent == ROOT_PARENT else matched[parent]
                if above == NO_NODE:
                    continue
                child = edges.get(above * _TOKEN_SPACE + token, NO_NODE)
                matched[index] = child
                if child != NO_NODE and support[index] == 0 and (output[child] or input_[child]):
                    support[index] = length
        return support

    def stored_depth(self, context: Sequence[int], continuation: Sequence[int], *, min_key: int = 1,
                     max_depth: int | None = None) -> int:
        """How many tokens of `continuation` are stored here right after some suffix of
        `context` at least `min_key` tokens long (the deepest over all such keys that fit in
        `ngram_length`). What a drafter choosing perfectly among this trie's stored
        continuations could draft and have accepted: the retrieval ceiling bench-draft-replay
        reports, since a real drafter does not know `continuation`.

        >>> trie = TokenTrie(TrieSettings(ngram_length=6))
        >>> trie.insert([1, 2, 3, 4, 5])
        >>> trie.insert([8, 2, 3, 9])
        >>> trie.stored_depth([8, 2], [3, 9, 7]), trie.stored_depth([1, 2], [3, 9, 7])
        (2, 2)
        >>> trie.stored_depth([1, 2], [3, 9, 7], min_key=2)  # after "1 2" only "3" is stored
        1
        """
        limit = len(continuation) if max_depth is None else min(max_depth, len(continuation))
        edges, output, input_ = self._edges, self._output, self._input
        best = 0
        for length in range(min(len(context), self.settings.ngram_length - 1), max(min_key, 1) - 1, -1):
            node = self._find(context[len(context) - length:])
            if node == NO_NODE:
                continue
            depth = 0
            for token in continuation[:min(limit, self.settings.ngram_length - length)]:
                node = edges.get(node * _TOKEN_SPACE + token, NO_NODE)
                if node == NO_NODE or not (output[node] or input_[node]):  # zeroed by removal: invisible
                    break
                depth += 1
            best = max(best, depth)
        return best

    def key_weight(self, key: Sequence[int]) -> float:
        """Weight (count) of the longest suffix of `key` stored in the trie, as `candidates`
        would match it first; 0 when none is. The evidence behind a draft's relative
        frequencies (common/drafting/confidence.py smooths them with it)."""
        for length in range(min(len(key), self.settings.ngram_length - 1), 0, -1):
            node = self._find(key[len(key) - length :])
            if node != NO_NODE:
                return self._weight(node)
        return 0.0

    def retrieve(
        self, context: Sequence[int], *, decoding_length: int, branch_length: int, key_length: int = 2
    ) -> DraftTree:
        """Draft tree for the continuation of `context` (see the class docstring example)."""
        found = self.candidates(
            context, decoding_length=decoding_length, branch_length=branch_length, key_length=key_length
        )
        return merge_drafts(found, decoding_length, branch_length)

    # ------------------------------------------------------------------ snapshots
    def to_bytes(self, *, include_sources: bool = False, level: int = 1) -> bytes:
        """Compact snapshot: header + zlib(token, parent delta, counts as uint32[, sources])."""
        size = len(self._token)
        ids = np.arange(size, dtype=np.int64)
        parent = _as_numpy(self._parent, np.int32).astype(np.int64)
        # Children are usually created right after their parent: small deltas compress well.
        parent_delta = np.where(ids > 0, ids - parent, 0).astype(np.uint32)
        max_count = np.iinfo(np.uint32).max
        parts = [
            _as_numpy(self._token, np.int32).astype("<i4").tobytes(),
            parent_delta.astype("<u4").tobytes(),
            np.minimum(_as_numpy(self._output, np.int64), max_count).astype("<u4").tobytes(),
            np.minimum(_as_numpy(self._input, np.int64), max_count).astype("<u4").tobytes(),
        ]
        flags = 0
        if include_sources and self._sources:
            flags |= _FLAG_SOURCES
            parts.append(_encode_sources(self._sources))
        s = self.settings
        header = _HEADER.pack(
            _MAGIC,
            _FORMAT_VERSION,
            s.ngram_length,
            s.capacity,
            s.squeeze_to,
            s.input_weight,
            self._squeezes,
            size,
            flags,
        )
        return header + zlib.compress(b"".join(parts), level)

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenTrie:
        try:
            magic, version, ngram, capacity, squeeze_to, input_weight, squeezes, size, flags = (
                _HEADER.unpack_from(data)
            )
            if magic != _MAGIC or version != _FORMAT_VERSION:
                raise ValueError(f"not a token trie snapshot (magic {magic!r}, version {version})")
            payload = zlib.decompress(data[_HEADER.size :])
        except (struct.error, zlib.error) as exc:
            raise ValueError(f"unreadable token trie snapshot: {exc}") from exc
        column = size * 4
        if len(payload) < 4 * column:
            raise ValueError("truncated token trie snapshot")

        def read(i: int, dtype: str) -> np.ndarray:
            return np.frombuffer(payload, dtype=dtype, count=size, offset=i * column)

        ids = np.arange(size, dtype=np.int64)
        parent = np.where(ids > 0, ids - read(1, "<u4").astype(np.int64), NO_NODE)
        trie = cls(TrieSettings(ngram, capacity, squeeze_to, input_weight))
        trie._squeezes = squeezes
        trie._reset_nodes(
            read(0, "<i4"),
            parent.astype(np.int32),
            read(2, "<u4").astype(np.int64),
            read(3, "<u4").astype(np.int64),
        )
        if flags & _FLAG_SOURCES:
            trie._sources = _decode_sources(payload[4 * column :])
        return trie


class StreamingInserter:
    """Feeds a growing token sequence into a trie, counting each start position's n-gram once.

    Partial n-grams near the tail are inserted immediately (so the newest text is draftable at
    once) and extended as tokens arrive. The writer keeps the trie node where each still-open
    n-gram ends (the last ngram_length - 1 start positions), so a new token costs one child
    step per open n-gram instead of a walk from the root for each: ngram_length steps rather
    than ngram_length^2 / 2 (a decode step's emitted tokens go through here every step). When
    node ids change under it (a squeeze), it walks to its open paths again.
    """

    def __init__(self, trie: TokenTrie) -> None:
        self.trie = trie
        self._tokens: list[int] = []
        self._open: list[int] = []  # nodes ending the open n-grams, oldest start first
        self._generation = -1  # trie generation `_open` belongs to

    def extend(self, new_tokens: Sequence[int], kind: Kind = "output") -> None:
        if not new_tokens:
            return
        trie = self.trie
        n = trie.settings.ngram_length
        old_length = len(self._tokens)
        self._tokens.extend(new_tokens)
        if old_length == 0 and len(trie) == 0 and not trie.sources:
            trie.build(self._tokens, kind)  # a fresh overlay and its prompt: all at once
            return
        if self._generation != trie.generation:
            starts = range(max(0, old_length - n + 1), old_length)
            self._open = [trie.add_path(self._tokens[s:old_length], kind, skip=n) for s in starts]
        open_nodes = self._open
        for token in new_tokens:
            open_nodes = [trie.add_child(node, token, kind) for node in open_nodes]
            open_nodes.append(trie.add_child(ROOT, token, kind))
            if len(open_nodes) >= n:  # the oldest has reached ngram_length tokens: complete
                del open_nodes[: len(open_nodes) - n + 1]
        self._open = open_nodes
        self._generation = trie.generation
        trie.enforce_capacity()
        if trie.generation != self._generation:
            self._generation = -1  # a squeeze renumbered the nodes


def _as_numpy(values: array, dtype: type) -> np.ndarray:
    """A numpy copy of an array.array (a view would pin its buffer and block appends)."""
    return np.frombuffer(values, dtype=dtype).copy()


def _encode_sources(sources: dict[str, list[_SourceRecord]]) -> bytes:
    out = [struct.pack("<I", len(sources))]
    for name, records in sources.items():
        encoded = name.encode()
        out.append(struct.pack("<HI", len(encoded), len(records)) + encoded)
        for record in records:
            out.append(
                struct.pack("<BII", KINDS.index(record.kind), record.squeezes_at_insert, len(record.tokens))
            )
            out.append(np.asarray(record.tokens, dtype="<i4").tobytes())
    return b"".join(out)


def _decode_sources(blob: bytes) -> dict[str, list[_SourceRecord]]:
    (count,), offset = struct.unpack_from("<I", blob), 4
    sources: dict[str, list[_SourceRecord]] = {}
    for _ in range(count):
        name_length, n_records = struct.unpack_from("<HI", blob, offset)
        offset += 6
        name = blob[offset : offset + name_length].decode()
        offset += name_length
        records = []
        for _ in range(n_records):
            kind_index, squeezes, length = struct.unpack_from("<BII", blob, offset)
            offset += 9
            tokens = array(
                "i", np.frombuffer(blob, "<i4", count=length, offset=offset).astype(np.int32).tobytes()
            )
            offset += 4 * length
            records.append(_SourceRecord(KINDS[kind_index], tokens, squeezes))
        sources[name] = records
    return sources
