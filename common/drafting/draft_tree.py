"""Draft trees: the candidate continuations one verification step checks at once.

Pure Python + numpy (no torch) so that the pool service can build and ship trees too; the
decoder turns a `FlatTree` batch into model inputs (see services/decoder/engine/tree_inputs.py).

Two shapes:
- `DraftTree`: draft tokens with parent links and scores; the root (the last accepted token)
  is implicit and no two siblings share a token. A trie lookup returns a candidate tree in
  best-first order; `merge_drafts` merges candidates from several sources (request overlay,
  pool, shorter lookup keys), applies the budget and lays the draft out depth-first with
  siblings by descending score, so the best branch is the contiguous run tokens[0:d] - when it
  is accepted the KV cache is cut back by a plain crop.
- `FlatTree`: the tree as one model input row, root at index 0 followed by the draft tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

ROOT_PARENT = -1

# A draft path (token ids after the lookup key) and its score: relative frequency of the path
# given the key (count(key + path) / count(key)), summed over the sources that proposed it.
ScoredPath = tuple[tuple[int, ...], float]


@dataclass(slots=True)
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    # parents[i]: index in `tokens` of token i's parent, ROOT_PARENT for children of the root.
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.parents) == len(self.scores)
        assert all(p < i for i, p in enumerate(self.parents)), "parents must precede children"

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of each token below the root (children of the root have depth 1)."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent == ROOT_PARENT else depths[parent] + 1)
        return depths

    def path_to(self, index: int) -> list[int]:
        """Tokens from the root's child down to `index` (inclusive)."""
        path = []
        while index != ROOT_PARENT:
            path.append(self.tokens[index])
            index = self.parents[index]
        return path[::-1]

    def scored_paths(self) -> list[ScoredPath]:
        """The tree as scored paths (for callers that key nodes by path, e.g. a key-per-node store)."""
        paths: list[tuple[int, ...]] = []
        for token, parent in zip(self.tokens, self.parents):
            paths.append((paths[parent] if parent != ROOT_PARENT else ()) + (token,))
        return list(zip(paths, self.scores))

    @classmethod
    def from_scored_paths(
        cls, scored_paths: Iterable[ScoredPath], decoding_length: int, branch_length: int
    ) -> DraftTree:
        """Draft from scored paths: shared prefixes stored once, scores of equal paths summed,
        then the `decoding_length` best nodes at depth <= `branch_length` (see merge_drafts).

        A prefix that is not itself given (or a path cut at branch_length) gets the best score
        of the paths through it, so scores stay non-increasing along a path.
        """
        candidates = cls()
        index: dict[tuple[int, ...], int] = {}
        explicit: list[bool] = []
        for path, score in scored_paths:
            cut = len(path) > branch_length
            path = path[:branch_length]
            for end in range(1, len(path) + 1):
                prefix = path[:end]
                node = index.get(prefix)
                if node is None:
                    node = index[prefix] = len(candidates.tokens)
                    candidates.tokens.append(prefix[-1])
                    candidates.parents.append(index[prefix[:-1]] if end > 1 else ROOT_PARENT)
                    candidates.scores.append(score)
                    explicit.append(False)
                elif not explicit[node]:
                    candidates.scores[node] = max(candidates.scores[node], score)
            if path and not cut:
                node = index[path]
                candidates.scores[node] = candidates.scores[node] + score if explicit[node] else score
                explicit[node] = True
        return merge_drafts([candidates], decoding_length, branch_length)


def merge_drafts(trees: Sequence[DraftTree], decoding_length: int, branch_length: int) -> DraftTree:
    """One draft from candidate trees (e.g. request overlay + pool, or several lookup keys).

    Nodes spelling the same path are merged and their scores summed; then the
    `decoding_length` best nodes at depth <= `branch_length` are taken best-first from the root
    (so the result is a tree) and laid out depth-first, best child first. Runs every decode
    step: a node is identified by (merged parent, token), no path tuples are built.
    """
    return merge_marked_drafts(trees, 0, decoding_length, branch_length)[0]


def merge_marked_drafts(
    trees: Sequence[DraftTree], marked: int, decoding_length: int, branch_length: int
) -> tuple[DraftTree, list[bool]]:
    """merge_drafts, also telling for each draft node whether one of the first `marked` trees
    proposed it (the request's own text, say, against the shared pool)."""
    assert decoding_length >= 0 and branch_length >= 0
    if decoding_length == 0 or branch_length == 0:
        return DraftTree(), []
    kept = [(tree, i < marked) for i, tree in enumerate(trees) if len(tree)]
    trees = [tree for tree, _ in kept]
    tokens, scores = [-1], [0.0]  # merged candidate tree; node 0 is the root
    marks = [False]
    children: list[list[int]] = [[]]
    if len(trees) == 1 and max(trees[0].depths()) <= branch_length:
        # One source (the common case): nothing to merge, its nodes are the candidates.
        tokens += trees[0].tokens
        scores += trees[0].scores
        marks += [kept[0][1]] * len(trees[0])
        children += [[] for _ in trees[0].tokens]
        for node, parent in enumerate(trees[0].parents, start=1):
            children[parent + 1].append(node)
    else:
        _merge_into(trees, [m for _, m in kept], branch_length, tokens, scores, marks, children)
    selected = _select_best_first(children, scores, decoding_length)
    # Depth-first flatten, best child first (ties: the earlier proposed).
    draft, draft_marks = DraftTree(), []
    stack = [(child, ROOT_PARENT) for child in reversed(_ranked(children[0], scores, selected))]
    while stack:
        node, parent_position = stack.pop()
        position = len(draft.tokens)
        draft.tokens.append(tokens[node])
        draft.parents.append(parent_position)
        draft.scores.append(scores[node])
        draft_marks.append(marks[node])
        stack.extend((child, position) for child in reversed(_ranked(children[node], scores, selected)))
    return draft, draft_marks


def _merge_into(
    trees: Sequence[DraftTree],
    tree_marks: Sequence[bool],
    branch_length: int,
    tokens: list[int],
    scores: list[float],
    marks: list[bool],
    children: list[list[int]],
) -> None:
    """Adds the trees' nodes to the merged candidate tree; a node is identified by (merged
    parent, token), so equal paths from different trees become one node with summed scores
    (marked when any marked tree proposed it)."""
    index: dict[tuple[int, int], int] = {}
    depths = [0]
    for tree, marked in zip(trees, tree_marks):
        merged_of: list[int] = []  # tree index -> merged node, -1 when deeper than branch_length
        for token, parent, score in zip(tree.tokens, tree.parents, tree.scores):
            merged_parent = 0 if parent == ROOT_PARENT else merged_of[parent]
            if merged_parent < 0 or depths[merged_parent] >= branch_length:
                merged_of.append(-1)
                continue
            node = index.get((merged_parent, token))
            if node is None:
                node = index[(merged_parent, token)] = len(tokens)
                tokens.append(token)
                scores.append(score)
                marks.append(marked)
                depths.append(depths[merged_parent] + 1)
                children.append([])
                children[merged_parent].append(node)
            else:
                scores[node] += score
                marks[node] = marks[node] or marked
            merged_of.append(node)


def _select_best_first(children: list[list[int]], scores: list[float], budget: int) -> set[int] | None:
    """The `budget` best nodes, taken best-first from the root; None means all of them."""
    if len(scores) - 1 <= budget:
        return None
    selected: set[int] = set()
    frontier = [(-scores[c], c) for c in children[0]]
    heapq.heapify(frontier)
    while frontier and len(selected) < budget:
        _, node = heapq.heappop(frontier)
        selected.add(node)
        for child in children[node]:
            heapq.heappush(frontier, (-scores[child], child))
    return selected


def _ranked(nodes: list[int], scores: list[float], selected: set[int] | None) -> list[int]:
    if selected is not None:
        nodes = [n for n in nodes if n in selected]
    if len(nodes) > 1:
        nodes = sorted(nodes, key=lambda n: (-scores[n], n))
    return nodes


@dataclass(slots=True)
class FlatTree:
    """Root (last accepted token) + draft as one model input row."""

    tokens: list[int]  # [Q]; tokens[0] is the root
    parents: list[int]  # [Q]; parents[0] == ROOT_PARENT, others index into this row
    depths: list[int]  # [Q]; 0 for the root: position id = context length + depth
    children: list[list[int]]  # children[i]: indices of i's children, best first

    def __len__(self) -> int:
        return len(self.tokens)


def flatten(root_token: int, draft: DraftTree) -> FlatTree:
    parents = [ROOT_PARENT] + [p + 1 for p in draft.parents]  # draft index i -> row index i+1
    depths = [0] + draft.depths()
    children: list[list[int]] = [[] for _ in parents]
    for index, parent in enumerate(parents[1:], start=1):
        children[parent].append(index)  # DFS order already lists siblings best first
    return FlatTree([root_token, *draft.tokens], parents, depths, children)


def ancestor_mask(tree: FlatTree) -> np.ndarray:
    """[Q, Q] bool: mask[i, j] is True when j is i itself or one of its ancestors.

    Row i is its parent's row plus the diagonal, built in index order (parents come first).
    This is the tree part of the attention mask: a draft token sees only its own branch.
    """
    size = len(tree)
    mask = np.zeros((size, size), dtype=bool)
    for index, parent in enumerate(tree.parents):
        if parent != ROOT_PARENT:
            mask[index] = mask[parent]
        mask[index, index] = True
    return mask


def chain_tree(tokens: Sequence[int]) -> FlatTree:
    """A plain causal run as a FlatTree (each token's parent is the one before): prefill goes
    through the same input builder as tree steps. May be empty (a batch row with nothing to
    prefill)."""
    size = len(tokens)
    return FlatTree(
        tokens=list(tokens),
        parents=[i - 1 for i in range(size)],  # -1 (ROOT_PARENT) for the first
        depths=list(range(size)),
        children=[[i + 1] if i + 1 < size else [] for i in range(size)],
    )
