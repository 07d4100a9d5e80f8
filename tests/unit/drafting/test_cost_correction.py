"""The step-cost correction learnt from measured steps, and the drafting margin where the cost
model extrapolates: what keeps adaptive drafting from over-drafting a batch its profile never saw."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.drafting import cost_correction
from common.drafting.budget import AdaptiveDrafting, plan_budget
from common.drafting.cost_correction import StepCostCorrection
from common.drafting.cost_model import StepCostModel, StepTiming, linear_cost_model
from common.drafting.pools import RequestDrafter
from common.drafting.trie import TokenTrie, TrieSettings


def test_doctests() -> None:
    assert doctest.testmod(cost_correction).failed == 0


def test_nothing_measured_is_the_model_itself() -> None:
    correction = StepCostCorrection()
    curve = [0.05, 0.08, 0.09, 0.1]
    assert correction.apply(curve, batch=16) == curve
    assert correction.scale(4, 3) == 1.0


def test_a_correction_converges_to_the_measured_ratio_and_clips_outliers() -> None:
    correction = StepCostCorrection(prior_steps=4.0, decay=0.98)
    for _ in range(300):
        correction.record(16, 3, predicted_s=0.14, measured_s=0.26)
    # ~50 steps of memory at this decay against a 4-step prior of 1.0; 3 and 4 share a bucket
    assert correction.scale(16, 4) == pytest.approx((50 * 0.26 / 0.14 + 4) / 54, rel=0.01)
    correction.record(16, 3, predicted_s=0.14, measured_s=100.0)  # a stall: clipped to 4x
    assert correction.scale(16, 3) < 2.0
    assert correction.scale(1, 3) == 1.0  # another batch bucket learnt nothing


@given(st.lists(st.tuples(st.integers(1, 32), st.integers(1, 40), st.floats(0.01, 1.0), st.floats(0.01, 1.0)),
                max_size=30),
       st.integers(1, 32))
def test_the_corrected_curve_never_decreases_with_width(records, batch) -> None:
    correction = StepCostCorrection()
    for rows, width, predicted, measured in records:
        correction.record(rows, width, predicted, measured)
    curve = [0.05 + 0.01 * w for w in range(40)]
    corrected = correction.apply(curve, batch)
    assert all(a <= b for a, b in zip(corrected, corrected[1:]))


def test_a_margin_drops_a_marginal_draft_and_keeps_a_good_one() -> None:
    cost = [1.0 + 0.1 * (w - 1) for w in range(1, 9)]
    marginal = [[0.2]]  # 1.2 tokens for 1.1 s against 1 for 1 s: +9%
    assert plan_budget(marginal, cost, fill_min_gain=0.0).counts == [1]
    assert plan_budget(marginal, cost, fill_min_gain=0.0, draft_margin=0.15).counts == [0]
    good = [[0.9, 0.8, 0.7]]
    assert plan_budget(good, cost, fill_min_gain=0.0, draft_margin=0.15).counts == [3]


def profiled_at_one_row() -> StepCostModel:
    """Profiled at 1 row only (as a time-limited profile of a real model on a CPU ends): 10 ms a
    step plus 1 ms a token."""
    timings = [StepTiming(w, 1, c, 0.01 + 0.001 * w) for w in (1, 2, 4, 8, 16) for c in (64, 512)]
    return StepCostModel.fit(timings)


def trie_with(text: list[int], times: int) -> TokenTrie:
    trie = TokenTrie(TrieSettings(ngram_length=6))
    for _ in range(times):
        trie.insert(text)
    return trie


def test_the_margin_applies_only_where_the_cost_model_extrapolates() -> None:
    model = profiled_at_one_row()
    assert not model.extrapolates(1) and model.extrapolates(16)
    adaptive = AdaptiveDrafting(model, clock=lambda: 0.0, draft_margin=1e6)  # a margin no draft can pay
    trie = trie_with([1, 2, 3, 4, 5], 50)
    rows = [(adaptive.wrap(RequestDrafter(trie, [1, 2]), trie), [1, 2], 8, 3)]
    assert len(adaptive.draft_rows(rows, cache_length=10, max_total=None)[0]) > 0  # 1 row: profiled
    many = [(adaptive.wrap(RequestDrafter(trie, [1, 2]), trie), [1, 2], 8, 3) for _ in range(16)]
    assert all(len(tree) == 0 for tree in adaptive.draft_rows(many, cache_length=10, max_total=None))


def test_steps_that_took_longer_than_predicted_make_drafting_draft_less() -> None:
    """The engine reports each step's seconds; wide steps measured far dearer than the model
    said are then priced so, and the same candidates are no longer drafted."""
    trie = trie_with([1, 2, 3, 9], 3)
    trie.insert([1, 2, 7, 8])
    fresh = AdaptiveDrafting(linear_cost_model(0.01, 0.001), clock=lambda: 0.0, draft_margin=0.0)
    taught = AdaptiveDrafting(linear_cost_model(0.01, 0.001), clock=lambda: 0.0, draft_margin=0.0)
    for _ in range(40):  # wide steps took 3x their prediction, one-token steps what was said
        taught.correction.record(1, 1, 0.011, 0.011)
        for width in (2, 3, 4, 5):
            taught.correction.record(1, width, 0.01 + 0.001 * width, 3 * (0.01 + 0.001 * width))
    sizes = []
    for adaptive in (fresh, taught):
        drafter = adaptive.wrap(RequestDrafter(trie, [1, 2]), trie)
        sizes.append(len(adaptive.draft_rows([(drafter, [1, 2], 4, 2)], cache_length=10, max_total=None)[0]))
    assert sizes[0] > 0 and sizes[1] == 0


def test_step_finished_records_the_planned_step_against_its_uncorrected_prediction() -> None:
    model = linear_cost_model(0.01, 0.001)
    adaptive = AdaptiveDrafting(model, clock=lambda: 0.0)
    trie = trie_with([1, 2, 3, 4, 5], 50)
    drafter = adaptive.wrap(RequestDrafter(trie, [1, 2]), trie)
    (tree,) = adaptive.draft_rows([(drafter, [1, 2], 8, 3)], cache_length=10, max_total=None)
    width = 1 + len(tree)
    adaptive.step_finished(2 * model.predict(width, 1, 10))
    assert adaptive.correction.scale(1, width) > 1.0
    adaptive.step_finished(5.0)  # no step planned since: ignored
    assert adaptive.correction.scale(1, width) < 2.0
