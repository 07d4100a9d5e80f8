"""bench-draft-replay: strict acceptance replayed exactly from recorded outputs, time from the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from bench import draft_replay
from bench.draft_replay import Adaptive, Case, FixedBudget, NoDrafting, accepted_path, fit_weights, replay
from common.drafting.confidence import FEATURES, ConfidenceSettings
from common.drafting.cost_model import linear_cost_model
from common.drafting.draft_tree import DraftTree
from common.drafting.trie import TokenTrie, TrieSettings

COST = linear_cost_model(1e-3, 1e-4)


def test_accepted_path_is_the_longest_branch_spelling_the_continuation() -> None:
    # root -> 3 -> 4 -> 6 ; root -> 3 -> 5 ; root -> 7
    tree = DraftTree(tokens=[3, 4, 6, 5, 7], parents=[-1, 0, 1, 0, -1], scores=[1.0] * 5)
    assert accepted_path(tree, [3, 5, 9]) == [0, 3]
    assert accepted_path(tree, [3, 4, 6, 1]) == [0, 1, 2]
    assert accepted_path(tree, [8]) == []
    assert accepted_path(DraftTree(), [3]) == []


def cases() -> list[Case]:
    pool = TokenTrie(TrieSettings(ngram_length=8))
    text = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    for _ in range(3):
        pool.insert(text)
    pool.insert([5, 6, 20, 21])
    # The "greedy outputs": mostly the pool's text, then something it never saw.
    return [
        Case([1, 2, 5, 6], [7, 8, 9, 10, 11, 12, 30, 31, 32], pool),
        Case([3, 5, 6], [20, 21, 40, 41], pool),
    ]


def test_replay_counts_exact_strict_steps_and_models_their_time() -> None:
    greedy = replay(NoDrafting(), cases(), COST, 96)
    assert (greedy.tokens, greedy.steps) == (13, 13)
    fixed = replay(FixedBudget(8, 6), cases(), COST, 96)
    assert fixed.tokens == 13 and fixed.steps < greedy.steps
    assert fixed.modelled_s > COST.predict(1) * fixed.steps  # wider steps cost more than a 1-token step
    trim = replay(FixedBudget(8, 6, "trim"), cases(), COST, 96)
    assert (
        trim.steps == fixed.steps and trim.drafted < fixed.drafted
    )  # same acceptance, only what is accepted
    skip = replay(FixedBudget(8, 6, "skip"), cases(), COST, 96)
    assert skip.steps == fixed.steps and trim.drafted <= skip.drafted <= fixed.drafted
    adaptive = replay(Adaptive(COST, ConfidenceSettings(), 16, 6), cases(), COST, 96)
    assert adaptive.tokens == 13 and adaptive.steps < greedy.steps


def test_room_bounds_the_draft_depth() -> None:
    short = replay(FixedBudget(8, 6), cases(), COST, 4)  # 4 new tokens at most: depth <= 3 per step
    assert short.tokens == 13  # the replay follows the recorded outputs; room only caps the drafts
    assert short.drafted <= replay(FixedBudget(8, 6), cases(), COST, 96).drafted


def test_fit_recovers_logistic_weights() -> None:
    rng = np.random.default_rng(0)
    features = np.column_stack([np.ones(4000), rng.normal(size=4000), rng.integers(0, 2, 4000)])
    truth = np.array([-0.5, 1.5, 0.8])
    outcome = (rng.random(4000) < 1 / (1 + np.exp(-(features @ truth)))).astype(float)
    assert fit_weights(features, outcome) == pytest.approx(truth, abs=0.2)
    assert draft_replay.log_loss(np.full(4, 0.5), np.array([0, 1, 0, 1.0])) == pytest.approx(np.log(2))


def test_tested_nodes_are_the_children_of_the_root_and_of_accepted_nodes() -> None:
    nodes = draft_replay.tested_nodes(cases(), ConfidenceSettings(), 96)
    count = len(nodes["accepted"])
    assert nodes["features"].shape == (count, len(FEATURES)) and len(nodes["base"]) == len(nodes["conditional"]) == count
    support = nodes["features"][:, FEATURES.index("context_support")]
    assert ((0 <= support) & (support <= 1)).all() and support.max() > 0  # the tested nodes carry their support
    assert 0 < nodes["accepted"].sum() < count  # some drafts right, some wrong
    assert ((0 < nodes["base"]) & (nodes["base"] < 1)).all()
    scores = draft_replay.confidence_scores(nodes)
    assert scores["nodes"] == count and scores["observed_acceptance"] == pytest.approx(
        nodes["accepted"].mean()
    )


def test_another_shape_prices_the_steps_with_its_own_profile() -> None:
    import argparse

    args = argparse.Namespace(
        cost_config="tiny", cost_device="cpu", cost_dtype="float32", profile_seconds=2.0
    )
    cost_model = draft_replay.replay_cost_model(None, args)
    assert cost_model.model_id == "random-tiny"
    assert cost_model.predict(65, 1, 512) > cost_model.predict(1, 1, 512) > 0


def test_the_suffix_decoding_peer_drafts_served_answers_into_the_same_replay() -> None:
    # arctic-inference has no CPU wheel on the registry, so this runs only where it was built
    # (`make suffix-peer`); CI leaves it out and the bench says so.
    from bench import suffix_peer

    missing = suffix_peer.available()
    if missing is not None:
        assert missing  # the reason the bench prints
        pytest.skip(f"arctic-inference not installed: {missing}")
    served = [[7, 8, 9, 10, 11, 12, 30, 31, 32], [20, 21, 40, 41]]  # the held-out answers seen before
    peer = replay(suffix_peer.SuffixDecodingPolicy(served, max_tokens=8), cases(), COST, 96)
    greedy = replay(NoDrafting(), cases(), COST, 96)
    assert peer.tokens == greedy.tokens and peer.steps < greedy.steps
    unseeded = replay(suffix_peer.SuffixDecodingPolicy([], max_tokens=8), cases(), COST, 96)
    assert unseeded.steps > peer.steps  # the prompt alone drafts less: the served answers are used


def test_retrieval_ceiling_drafts_exactly_what_is_stored_and_bounds_the_policies() -> None:
    from bench.draft_replay import RetrievalCeiling

    # Case 1's pool holds 7..12 after "5 6" (key 2) and 20, 21 too; 30.. is stored nowhere.
    ceiling = replay(RetrievalCeiling(2, 6), cases(), COST, 96)
    assert ceiling.tokens == 13 and ceiling.drafted == 6 + 2  # 7..12 in one step, then 20 21
    fixed = replay(FixedBudget(8, 6), cases(), COST, 96)
    assert ceiling.steps <= fixed.steps and ceiling.modelled_s < fixed.modelled_s
    # Key >= 3 finds nothing after "2 5 6" / "3 5 6" but the prompts' own text in the overlay.
    assert replay(RetrievalCeiling(3, 6), cases(), COST, 96).drafted < ceiling.drafted


def test_replay_tallies_by_task_add_up_to_the_totals() -> None:
    tagged = [Case(c.prompt, c.reference, c.pool, task) for c, task in zip(cases(), ("a", "b"))]
    greedy = replay(NoDrafting(), tagged, COST, 96)
    fixed = replay(FixedBudget(8, 6), tagged, COST, 96)
    assert set(fixed.by_task) == {"a", "b"}
    assert sum(t.tokens for t in fixed.by_task.values()) == fixed.tokens
    assert sum(t.steps for t in fixed.by_task.values()) == fixed.steps
    summary = fixed.summary(greedy)
    assert summary["by_task"]["a"]["tokens_per_step"] == pytest.approx(9 / fixed.by_task["a"].steps)
    assert summary["by_task"]["a"]["speedup_vs_greedy"] > 1.0  # case a copies 6 tokens from the pool


def test_each_case_drafts_from_its_pool_key_over_its_task_pool_as_served() -> None:
    import doctest
    from types import SimpleNamespace

    from bench.draft_replay import tier_cases
    from common.drafting.pools import PoolRegistry, TieredPool
    from common.drafting.trie import TrieSettings

    assert doctest.testmod(draft_replay).failed == 0  # tier_cases' worked example

    pools = PoolRegistry(TrieSettings(ngram_length=4))
    pools.get_or_create("a/x").insert([5, 6, 50, 51])
    pools.get_or_create("task/rec").insert([5, 6, 60, 61, 62])
    pools.get_or_create("task/summary").insert([5, 6, 70, 71])
    prompts = [SimpleNamespace(pool_key="a/x", task="rec"), SimpleNamespace(pool_key="a/x", task="rec"),
               SimpleNamespace(pool_key="a/x", task="other")]
    recorded = [Case([5, 6], [60, 61, 62], pools.resolve("a/x"), p.task) for p in prompts]
    before = pools.resolve("a/x").to_bytes()
    tiered = tier_cases(recorded, pools, prompts, 1.0)
    assert isinstance(tiered[0].pool, TieredPool) and tiered[0].pool is tiered[1].pool  # one per (key, task)
    assert tiered[2].pool is pools.resolve("a/x")  # a task without a pool: the pool key's alone
    assert pools.resolve("a/x").to_bytes() == before  # the pools themselves are untouched
    # The task's own pool is read; another task's is not.
    assert tiered[0].pool.stored_depth([5, 6], [60, 61]) == 2
    assert tiered[0].pool.stored_depth([5, 6], [70, 71]) == 0
    greedy = replay(NoDrafting(), tiered[:1], COST, 96)
    drafted = replay(FixedBudget(4, 2), tiered[:1], COST, 96)
    assert drafted.steps < greedy.steps  # the task pool's continuation is drafted and accepted
    assert replay(FixedBudget(4, 2), recorded[:1], COST, 96).steps == greedy.steps  # the key's alone: not
