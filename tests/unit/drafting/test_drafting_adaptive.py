"""Draft confidence (acceptance per node, online calibration) and the per-step budget choice."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.drafting import confidence
from common.drafting.budget import AdaptiveDrafting, best_first_order, plan_budget, select_nodes
from common.drafting.confidence import (
    MAX_PROBABILITY,
    AcceptanceCalibration,
    ConfidenceSettings,
    ConfidentDrafter,
    calibrated,
    expected_accepted,
    path_gains,
    raw_probabilities,
    request_calibration,
)
from common.drafting.cost_model import linear_cost_model
from common.drafting.draft_tree import DraftTree
from common.drafting.pools import RequestDrafter
from common.drafting.trie import TokenTrie, TrieSettings

NO_SMOOTHING = None


def counted_trie() -> TokenTrie:
    # After key (1, 2): "3 4" 6 times, "3 5" 2 times, "7" 2 times -> count(1 2) = 10
    trie = TokenTrie(TrieSettings(ngram_length=4))
    for tail, times in (([3, 4], 6), ([3, 5], 2), ([7], 2)):
        for _ in range(times):
            trie.add_path([1, 2, *tail])
    return trie


# ---------------------------------------------------------------- confidence
def test_probabilities_are_conditional_relative_frequencies() -> None:
    trie = counted_trie()
    tree = trie.retrieve([1, 2], decoding_length=8, branch_length=2, key_length=2)
    assert tree.tokens == [3, 4, 5, 7]
    raw = raw_probabilities(tree, NO_SMOOTHING, ConfidenceSettings())
    assert raw == pytest.approx([0.8, 0.75, 0.25, 0.2])  # 8/10, 6/8, 2/8, 2/10
    assert path_gains(tree, raw) == pytest.approx([0.8, 0.6, 0.2, 0.2])
    assert expected_accepted(tree, raw) == pytest.approx(1.8)
    assert trie.key_weight([1, 2]) == 10 and trie.key_weight([9, 1]) == 10  # falls back to the key (1,)
    assert trie.key_weight([8]) == 0


def test_smoothing_trusts_counts_in_proportion_to_evidence() -> None:
    chain = DraftTree(tokens=[5, 6], parents=[-1, 0], scores=[1.0, 1.0])
    settings = ConfidenceSettings(prior=0.5, prior_weight=1.0)
    once = raw_probabilities(chain, 1.0, settings)
    often = raw_probabilities(chain, 200.0, settings)
    assert once == pytest.approx([0.75, 0.75])  # (1 * 1 + 0.5) / 2
    assert all(0.99 < p < 1.0 for p in often)


def test_calibration_moves_estimates_to_the_observed_rate() -> None:
    pool = AcceptanceCalibration(prior_weight=20.0)
    request = AcceptanceCalibration(prior_weight=8.0, parent=pool)
    assert request.scale(1) == 1.0
    rng = random.Random(0)
    for _ in range(400):  # depth-1 nodes predicted at 0.8, accepted 40% of the time
        request.record([(1, 0.8, rng.random() < 0.4)])
    assert request.scale(1) == pytest.approx(0.5, abs=0.05)
    assert pool.scale(1) == pytest.approx(0.5, abs=0.06)
    assert request.scale(2) == 1.0  # no evidence at depth 2
    fresh = AcceptanceCalibration(prior_weight=8.0, parent=pool)
    assert fresh.scale(1) == pytest.approx(pool.scale(1))  # a new request starts from its pool


def test_calibrated_siblings_never_exceed_one() -> None:
    tree = DraftTree(tokens=[1, 2, 3], parents=[-1, -1, -1], scores=[0.5, 0.3, 0.2])
    calibration = AcceptanceCalibration(prior_weight=1.0)
    calibration.record([(1, 0.1, True)] * 50)  # observed far above predicted: scale ~ 8
    probs = calibrated(tree, [0.5, 0.3, 0.2], calibration)
    assert sum(probs) == pytest.approx(MAX_PROBABILITY)
    assert probs[0] > probs[1] > probs[2]


def test_tested_outcomes_follow_the_accepted_path() -> None:
    # root -> 3 -> 4 ; root -> 3 -> 5 ; root -> 7
    tree = DraftTree(tokens=[3, 4, 5, 7], parents=[-1, 0, 0, -1], scores=[0.8, 0.6, 0.2, 0.2])
    raw = [0.8, 0.75, 0.25, 0.2]
    # emitted 3 then bonus 9: 3 and 7 tested (3 accepted), 4 and 5 tested (both rejected)
    assert confidence.tested_outcomes(tree, raw, [3, 9]) == [(1, 0.8, True), (1, 0.2, False), (2, 0.75, False),
                                                  (2, 0.25, False)]
    # emitted 3 4 + bonus: 4 accepted; 4 has no children
    assert [o[2] for o in confidence.tested_outcomes(tree, raw, [3, 4, 1])] == [True, False, True, False]
    assert [o[2] for o in confidence.tested_outcomes(tree, raw, [8])] == [False, False]


def test_confident_drafter_calibrates_from_what_the_engine_emits() -> None:
    trie = counted_trie()

    class PoolOnly:  # the pool alone (a request overlay would learn the rejections' bonus tokens)
        def draft(self, context, decoding_length, branch_length):
            return trie.retrieve(context, decoding_length=decoding_length, branch_length=branch_length)

        def observe(self, accepted_tokens):
            pass

    inner = PoolOnly()
    pool = AcceptanceCalibration(prior_weight=20.0)
    drafter = ConfidentDrafter(inner, AcceptanceCalibration(8.0, pool))
    _, _, initial = drafter.candidates([1, 2], 8, 2)
    for _ in range(30):  # the model never takes the draft
        tree, raw, gains = drafter.candidates([1, 2], 8, 2)
        drafter.commit(tree, raw)
        drafter.observe([9])
    _, _, gains_after = drafter.candidates([1, 2], 8, 2)
    assert gains_after[0] < 0.5 * initial[0]
    assert pool.scale(1) < 1.0  # the pool learned it too


# ---------------------------------------------------------------- budget choice
def brute_force_rate(gains: list[list[float]], cost: list[float], overhead: float) -> float:
    """Best rate over every per-row prefix size (no cap), exhaustively."""
    best = 0.0
    for counts in itertools.product(*[range(len(g) + 1) for g in gains]):
        width = 1 + max(counts)
        if width > len(cost):
            continue
        expected = sum(1 + sum(g[:k]) for g, k in zip(gains, counts))
        best = max(best, expected / (cost[width - 1] + overhead))
    return best


def test_flat_cost_takes_every_useful_node_and_steep_cost_takes_none() -> None:
    gains = [[0.9, 0.8, 0.5, 0.1, 0.01]]
    flat = plan_budget(gains, [1.0] * 8)
    assert flat.counts == [4]  # the 0.01 node is not worth verifying (fill_min_gain)
    steep = plan_budget(gains, [1.0 + 2.0 * w for w in range(8)])
    assert steep.counts == [0] and steep.width == 1


def test_stops_where_the_next_node_no_longer_pays() -> None:
    # cost 1 + 0.2 per draft token: the k-th node pays while gain_k > rate so far * 0.2
    gains = [[0.95, 0.9, 0.8, 0.6, 0.3, 0.15, 0.05]]
    cost = [1.0 + 0.2 * (w - 1) for w in range(1, 9)]
    plan = plan_budget(gains, cost, fill_min_gain=0.0)
    rates = [(1 + sum(gains[0][:k])) / cost[k] for k in range(8)]
    assert plan.counts == [max(range(8), key=rates.__getitem__)]
    assert plan.expected_rate == pytest.approx(max(rates))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    gains=st.lists(st.lists(st.floats(0.0, 1.0), max_size=5).map(lambda g: sorted(g, reverse=True)), min_size=1,
                   max_size=3),
    fixed=st.floats(0.5, 5.0),
    per_token=st.floats(0.0, 1.0),
    overhead=st.floats(0.0, 1.0),
)
def test_global_queue_matches_exhaustive_search_on_concave_gains(gains, fixed, per_token, overhead) -> None:
    """With linear cost in the padded width, the best-prefix of the global queue plus filling
    reaches the exhaustive optimum (within float noise)."""
    cost = [fixed + per_token * w for w in range(6)]
    plan = plan_budget(gains, cost, overhead_s=overhead, fill_min_gain=0.0)
    assert plan.expected_rate >= brute_force_rate(gains, cost, overhead) * (1 - 1e-9)
    assert all(k <= len(g) for k, g in zip(plan.counts, gains))
    assert plan.width == 1 + max(plan.counts)


def test_token_cap_is_shared_across_rows_by_gain() -> None:
    gains = [[0.9, 0.85, 0.8], [0.95, 0.3, 0.2], [0.1]]
    plan = plan_budget(gains, [1.0] * 4, max_total=4, fill_min_gain=0.0)
    assert plan.counts == [3, 1, 0]  # the 4 best nodes anywhere in the batch


def test_selection_keeps_a_tree_and_its_layout() -> None:
    # root -> 3 -> 4 -> 6 ; root -> 3 -> 5 ; root -> 7
    tree = DraftTree(tokens=[3, 4, 6, 5, 7], parents=[-1, 0, 1, 0, -1], scores=[0.8, 0.6, 0.5, 0.2, 0.2])
    gains = path_gains(tree, raw_probabilities(tree, NO_SMOOTHING, ConfidenceSettings()))
    order = best_first_order(gains)
    for count in range(len(tree) + 1):
        chosen = order[:count]
        assert all(tree.parents[i] < 0 or tree.parents[i] in chosen for i in chosen)
        subtree = select_nodes(tree, chosen)
        assert len(subtree) == count
        best_branch = [t for t, p in zip(subtree.tokens, subtree.parents)][: len(subtree)]
        assert best_branch[:1] == ([3] if count else [])
    assert select_nodes(tree, order[:3]).parents == [-1, 0, 1]  # 3 -> 4 -> 6, contiguous


class FakeClock:
    """A clock that advances `tick` seconds per reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_adaptive_drafting_sizes_trees_by_cost() -> None:
    trie = counted_trie()
    cheap = AdaptiveDrafting(linear_cost_model(5e-3, 1e-6), clock=FakeClock())
    dear = AdaptiveDrafting(linear_cost_model(1e-3, 2e-2), clock=FakeClock())
    sizes = {}
    for name, adaptive in (("cheap", cheap), ("dear", dear)):
        drafter = adaptive.wrap(RequestDrafter(trie, [1, 2]), trie)
        (tree,) = adaptive.draft_rows([(drafter, [1, 2], 8, 2)], cache_length=10, max_total=None)
        sizes[name] = len(tree)
    assert sizes["cheap"] == 4 and sizes["dear"] == 0
    assert cheap.size_counts[4] == 1 and dear.width_counts[1] == 1


def test_drafting_time_read_from_the_injected_clock_is_priced_as_a_fixed_cost() -> None:
    trie = counted_trie()
    adaptive = AdaptiveDrafting(linear_cost_model(5e-3, 1e-6), clock=FakeClock(tick=0.01))
    drafter = adaptive.wrap(RequestDrafter(trie, [1, 2]), trie)
    adaptive.draft_rows([(drafter, [1, 2], 8, 2)], cache_length=10, max_total=None)
    assert adaptive.draft_seconds == pytest.approx(0.1 * 0.01)  # running mean: one reading of 10 ms


def test_long_run_rate_drafts_less_on_hopeless_steps() -> None:
    """Against the decoder's long-run rate, a step with little to gain drafts nothing even where
    its own tokens per second would still improve with a node."""
    cost = [1.0 + 0.1 * (w - 1) for w in range(1, 9)]
    weak = [[0.15, 0.05]]
    assert plan_budget(weak, cost, fill_min_gain=0.0).counts == [1]  # 1.15 / 1.1 > 1 / 1
    assert plan_budget(weak, cost, fill_min_gain=0.0, rate=2.0).counts == [0]  # 0.15 < 2.0 * 0.1
    strong = [[0.95, 0.9, 0.85, 0.3]]
    assert plan_budget(strong, cost, fill_min_gain=0.0, rate=2.0).counts == [4]


# ---------------------------------------------------------------- feature model
def test_marked_merge_tells_which_nodes_the_marked_trees_proposed() -> None:
    from common.drafting.draft_tree import merge_drafts, merge_marked_drafts

    overlay = DraftTree(tokens=[3, 4, 9], parents=[-1, 0, -1], scores=[0.5, 0.5, 0.5])
    pool = DraftTree(tokens=[3, 5, 7], parents=[-1, 0, -1], scores=[0.9, 0.6, 0.1])
    draft, marks = merge_marked_drafts([overlay, pool], 1, 8, 4)
    assert (draft.tokens, draft.parents) == (merge_drafts([overlay, pool], 8, 4).tokens,
                                             merge_drafts([overlay, pool], 8, 4).parents)
    by_path = {tuple(draft.path_to(i)): m for i, m in enumerate(marks)}
    assert by_path == {(3,): True, (3, 5): False, (3, 4): True, (9,): True, (7,): False}
    assert merge_marked_drafts([pool], 1, 8, 4)[1] == [True] * 3  # one source: all or nothing
    assert merge_marked_drafts([overlay, pool], 0, 8, 4)[1] == [False] * 5


def test_request_drafter_marks_what_the_request_text_proposed() -> None:
    trie = counted_trie()  # the pool: after (1, 2) come 3 4 / 3 5 / 7
    drafter = RequestDrafter(trie, [1, 2, 8, 1, 2], settings=None)  # the prompt itself proposes 8 after (1, 2)
    tree, from_overlay = drafter.draft_with_origin([1, 2], 8, 2)
    assert tree.tokens == drafter.draft([1, 2], 8, 2).tokens
    marked = {tuple(tree.path_to(i)) for i, m in enumerate(from_overlay) if m}
    assert (8,) in marked and (3,) not in marked and (7,) not in marked


def test_context_support_is_the_longest_context_after_which_a_node_is_stored() -> None:
    """A pool holding two answers that share "2 3": the one the request is following token for
    token supports its continuation with the whole context; the other only with the shared key."""
    pool = TokenTrie(TrieSettings(ngram_length=6))
    pool.insert([5, 6, 1, 2, 3, 4, 4])
    pool.insert([9, 9, 9, 2, 3, 7, 7])
    context = [6, 1, 2, 3]
    drafter = RequestDrafter(pool, [0, 0], settings=None)
    tree = drafter.draft(context, 8, 2)
    support = dict(zip(map(tuple, map(tree.path_to, range(len(tree)))), drafter.context_support(context, tree)))
    # (4,) and (4, 4) after all of 6 1 2 3 (within the stored 6-grams); (7,) and (7, 7) only after 2 3
    assert support == {(4,): 4, (4, 4): 4, (7,): 2, (7, 7): 2}
    # The request's own text counts too: its prompt follows 9 2 3 -> 7, the overlay supports 7 longer.
    following = RequestDrafter(pool, [8, 9, 2, 3, 7, 0, 0], settings=None)
    longer = dict(zip(map(tuple, map(tree.path_to, range(len(tree)))), following.context_support([8, 9, 2, 3], tree)))
    assert longer[(7,)] == 4 and longer[(7, 7)] == 3  # 7 7 only the pool holds, after 9 2 3
    # A node no trie holds after any context has no support.
    assert drafter.context_support(context, DraftTree(tokens=[42], parents=[-1], scores=[1.0])) == [0]


def test_confident_drafter_scores_nodes_with_their_context_support() -> None:
    pool = TokenTrie(TrieSettings(ngram_length=6))
    pool.insert([5, 6, 1, 2, 3, 4, 4])
    pool.insert([9, 9, 9, 2, 3, 7, 7])
    weights = (0.0, 0.0, 0.0, 0.0, 0.0, 4.0)  # support alone decides
    drafter = ConfidentDrafter(RequestDrafter(pool, [0, 0], settings=None), request_calibration(None, ConfidenceSettings()),
                               ConfidenceSettings(weights=weights))
    found = drafter.scored([6, 1, 2, 3], 8, 1)
    by_token = dict(zip(found.tree.tokens, found.base))
    assert found.support is not None and by_token[4] > by_token[7]


@given(st.lists(st.tuples(st.integers(-1, 6), st.floats(0.0, 1.0)), min_size=1, max_size=12),
       st.lists(st.floats(-3, 3), min_size=6, max_size=6), st.booleans())
def test_acceptance_model_is_the_logistic_of_the_documented_features(nodes, weights, with_origin) -> None:
    import math

    parents = [min(p, i - 1) if p >= 0 else -1 for i, (p, _) in enumerate(nodes)]
    tree = DraftTree(tokens=list(range(len(nodes))), parents=parents, scores=[1.0] * len(nodes))
    raw = [p for _, p in nodes]
    origin = [i % 2 == 0 for i in range(len(nodes))] if with_origin else None
    support = [3 * i % 11 for i in range(len(nodes))] if with_origin else None
    depths = tree.depths()
    expected = []
    for i, (p, parent) in enumerate(zip(raw, parents)):
        p = min(max(p, 0.01), 0.99)
        top = parents.index(parent) == i  # siblings are laid out best first
        logit = (weights[0] + weights[1] * math.log(p / (1 - p)) + weights[2] * top
                 + weights[3] * min(depths[i], 10) / 10 + weights[4] * bool(origin and origin[i])
                 + weights[5] * (min(support[i], 8) / 8 if support else 0.0))
        expected.append(1 / (1 + math.exp(-logit)))
    settings_ = ConfidenceSettings(weights=tuple(weights))
    assert confidence.acceptance_probabilities(tree, raw, origin, settings_, support) == pytest.approx(expected)
    assert confidence.acceptance_probabilities(tree, raw, origin, ConfidenceSettings(weights=None)) == raw


def test_feature_model_ranks_the_top_child_above_what_the_prompt_alone_proposes() -> None:
    """Same frequency, the pool's top child against a later sibling only the request's text proposed:
    being the top sibling weighs more than coming from the prompt (true of every fit so far; the
    absolute levels are the fitted model's)."""
    tree = DraftTree(tokens=[3, 8], parents=[-1, -1], scores=[0.5, 0.5])
    top, from_prompt = confidence.acceptance_probabilities(tree, [0.5, 0.5], [False, True], ConfidenceSettings())
    assert top > from_prompt


def test_decoder_setting_carries_the_confidence_weights_or_none() -> None:
    from pydantic import ValidationError

    from services.decoder.settings import DecoderSettings

    assert DecoderSettings().confidence_weights == confidence.DEFAULT_WEIGHTS
    assert DecoderSettings(adaptive_confidence_weights="").confidence_weights is None
    assert DecoderSettings(adaptive_confidence_weights="1,2,3,4,-5,6").confidence_weights == (1.0, 2.0, 3.0, 4.0, -5.0, 6.0)
    for bad in ("1,2", "1,2,x,4,5,6", "1,2,3,4,5"):
        with pytest.raises(ValidationError, match="adaptive_confidence_weights"):
            DecoderSettings(adaptive_confidence_weights=bad)
