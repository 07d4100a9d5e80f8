"""Acceptance rules over hand-made logits; speculative sampling keeps the target distribution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from common.drafting.draft_tree import DraftTree, flatten
from common.drafting.verification import (
    SamplingParams,
    relaxed_acceptable,
    speculative_choice,
    target_probs,
    verify_relaxed,
    verify_sampling,
    verify_strict,
)

VOCAB = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree_of(tokens, parents, root=0):
    return flatten(root, DraftTree(tokens=tokens, parents=parents, scores=[1.0] * len(tokens)))


def logits_preferring(rows: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float32))  # [Q, V]; rows are probabilities


def one_hot_rows(best: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(best), VOCAB)
    logits[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return logits


def test_strict_follows_the_argmax_through_the_tree() -> None:
    # root -> 1 -> 2 ; root -> 3. Model: after root 1, after 1 -> 2, after 2 -> 4 (bonus).
    tree = tree_of([1, 2, 3], [-1, 0, -1])
    verdict = verify_strict(one_hot_rows([1, 2, 4, 0]), tree)
    assert verdict.path == [0, 1, 2] and verdict.tokens == [1, 2, 4] and verdict.accepted == 2


def test_strict_takes_a_later_sibling_and_stops_at_the_first_mismatch() -> None:
    tree = tree_of([1, 2, 3], [-1, 0, -1])
    verdict = verify_strict(one_hot_rows([3, 0, 0, 5]), tree)
    assert verdict.path == [0, 3] and verdict.tokens == [3, 5]
    rejected = verify_strict(one_hot_rows([4, 0, 0, 0]), tree)
    assert rejected.path == [0] and rejected.tokens == [4]


def test_relaxed_accepts_a_probable_second_choice_and_picks_the_longest_branch() -> None:
    # root: p(1)=0.5, p(3)=0.3 -> both acceptable; branch 3 -> 4 is longer (2 accepted).
    rows = [
        [0.05, 0.5, 0.05, 0.3, 0.05, 0.05],
        [0.9, 0.02, 0.02, 0.02, 0.02, 0.02],  # after 1: wants 0, draft has nothing
        [0.05, 0.05, 0.05, 0.05, 0.75, 0.05],  # after 3: wants 4 -> accepted
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],  # after 3 -> 4: bonus 5
    ]
    tree = tree_of([1, 3, 4], [-1, -1, 1])
    verdict = verify_relaxed(logits_preferring(rows), tree, top_k=2, min_prob=0.1)
    assert verdict.path == [0, 2, 3] and verdict.tokens == [3, 4, 5]
    # Threshold above 0.3: only the argmax path remains, which is the strict result.
    strictish = verify_relaxed(logits_preferring(rows), tree, top_k=2, min_prob=0.4)
    assert strictish.tokens == verify_strict(logits_preferring(rows), tree).tokens == [1, 0]


def test_relaxed_rule_takes_the_argmax_always_and_others_only_in_the_top_k_above_the_threshold() -> None:
    top_tokens, top_probs = [4, 1], [0.05, 0.04]  # a flat distribution: even the argmax is below min_prob
    assert relaxed_acceptable(top_tokens, top_probs, 4, min_prob=0.1)
    assert not relaxed_acceptable(top_tokens, top_probs, 1, min_prob=0.1)
    assert relaxed_acceptable(top_tokens, top_probs, 1, min_prob=0.04)
    assert not relaxed_acceptable(top_tokens, top_probs, 2, min_prob=0.0)  # outside the top-k


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_relaxed_accepts_only_tokens_that_satisfy_the_rule(data) -> None:
    size = data.draw(st.integers(0, 8))
    parents = [data.draw(st.integers(-1, i - 1)) for i in range(size)]
    tokens = [data.draw(st.integers(0, VOCAB - 1)) for _ in range(size)]
    assume(len(set(zip(parents, tokens))) == size)  # a merged draft tree has no equal siblings
    tree = tree_of(tokens, parents)
    logits = torch.randn(
        len(tree), VOCAB, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    )
    top_k, min_prob = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    verdict = verify_relaxed(logits, tree, top_k=top_k, min_prob=min_prob)
    top = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)  # [Q, k]
    for parent, child in zip(verdict.path, verdict.path[1:]):
        assert tree.parents[child] == parent
        assert relaxed_acceptable(top.indices[parent].tolist(), top.values[parent].tolist(), tree.tokens[child],
                                  min_prob)
    assert verdict.tokens[-1] == int(logits[verdict.path[-1]].argmax())
    # relaxed accepts at least as much as strict, and with top-1 it is strict
    assert verdict.accepted >= verify_strict(logits, tree).accepted
    assert verify_relaxed(logits, tree, top_k=1, min_prob=0.0).tokens == verify_strict(logits, tree).tokens


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.8), (0.9, 4, 0.6)]
)
def test_target_probs_match_transformers_warpers(temperature, top_k, top_p) -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    ours = target_probs(logits, SamplingParams(temperature, top_k, top_p))
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    torch.testing.assert_close(ours, torch.softmax(scores, dim=-1))


def chi_square(observed: list[int], expected_probs: list[float]) -> float:
    total = sum(observed)
    return sum((o - total * p) ** 2 / (total * p) for o, p in zip(observed, expected_probs) if p > 0)


# Upper 0.1% points of the chi-square distribution (df -> value); seeds are fixed, so no flakes.
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52}


@pytest.mark.parametrize("candidates", [[], [2], [2, 0], [4, 2, 1], [1, 3]])
def test_speculative_choice_keeps_the_target_distribution(candidates) -> None:
    probs = torch.tensor([0.3, 0.05, 0.4, 0.15, 0.1, 0.0])  # token 5 impossible
    generator = torch.Generator().manual_seed(7)
    draws = 10_000
    observed = [0] * 6
    for _ in range(draws):
        _, token = speculative_choice(probs, candidates, generator)
        observed[token] += 1
    assert observed[5] == 0
    statistic = chi_square(observed, probs.tolist())
    assert statistic < CHI2_999[4], (observed, statistic)


def test_speculative_sampling_over_a_tree_keeps_the_joint_distribution() -> None:
    """Two emitted tokens: P(a, b) must be p_root(a) * p_after_a(b) whatever the draft.

    Tree: root -> 2 -> 0, root -> 0. When the first token is not a drafted child the step ends
    after one token; the joint is checked over the steps whose first token is 2 (then the
    second token comes from node "2"'s distribution, drafted child 0 or the residual).
    """
    p_root = [0.2, 0.1, 0.5, 0.2]
    p_after_2 = [0.25, 0.25, 0.4, 0.1]
    rows = [p_root, p_after_2, [0.25] * 4, [0.7, 0.1, 0.1, 0.1]]  # nodes: root, 2, 2->0, 0
    logits = torch.log(torch.tensor(rows))
    tree = tree_of([2, 0, 0], [-1, 0, -1])
    generator = torch.Generator().manual_seed(11)
    first = [0] * 4
    second_after_2 = [0] * 4
    for _ in range(10_000):
        verdict = verify_sampling(logits, tree, SamplingParams(temperature=1.0), generator)
        first[verdict.tokens[0]] += 1
        if verdict.tokens[0] == 2:
            second_after_2[verdict.tokens[1]] += 1
        # a drafted first token always yields a further token; a non-drafted one never does
        assert (len(verdict.tokens) > 1) == (verdict.tokens[0] in (0, 2))
    assert chi_square(first, p_root) < CHI2_999[3], first
    assert chi_square(second_after_2, p_after_2) < CHI2_999[3], second_after_2


def test_sampling_is_reproducible_per_seed() -> None:
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    tree = tree_of([1, 2], [-1, 0])
    runs = [
        [
            verify_sampling(logits, tree, SamplingParams(), torch.Generator().manual_seed(s)).tokens
            for _ in range(2)
        ]
        for s in (1, 1)
    ]
    assert runs[0] == runs[1]


def test_a_certain_draft_is_always_accepted() -> None:
    probs = torch.tensor([0.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    assert all(speculative_choice(probs, [1], generator) == (0, 1) for _ in range(100))
    assert all(speculative_choice(probs, [0, 2], generator) == (None, 1) for _ in range(100))
    assert math.isclose(float(target_probs(torch.tensor([[0.0, 9.0]]), SamplingParams(0.5)).sum()), 1.0)
