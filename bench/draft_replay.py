"""make bench-draft-replay: drafting policies replayed on recorded greedy outputs (exact acceptance, modelled time).

In strict mode a step accepts exactly the longest tree path that spells the greedy continuation.
With each prompt's greedy output recorded once, any drafting policy's steps (and how many tokens
each accepts) therefore replay without the model. A step's time is modelled: the step-cost model
profiled at the start of the run on this machine (tree inputs, forward, verification, KV crop at
the step's tree width and cache length; services/decoder/cost_profile.py) plus the drafting and
overlay-update work, which the replay runs for real and times. Dozens of budgets and confidence
models compare in minutes; bench-decode measures the real thing (and says how close this is).

On held-out prompts, single request:
  fixed       strict at fixed (decoding_length, branch_length) budgets
  adaptive    common/drafting/budget.py with frequency-only confidence (no feature weights) and
              with the feature model's default weights (and, with --fit, the weights fitted now)
  ceilings    for the best fixed budget: "skip" drafts nothing on steps where nothing would be
              accepted; "trim" drafts only the branch that will be accepted (what perfect
              confidence could do with the same candidates)
  peer        SuffixDecoding's suffix trees (arctic-inference, bench/suffix_peer.py) seeded with
              the same served answers, drafting into the same verification: a chain of up to 24
              (vLLM's defaults) and its tree drafts of 16 and 24; left out, saying why, when the
              package is not installed
  task pool   every request drafts, as in serving, from its pool key's pool over its task's
              (the task's served answers of every pool key; --task-pool-weight, 0 = the pool
              key's alone); --task-pool-weights replays adaptive, the best fixed budget and the
              key >= 2 ceiling again at other weights
It also scores the confidence estimates on every node a step put to the test (children of the
root and of accepted nodes): log-loss and mean predicted against observed acceptance.

--fit fits the feature model's weights (common/drafting/confidence.py FEATURES) on warm-split
prompts the pools have not served - never on the held-out ones scored here.

--cost-config qwen2-0.5b (or tinyllama-1.1b; bench/projection.py's shapes) prices the steps with
the cost profile of a random-weight model of that shape instead of the default model: the
default model's acceptance traces under a realistic model's cost curve, a PROJECTION (labelled
so), and with --cost-device cuda --cost-dtype bfloat16 the GPU variant of this issue's question.
Writes bench/results/draft_replay.json (draft_replay-<config>[-<device>].json for another cost model).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from bench import suffix_peer
from bench.common import (
    RESULTS_DIR,
    add_model_arguments,
    bench_parser,
    load_model_and_workload,
    prompt_token_ids,
    quick_run,
    resolve_model_arguments,
    results_table,
    write_results,
)
from bench.decode import (
    engine_generate,
    parse_grid,
    pick_prompts,
    serve_into_pools,
    served_answers,
    warm_pools,
    warm_segments,
)
from common.drafting.budget import AdaptiveDrafting
from common.drafting.confidence import (
    FEATURES,
    ConfidenceSettings,
    ConfidentDrafter,
    node_features,
    pool_calibration,
    request_calibration,
)
from common.drafting.cost_model import StepCostModel
from common.drafting.draft_tree import ROOT_PARENT, DraftTree
from common.drafting.pools import DEFAULT_TASK_POOL_WEIGHT, DraftSettings, RequestDrafter
from common.drafting.trie import TokenTrie
from common.machine import device_name
from common.workload.prompts import round_robin
from services.decoder.cost_profile import profile_cost_model
from services.decoder.engine import DecodingEngine, EngineSettings, GenerationConfig

KEY_LENGTH = EngineSettings().key_length
CANDIDATES = (32, 16)  # candidate tree (tokens, depth) scored for the confidence figures and the fit


@dataclass(slots=True, frozen=True)
class Case:
    """One prompt, its recorded greedy output and the pool it drafts from."""

    prompt: list[int]
    reference: list[int]
    pool: TokenTrie
    task: str = ""


@dataclass(slots=True)
class Replayed:
    tokens: int = 0
    steps: int = 0
    modelled_s: float = 0.0  # priced steps + host work
    drafted: int = 0
    host_s: float = 0.0  # drafting + overlay updates, measured
    by_task: dict[str, Replayed] = field(default_factory=dict)  # the same tallies per prompt task

    @property
    def rate(self) -> float:
        return self.tokens / self.modelled_s if self.modelled_s else 0.0

    def add(self, tokens: int, steps: int, modelled_s: float, drafted: int, host_s: float) -> None:
        self.tokens += tokens
        self.steps += steps
        self.modelled_s += modelled_s
        self.drafted += drafted
        self.host_s += host_s

    def summary(self, greedy: Replayed | None = None) -> dict:
        """Totals, x `greedy`'s rate (the no-drafting replay of the same cases) overall and by task."""
        out = {
            "tokens": self.tokens,
            "steps": self.steps,
            "tokens_per_step": self.tokens / max(self.steps, 1),
            "modelled_tokens_per_s": self.rate,
            "mean_drafted": self.drafted / max(self.steps, 1),
            "host_ms_per_step": 1e3 * self.host_s / max(self.steps, 1),
        }
        if greedy is not None and greedy.rate:
            out["speedup_vs_greedy"] = self.rate / greedy.rate
        if len(self.by_task) > 1 or greedy is not None:
            out["by_task"] = {
                task: {"tokens_per_step": t.tokens / max(t.steps, 1),
                       **({"speedup_vs_greedy": t.rate / greedy.by_task[task].rate}
                          if greedy is not None and task in greedy.by_task and greedy.by_task[task].rate else {})}
                for task, t in sorted(self.by_task.items())
            }
        return out


def accepted_path(tree: DraftTree, continuation: Sequence[int]) -> list[int]:
    """Node indices of the longest tree path spelling a prefix of `continuation` (strict mode's verdict)."""
    children: dict[int, dict[int, int]] = {}
    for index, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        children.setdefault(parent, {})[token] = index
    node, path = ROOT_PARENT, []
    for token in continuation:
        node = children.get(node, {}).get(token, -2)
        if node == -2:
            break
        path.append(node)
    return path


def request_drafter(case: Case, branch_length: int) -> RequestDrafter:
    """The engine's drafter for this request (engine.py `_new_request`)."""
    return RequestDrafter(
        case.pool, case.prompt, DraftSettings(key_length=KEY_LENGTH), ngram_length=KEY_LENGTH + branch_length
    )


class Policy:
    """How a replayed request drafts: start() per request, draft() per step, observe() its tokens,
    finish() once it is done."""

    def start(self, case: Case) -> object: ...

    def draft(self, state, case: Case, context: list[int], room: int) -> DraftTree: ...

    def observe(self, state, emitted: list[int]) -> None: ...

    def finish(self, state) -> None: ...


class NoDrafting(Policy):
    def draft(self, state, case, context, room):
        return DraftTree()


class FixedBudget(Policy):
    """A fixed (decoding_length, branch_length); `ceiling` "skip" or "trim" peeks at the reference."""

    def __init__(self, decoding_length: int, branch_length: int, ceiling: str | None = None) -> None:
        self.decoding_length, self.branch_length, self.ceiling = decoding_length, branch_length, ceiling

    def start(self, case):
        return request_drafter(case, self.branch_length)

    def draft(self, state, case, context, room):
        tree = state.draft(context, self.decoding_length, min(self.branch_length, room - 1))
        if self.ceiling is None:
            return tree
        path = accepted_path(tree, case.reference[len(context) - len(case.prompt) :])
        if self.ceiling == "skip":
            return tree if path else DraftTree()
        return DraftTree(
            tokens=[tree.tokens[i] for i in path],
            parents=list(range(-1, len(path) - 1)),
            scores=[tree.scores[i] for i in path],
        )

    def observe(self, state, emitted):
        state.observe(emitted)


class RetrievalCeiling(Policy):
    """Perfect choice among what the request's drafter holds: each step drafts, as a chain, the
    deepest prefix of the recorded continuation stored after any context suffix of at least
    `min_key` tokens, in the request's overlay or its pool (TokenTrie.stored_depth), and nothing
    where none is. It peeks at the reference, so it bounds any drafter retrieving from these
    tries with keys that long: what better scoring or budgeting could reach without new sources."""

    def __init__(self, min_key: int, max_depth: int) -> None:
        self.min_key, self.max_depth = min_key, max_depth

    def start(self, case):
        return request_drafter(case, self.max_depth)

    def draft(self, state, case, context, room):
        continuation = case.reference[len(context) - len(case.prompt) :]
        depth = min(self.max_depth, room - 1)
        stored = max(trie.stored_depth(context, continuation, min_key=self.min_key, max_depth=depth)
                     for trie in (state.overlay, case.pool))
        return DraftTree(tokens=continuation[:stored], parents=list(range(-1, stored - 1)), scores=[1.0] * stored)

    def observe(self, state, emitted):
        state.observe(emitted)


class Adaptive(Policy):
    """The engine's adaptive drafting for one row (common/drafting/budget.py)."""

    def __init__(
        self, cost_model: StepCostModel, settings: ConfidenceSettings, max_tokens: int, max_depth: int
    ) -> None:
        self.drafting = AdaptiveDrafting(cost_model, settings, clock=time.perf_counter)
        self.max_tokens, self.max_depth = max_tokens, max_depth

    def start(self, case):
        return self.drafting.wrap(request_drafter(case, self.max_depth), case.pool)

    def draft(self, state, case, context, room):
        row = (state, context, self.max_tokens, min(self.max_depth, room - 1))
        return self.drafting.draft_rows([row], len(context) - 1, None)[0]

    def observe(self, state, emitted):
        state.observe(emitted)


def replay(policy: Policy, cases: Sequence[Case], cost_model: StepCostModel, max_new_tokens: int) -> Replayed:
    result = Replayed()
    for case in cases:
        state = policy.start(case)
        done = steps = drafted = 0
        host_s = priced_s = 0.0
        while done < len(case.reference):
            context = case.prompt + case.reference[:done]
            started = time.perf_counter()
            tree = policy.draft(state, case, context, max_new_tokens - done)
            accepted = len(accepted_path(tree, case.reference[done:]))
            emitted = case.reference[done : done + accepted + 1]
            policy.observe(state, emitted)
            host_s += time.perf_counter() - started
            priced_s += cost_model.predict(1 + len(tree), 1, len(context) - 1)
            steps += 1
            drafted += len(tree)
            done += len(emitted)
        policy.finish(state)
        tally = (done, steps, priced_s + host_s, drafted, host_s)
        result.add(*tally)
        result.by_task.setdefault(case.task, Replayed()).add(*tally)
    return result


def tested_nodes(
    cases: Sequence[Case], settings: ConfidenceSettings, max_new_tokens: int
) -> dict[str, np.ndarray]:
    """Every node a step puts to the test (children of the root and of accepted nodes) when each
    step verifies the whole CANDIDATES tree: its features, its estimates before and after the
    online calibration (which learns from these very outcomes, as in serving), and the outcome."""
    features, base, conditional, accepted = [], [], [], []
    pool_calibrations: dict[int, object] = {}
    for case in cases:
        shared = pool_calibrations.setdefault(id(case.pool), pool_calibration(settings))
        drafter = ConfidentDrafter(
            request_drafter(case, CANDIDATES[1]), request_calibration(shared, settings), settings
        )
        done = 0
        while done < len(case.reference):
            context = case.prompt + case.reference[:done]
            found = drafter.scored(context, CANDIDATES[0], min(CANDIDATES[1], max_new_tokens - done - 1))
            tree = found.tree
            path = accepted_path(tree, case.reference[done:])
            if len(tree):
                tested_parents = {ROOT_PARENT, *path}
                chosen = [i for i, parent in enumerate(tree.parents) if parent in tested_parents]
                rows = node_features(tree, found.raw, found.from_overlay, found.support)[chosen]
                features.append(rows)
                base += [found.base[i] for i in chosen]
                conditional += [found.conditional[i] for i in chosen]
                on_path = set(path)
                accepted += [i in on_path for i in chosen]
            drafter.commit(tree, found.base)
            emitted = case.reference[done : done + len(path) + 1]
            drafter.observe(emitted)
            done += len(emitted)
    return {
        "features": np.concatenate(features) if features else np.zeros((0, len(FEATURES))),
        "base": np.array(base),
        "conditional": np.array(conditional),
        "accepted": np.array(accepted, float),
    }


def log_loss(predicted: np.ndarray, outcome: np.ndarray) -> float:
    p = np.clip(predicted, 1e-4, 1 - 1e-4)
    return float(-np.mean(outcome * np.log(p) + (1 - outcome) * np.log(1 - p)))


def fit_weights(
    features: np.ndarray, outcome: np.ndarray, ridge: float = 1e-2, iterations: int = 50
) -> np.ndarray:
    """Logistic regression by Newton's method with a small ridge (a few thousand rows, 5 features)."""
    weights = np.zeros(features.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-features @ weights))
        gradient = features.T @ (p - outcome) + ridge * weights
        hessian = (features * (p * (1 - p))[:, None]).T @ features + ridge * np.eye(len(weights))
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return weights


def confidence_scores(nodes: dict[str, np.ndarray]) -> dict:
    outcome = nodes["accepted"]
    return {
        "nodes": len(outcome),
        "observed_acceptance": float(outcome.mean()) if len(outcome) else 0.0,
        "before_calibration": {
            "log_loss": log_loss(nodes["base"], outcome),
            "mean_predicted": float(nodes["base"].mean()),
        },
        "after_calibration": {
            "log_loss": log_loss(nodes["conditional"], outcome),
            "mean_predicted": float(nodes["conditional"].mean()),
        },
    }


def tier_cases(cases: Sequence[Case], pools, prompts, task_pool_weight: float) -> list[Case]:
    """The same cases, each drafting from what serving gives its request: its pool key's pool
    over its task's (common.drafting.pools.TieredPool, the task's candidates weighted
    `task_pool_weight`; 0: the pool key's alone). One pool object per (pool key, task), so the
    calibration that follows a pool is shared as in serving.

    >>> from types import SimpleNamespace
    >>> from common.drafting.pools import PoolRegistry
    >>> from common.drafting.trie import TrieSettings
    >>> pools = PoolRegistry(TrieSettings(ngram_length=4))
    >>> pools.get_or_create("a/x").insert([1, 2, 3]); pools.get_or_create("task/rec").insert([1, 2, 9])
    >>> prompt = SimpleNamespace(pool_key="a/x", task="rec")
    >>> [case] = tier_cases([Case([1], [2, 9], pools.resolve("a/x"), "rec")], pools, [prompt], 1.0)
    >>> case.pool.stored_depth([1], [2, 9]), pools.resolve("a/x").stored_depth([1], [2, 9])
    (2, 1)
    >>> tier_cases([case], pools, [prompt], 0.0)[0].pool is pools.resolve("a/x")
    True
    """
    made: dict[tuple[str, str], object] = {}
    out = []
    for case, prompt in zip(cases, prompts, strict=True):
        key = (prompt.pool_key, prompt.task)
        if key not in made:
            made[key] = pools.drafting_pool(prompt.pool_key, prompt.task, task_pool_weight)
        out.append(replace(case, pool=made[key]))
    return out


def record_cases(engine: DecodingEngine, pools, prompts, tokenizer, max_new_tokens: int) -> list[Case]:
    """Greedy outputs via the engine's strict mode (token-identical to greedy: bench-decode and
    the property tests check that), which is several times faster than generate()."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    cases = []
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt)
        pool = pools.resolve(prompt.pool_key)
        cases.append(Case(ids, engine_generate(engine, ids, config, pool).tokens, pool, prompt.task))
    return cases


def unserved_warm_prompts(prompts, served_per_segment: int, count: int) -> list:
    """Warm-split prompts past the ones serve_into_pools answered, spread over segments."""
    by_segment = warm_segments(prompts)
    return round_robin([by_segment[key][served_per_segment:] for key in sorted(by_segment)], count)


def run(args) -> dict:
    loaded, prompts, warmups = load_model_and_workload(args)
    grid = parse_grid(args.budget_grid)
    deepest = max([CANDIDATES[1], args.adaptive_max_depth] + [bl for _, bl in grid])
    engine = DecodingEngine(loaded.model, EngineSettings(decoding_length=16, branch_length=8))
    pools = warm_pools(loaded, warmups, engine.settings, deepest)
    served = serve_into_pools(loaded, pools, prompts, args.served_per_segment, args.max_new_tokens, data_dir=args.data_dir)
    chosen = pick_prompts(prompts, args.prompts)
    recorded = record_cases(engine, pools, chosen, loaded.tokenizer, args.max_new_tokens)
    cases = tier_cases(recorded, pools, chosen, args.task_pool_weight)
    cost_model = replay_cost_model(loaded, args)
    default = ConfidenceSettings()
    confidence = {
        "frequency only": replace(default, weights=None),
        "feature model (default weights)": default,
    }
    fit = {}
    if args.fit:
        fit_prompts = unserved_warm_prompts(prompts, args.served_per_segment, args.fit_prompts)
        fit_cases = tier_cases(
            record_cases(engine, pools, fit_prompts, loaded.tokenizer, args.max_new_tokens),
            pools, fit_prompts, args.task_pool_weight,
        )
        nodes = tested_nodes(fit_cases, replace(default, weights=None), args.max_new_tokens)
        weights = fit_weights(nodes["features"], nodes["accepted"])
        fit = {
            "prompts": len(fit_cases),
            "nodes": len(nodes["accepted"]),
            "weights": dict(zip(FEATURES, map(float, weights))),
            "settings_line": "DEFAULT_WEIGHTS = (" + ", ".join(f"{w:.2f}" for w in weights) + ")",
        }
        confidence["feature model (fitted now)"] = replace(
            default, weights=tuple(round(float(w), 2) for w in weights)
        )
    scores = {
        name: confidence_scores(tested_nodes(cases, settings, args.max_new_tokens))
        for name, settings in confidence.items()
    }

    results: dict[str, dict] = {}
    greedy = replay(NoDrafting(), cases, cost_model, args.max_new_tokens)
    results["greedy (no drafting)"] = greedy.summary(greedy)
    from tqdm import tqdm

    policies: list[tuple[str, Policy]] = [(f"fixed {dl}x{bl}", FixedBudget(dl, bl)) for dl, bl in grid]
    policies += [
        (
            f"adaptive, {name}",
            Adaptive(cost_model, settings, args.adaptive_max_tokens, args.adaptive_max_depth),
        )
        for name, settings in confidence.items()
    ]
    peer_missing = suffix_peer.available()
    if peer_missing is None:
        peer_seed = [a.token_ids for a in served_answers(loaded, prompts, args)]
        policies += [(f"peer: SuffixDecoding {'tree' if tree else 'chain'} {tokens}",
                      suffix_peer.SuffixDecodingPolicy(peer_seed, max_tokens=tokens, tree=tree))
                     for tokens, tree in ((24, False), (16, True), (24, True))]
    else:
        print(f"SuffixDecoding peer left out: arctic-inference does not import ({peer_missing}); "
              f"{suffix_peer.INSTALL_HINT}")
    for label, policy in tqdm(policies, desc="replaying policies", unit="policy"):
        results[label] = replay(policy, cases, cost_model, args.max_new_tokens).summary(greedy)
    best_fixed = max(
        (k for k in results if k.startswith("fixed")), key=lambda k: results[k]["modelled_tokens_per_s"]
    )
    dl, bl = (int(v) for v in best_fixed.split()[1].split("x"))
    for ceiling in ("skip", "trim"):
        results[f"ceiling: {best_fixed}, {ceiling}"] = replay(
            FixedBudget(dl, bl, ceiling), cases, cost_model, args.max_new_tokens
        ).summary(greedy)
    # Beyond the best fixed budget's candidates: what perfect scoring could take from all the
    # tries hold, with the engine's key length as the shortest key and with any key.
    for min_key in sorted({KEY_LENGTH, 1}, reverse=True):
        results[f"ceiling: stored continuations, key >= {min_key}"] = replay(
            RetrievalCeiling(min_key, args.adaptive_max_depth), cases, cost_model, args.max_new_tokens
        ).summary(greedy)
    for weight in args.task_pool_weights:
        weighted = tier_cases(recorded, pools, chosen, weight)
        for label, policy in (
            ("adaptive", Adaptive(cost_model, default, args.adaptive_max_tokens, args.adaptive_max_depth)),
            (best_fixed, FixedBudget(dl, bl)),
            (f"ceiling: stored continuations, key >= {KEY_LENGTH}", RetrievalCeiling(KEY_LENGTH, args.adaptive_max_depth)),
        ):
            results[f"{label}, task pool weight {weight:g}"] = replay(
                policy, weighted, cost_model, args.max_new_tokens).summary(greedy)
    for summary in results.values():
        summary["vs_best_fixed"] = (
            summary["modelled_tokens_per_s"] / results[best_fixed]["modelled_tokens_per_s"]
        )
    projected = args.cost_config != "default"
    kind = "replay (exact acceptance, modelled time)"
    if projected:
        kind = (
            f"PROJECTION: acceptance replayed from the default model, step cost of a random-weight "
            f"{args.cost_config} ({args.cost_dtype}, {args.cost_device})"
        )
    report = {
        "device": device_name(),
        "model": loaded.model_id,
        "kind": kind,
        "cost_model_device": cost_model.device,
        "cost_config": args.cost_config,
        "greedy_step_ms_at_512": cost_model.predict(1, 1, 512) * 1e3,
        "prompts": len(cases),
        "tokens": greedy.tokens,
        "max_new_tokens": args.max_new_tokens,
        "served": served,
        "task_pool_weight": args.task_pool_weight,
        "suffix_decoding_peer": "replayed" if peer_missing is None else f"left out: {peer_missing}",
        "best_fixed": best_fixed,
        "adaptive_max_tokens": args.adaptive_max_tokens,
        "adaptive_max_depth": args.adaptive_max_depth,
        "policies": results,
        "confidence": scores,
        "fit": fit,
        "feature_names": list(FEATURES),
        "default_weights": list(default.weights or ()),
    }
    print_tables(Console(width=140), report)
    name = (
        "draft_replay"
        + (f"-{args.cost_config}" if projected else "")
        + (f"-{args.cost_device}" if args.cost_device != "cpu" else "")
    )
    path = write_results(f"{name}.json", report, args.results_dir, model_path=args.model_path)
    print(f"wrote {path}")
    return report


REPLAY_WIDTHS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 65)


def replay_cost_model(loaded, args) -> StepCostModel:
    """The step-cost profile the replay prices steps with: the default model's own, or a
    random-weight model of a public checkpoint's shape (bench/projection.py) on --cost-device."""
    if args.cost_config == "default":
        return profile_cost_model(
            loaded.model,
            loaded.model_id,
            max_seconds=args.profile_seconds,
            batches=(1,),
            widths=REPLAY_WIDTHS,
        )
    from bench.projection import random_model

    model = random_model(args.cost_config, args.cost_device, getattr(torch, args.cost_dtype))
    cost_model = profile_cost_model(
        model,
        f"random-{args.cost_config}",
        max_seconds=args.profile_seconds,
        batches=(1,),
        widths=REPLAY_WIDTHS,
        repeats=2,
    )
    del model
    return cost_model


def print_tables(console: Console, report: dict) -> None:
    title = "REPLAY (exact strict acceptance, modelled step time)"
    if report["cost_config"] != "default":
        title = f"PROJECTION (default model's acceptance, {report['cost_config']} step cost, {report['cost_model_device']})"
    table = results_table(
        f"{title}: {report['prompts']} held-out prompts, {report['tokens']} tokens, "
        f"greedy step {report['greedy_step_ms_at_512']:.1f} ms at 512 cached, {report['device']}",
        ("policy", "tok/step", "drafted/step", "host ms/step", "modelled tok/s", "x greedy", "x best fixed"),
    )
    for label, s in report["policies"].items():
        table.add_row(
            label,
            f"{s['tokens_per_step']:.2f}",
            f"{s['mean_drafted']:.1f}",
            f"{s['host_ms_per_step']:.2f}",
            f"{s['modelled_tokens_per_s']:.{0 if s['modelled_tokens_per_s'] >= 100 else 1}f}",
            f"{s['speedup_vs_greedy']:.2f}",
            f"{s['vs_best_fixed']:.3f}",
        )
    console.print(table)
    tasks = sorted(report["policies"]["greedy (no drafting)"].get("by_task", {}))
    if len(tasks) > 1:
        by_task = results_table("by task: x greedy (tokens/step)", ("policy", *tasks))
        for label, s in report["policies"].items():
            by_task.add_row(label, *(f"{s['by_task'][t].get('speedup_vs_greedy', 0):.2f} "
                                     f"({s['by_task'][t]['tokens_per_step']:.2f})" for t in tasks))
        console.print(by_task)
    scores = results_table(
        "confidence on tested nodes (log-loss; mean predicted vs observed acceptance)",
        (
            "estimate",
            "nodes",
            "observed",
            "log-loss",
            "predicted",
            "log-loss, calibrated",
            "predicted, calibrated",
        ),
    )
    for name, s in report["confidence"].items():
        scores.add_row(
            name,
            str(s["nodes"]),
            f"{s['observed_acceptance']:.3f}",
            f"{s['before_calibration']['log_loss']:.4f}",
            f"{s['before_calibration']['mean_predicted']:.3f}",
            f"{s['after_calibration']['log_loss']:.4f}",
            f"{s['after_calibration']['mean_predicted']:.3f}",
        )
    console.print(scores)
    if report["fit"]:
        console.print(
            f"fitted on {report['fit']['prompts']} warm-split prompts ({report['fit']['nodes']} tested nodes): "
            f"{report['fit']['settings_line']}  (features {', '.join(report['feature_names'])})"
        )


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = bench_parser("bench.draft_replay", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=12 if quick else 48)
    parser.add_argument("--max-new-tokens", type=int, default=64 if quick else 96)
    parser.add_argument(
        "--served-per-segment",
        type=int,
        default=1 if quick else 10,
        help="served answers in the pools per (pool key, task), as bench-decode",
    )
    parser.add_argument(
        "--budget-grid",
        default="8:8,12:12,16:8,16:16,24:16"
        if quick
        else "4:4,8:4,8:8,12:8,12:12,16:8,16:12,16:16,24:12,24:16,32:16",
    )
    parser.add_argument("--adaptive-max-tokens", type=int, default=20)
    parser.add_argument("--adaptive-max-depth", type=int, default=16)
    parser.add_argument(
        "--task-pool-weight", type=float, default=DEFAULT_TASK_POOL_WEIGHT,
        help="weight of the task pool's candidates under each pool key's, as the decoder's "
             "ADACCEL_TASK_POOL_WEIGHT (0: the pool key's alone)",
    )
    parser.add_argument(
        "--task-pool-weights", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
        help="also replay adaptive, the best fixed budget and the key >= 2 ceiling at these task "
             "pool weights (e.g. 0,0.5,2)",
    )
    parser.add_argument(
        "--fit", action="store_true", help="fit the confidence feature weights on warm-split prompts"
    )
    parser.add_argument("--fit-prompts", type=int, default=24 if quick else 96)
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=6.0 if quick else 20.0,
        help="step-cost profiling time limit (a big --cost-config needs more)",
    )
    parser.add_argument(
        "--cost-config",
        default="default",
        choices=["default", "qwen2-0.5b", "tinyllama-1.1b", "tiny"],
        help="price steps with this shape's cost profile (random weights): a projection",
    )
    parser.add_argument(
        "--cost-device", default="cpu", help="device for --cost-config's profile (cuda on a GPU)"
    )
    parser.add_argument("--cost-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return resolve_model_arguments(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
