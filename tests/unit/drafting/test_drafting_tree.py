"""Draft trees: merging, budgets, flattening, ancestor masks (no model)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.drafting.draft_tree import DraftTree, ancestor_mask, chain_tree, flatten, merge_drafts

paths = st.lists(
    st.tuples(st.lists(st.integers(0, 4), min_size=1, max_size=6).map(tuple), st.floats(0.01, 1.0)),
    max_size=20,
)


def test_shared_prefixes_are_merged_and_scores_summed() -> None:
    a = DraftTree.from_scored_paths([((1,), 0.5), ((1, 2), 0.5)], 8, 4)
    b = DraftTree.from_scored_paths([((1,), 0.25), ((1, 3), 0.25)], 8, 4)
    merged = merge_drafts([a, b], decoding_length=8, branch_length=4)
    assert merged.tokens == [1, 2, 3]
    assert merged.parents == [-1, 0, 0]
    assert merged.scores == [0.75, 0.5, 0.25]


def test_best_branch_is_laid_out_contiguously() -> None:
    tree = DraftTree.from_scored_paths(
        [((7,), 0.4), ((5,), 0.6), ((5, 1), 0.1), ((5, 2), 0.5), ((5, 2, 3), 0.5)], 8, 8
    )
    assert tree.tokens == [5, 2, 3, 1, 7]
    assert tree.parents == [-1, 0, 1, 0, -1]
    assert tree.depths() == [1, 2, 3, 2, 1]
    assert tree.path_to(2) == [5, 2, 3]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(paths, st.integers(0, 12), st.integers(0, 5))
def test_budgets_and_best_first_selection(scored, budget, depth) -> None:
    tree = DraftTree.from_scored_paths(scored, budget, depth)
    assert len(tree) <= budget
    assert all(d <= depth for d in tree.depths())
    assert all(p < i for i, p in enumerate(tree.parents))
    # Every stored path is unique (shared prefixes merged) and round-trips through scored_paths.
    stored = [p for p, _ in tree.scored_paths()]
    assert len(set(stored)) == len(stored)
    assert DraftTree.from_scored_paths(tree.scored_paths(), budget, depth) == tree
    # Budget is used fully when enough candidates exist within the depth.
    candidates = {p[:d] for p, _ in scored for d in range(1, min(len(p), depth) + 1)}
    assert len(tree) == min(budget, len(candidates))


def test_flatten_puts_the_root_first() -> None:
    draft = DraftTree(tokens=[5, 2, 3, 7], parents=[-1, 0, 1, -1], scores=[1.0] * 4)
    flat = flatten(9, draft)
    assert flat.tokens == [9, 5, 2, 3, 7]
    assert flat.parents == [-1, 0, 1, 2, 0]
    assert flat.depths == [0, 1, 2, 3, 1]
    assert flat.children == [[1, 4], [2], [3], [], []]


def test_ancestor_mask_lets_each_token_see_only_its_branch() -> None:
    flat = flatten(9, DraftTree(tokens=[5, 2, 7], parents=[-1, 0, -1], scores=[1.0] * 3))
    expected = np.array(
        [
            [1, 0, 0, 0],  # root
            [1, 1, 0, 0],  # 5
            [1, 1, 1, 0],  # 5 -> 2
            [1, 0, 0, 1],  # 7: sees the root, not the sibling branch
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(ancestor_mask(flat), expected)


def test_chain_tree_is_causal() -> None:
    chain = chain_tree([4, 5, 6])
    np.testing.assert_array_equal(ancestor_mask(chain), np.tril(np.ones((3, 3), dtype=bool)))
    assert chain.depths == [0, 1, 2] and chain.children == [[1], [2], []]
    assert len(chain_tree([])) == 0
