"""make bench-decode: our decoding engine against plain greedy and prompt lookup, same run, same prompts.

Methods (each prompt runs every method, in alternating order, repeated; the CPU's speed drifts):
  greedy         transformers `generate`, greedy: what a user runs without us (the baseline)
  prompt_lookup  transformers prompt-lookup decoding (`prompt_lookup_num_tokens`)
  engine_greedy  our engine with drafting off: our loop's own overhead or gain
  strict         our engine, per-pool trie drafts + the request's overlay, lossless
  relaxed        our engine, DARE's relaxed acceptance (top-k and min probability)
  oracle         our engine fed the true greedy continuation as a chain of the same budget: the ceiling
  adaptive       strict, with each step's tree chosen by expected tokens per second (measured step
                 cost x draft confidence; common/drafting/budget.py) instead of a fixed budget

Also (same run, same prompts, interleaved with greedy prompt by prompt):
  budget sweep   strict at fixed (decoding_length, branch_length) pairs, and adaptive: which fixed
                 budget is best on this model and device, and adaptive against it (paired ratios)
  batched        4 and 16 concurrent requests through generate_batch: fixed budget vs adaptive
  step profile   where a step's time goes: drafting, inputs, forward, verification, KV, emit

Pools are warmed with the workload's warm-split texts, then (--served-per-segment) with the model's
own answers to some warm-split prompts: what a running deployment's pools hold, since decoders
publish every answer and the pool updater inserts it. Evaluation is on held-out prompts (items
and users the pools never saw); strict tokens/step is reported for both pool states.
"tokens_per_s" is end to end (prefill included, as a caller sees it); "decode_tokens_per_s"
counts what follows each call's first output, the part drafting changes.
Workload file: JSONL as documented in common/workload/export.py (type "prompt" lines with
split "heldout" are decoded, type "warmup" lines warm the pool of their pool_key).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from transformers import StoppingCriteria, StoppingCriteriaList

from bench import suffix_peer
from bench.common import (
    RESULTS_DIR,
    ItemFactChecker,
    add_model_arguments,
    bench_parser,
    figure,
    load_model_and_workload,
    prompt_token_ids,
    quick_run,
    resolve_model_arguments,
    save_figure,
    spread,
    write_results,
)
from common.drafting.cost_model import StepCostModel
from common.drafting.draft_tree import DraftTree
from common.drafting.pool_keys import task_pool_key
from common.drafting.pools import DEFAULT_TASK_POOL_WEIGHT, PoolRegistry
from common.drafting.trie import TrieSettings
from common.machine import device_name
from common.modeling.loading import LoadedModel
from common.workload.prompts import round_robin
from services.decoder.cost_profile import profile_cost_model
from services.decoder.engine import STEP_PARTS, DecodingEngine, EngineSettings, GenerationConfig
from services.decoder.warm_answers import pick_warm_prompts, stored_or_decoded_answers, warm_segments

METHODS = ("greedy", "prompt_lookup", "engine_greedy", "strict", "relaxed", "oracle", "adaptive")
FULL_SWEEP = [(dl, bl) for dl in (4, 8, 12, 16, 24, 32, 64) for bl in (4, 8, 12, 16) if bl <= dl]
QUICK_SWEEP = [(8, 4), (8, 8), (16, 4), (16, 8), (16, 12), (32, 8), (32, 16)]


@dataclass
class MethodStats:
    new_tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    # tokens/s of each repeat, for the spread
    repeat_tokens: list[int] = field(default_factory=list)
    repeat_wall_s: list[float] = field(default_factory=list)
    # the part after each call's first output (decode phase), and that first output's latency
    first_s: float = 0.0
    decode_tokens: int = 0
    decode_wall_s: float = 0.0
    calls: int = 0

    def add_generation(self, repeat: int, generation: Generation, wall_s: float) -> None:
        self.add(repeat, len(generation.tokens), generation.steps, wall_s)
        self.calls += 1
        self.first_s += generation.first_s
        if generation.first_tokens:
            self.decode_tokens += len(generation.tokens) - generation.first_tokens
            self.decode_wall_s += wall_s - generation.first_s

    def add(self, repeat: int, tokens: int, steps: int, wall_s: float) -> None:
        while len(self.repeat_tokens) <= repeat:
            self.repeat_tokens.append(0)
            self.repeat_wall_s.append(0.0)
        self.new_tokens += tokens
        self.steps += steps
        self.wall_s += wall_s
        self.repeat_tokens[repeat] += tokens
        self.repeat_wall_s[repeat] += wall_s

    def summary(self) -> dict:
        per_repeat = [t / w for t, w in zip(self.repeat_tokens, self.repeat_wall_s) if w > 0]
        return {
            "tokens_per_s": self.new_tokens / self.wall_s if self.wall_s else 0.0,
            "tokens_per_s_spread": spread(per_repeat),
            "mean_accepted_per_step": self.new_tokens / self.steps if self.steps else 0.0,
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "wall_s": self.wall_s,
            # after the first token: prefill is the same work for every method and dilutes the
            # end-to-end ratios on long prompts; this is what drafting changes
            "decode_tokens_per_s": self.decode_tokens / self.decode_wall_s if self.decode_wall_s > 0 else None,
            "mean_time_to_first_token_s": self.first_s / self.calls if self.calls else None,
        }


class OracleDraft:
    """Drafts the true greedy continuation: the ceiling of any draft source on this model."""

    def __init__(self, prompt_length: int, reference: Sequence[int]):
        self.prompt_length = prompt_length
        self.reference = list(reference)

    def draft(self, context: Sequence[int], decoding_length: int, branch_length: int) -> DraftTree:
        done = len(context) - self.prompt_length  # context ends with the root (the last emitted token)
        chain = self.reference[done:done + min(decoding_length, branch_length)]
        return DraftTree(tokens=chain, parents=[i - 1 for i in range(len(chain))], scores=[1.0] * len(chain))

    def observe(self, accepted_tokens: Sequence[int]) -> None:
        pass


class Generation(NamedTuple):
    tokens: list[int]
    steps: int  # forward passes after prefill
    first_s: float  # from the call to its first output (prefill + first step): time to first token
    first_tokens: int  # tokens that first output held


class CountSteps(StoppingCriteria):
    """Counts generate()'s loop iterations (one per forward pass of the target model) and
    notes when the first one ended (the first token: prefill + one step)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_at = 0.0
        self.first_length = 0  # sequence length after the first step (prompt lookup may add several tokens)

    def __call__(self, input_ids, scores, **kwargs):
        if self.calls == 0:
            self.first_at = time.perf_counter()
            self.first_length = input_ids.shape[1]
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, **kwargs) -> Generation:
    counter = CountSteps()
    ids = torch.tensor([prompt], device=loaded.model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id or 0,
            stopping_criteria=StoppingCriteriaList([counter]), **kwargs)
    tokens = out[0, len(prompt):].tolist()
    first_tokens = min(len(tokens), max(0, counter.first_length - len(prompt)))
    return Generation(tokens, counter.calls, counter.first_at - start if counter.calls else 0.0, first_tokens)


def engine_generate(engine: DecodingEngine, prompt: list[int], config: GenerationConfig, pool=None,
                    draft_source=None) -> Generation:
    tokens, steps, first_s, first_tokens = [], 0, 0.0, 0
    start = time.perf_counter()
    for step in engine.generate(prompt, config, pool, draft_source=draft_source):
        if not steps:
            first_s, first_tokens = time.perf_counter() - start, len(step.token_ids)
        tokens.extend(step.token_ids)
        steps += 1
    return Generation(tokens, steps, first_s, first_tokens)


@torch.inference_mode()
def mean_logprob(loaded: LoadedModel, prompt: list[int], output: list[int]) -> float:
    """Per-token log-likelihood of `output` under the model: the quality proxy for relaxed mode."""
    if not output:
        return 0.0
    ids = torch.tensor([prompt + output], device=loaded.model.device)
    logits = loaded.model(ids).logits[0, len(prompt) - 1:-1]  # [len(output), V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return float(logprobs.gather(1, torch.tensor(output, device=logprobs.device)[:, None]).mean())


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions where two outputs agree (over the longer length)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def warm_pools(loaded: LoadedModel, warmups, settings: EngineSettings, max_branch_length: int) -> PoolRegistry:
    # Deep enough for the deepest branch drafted in this run; a fixed budget's retrieval is the
    # same from a deeper trie (counts of its prefixes do not change).
    pools = PoolRegistry(TrieSettings(ngram_length=settings.key_length + max(settings.branch_length, max_branch_length)))
    for warmup in warmups:
        ids = loaded.tokenizer(warmup.text, add_special_tokens=False)["input_ids"]
        pools.get_or_create(warmup.pool_key).insert(ids + [loaded.tokenizer.eos_token_id], "output")
    return pools


def serve_into_pools(loaded: LoadedModel, pools: PoolRegistry, prompts, per_segment: int, max_new_tokens: int,
                     rows: int = 16, *, already: int = 0, data_dir: Path | None = None) -> dict:
    """What a running deployment's pools hold besides the corpus: the model's own answers to
    earlier requests, which the decoders publish and the pool updater inserts (Kafka loop).
    Here: greedy answers to up to `per_segment` warm-split prompts of every (pool key, task) -
    traffic of every task, as all of it flows back - each inserted into its pool and its task's pool. Held-out
    prompts never enter. Answers stored under `data_dir` (services/decoder/warm_answers.py,
    `make model` / `make warm-answers`) are reused; the missing ones are decoded with continuous
    batching and stored for the next run. `already`: that many per segment were served before
    (a growing pool takes the next ones)."""
    served = pick_warm_prompts(prompts, per_segment, already=already)
    tasks = Counter(p.task for p in served)
    if not served:
        return {"per_segment": per_segment, "outputs": 0, "wall_s": 0.0}
    start = time.perf_counter()
    answers, decoded = stored_or_decoded_answers(loaded, served, max_new_tokens, rows=rows, data_dir=data_dir)
    for answer in answers:  # into its pool and its task's, as the pool updater does (ngram_records.py)
        pools.get_or_create(answer.pool_key).insert(list(answer.token_ids), "output")
        if answer.task:
            pools.get_or_create(task_pool_key(answer.task)).insert(list(answer.token_ids), "output")
    return {"per_segment": per_segment, "outputs": len(served), "decoded_now": decoded,
            "by_task": dict(sorted(tasks.items())), "segments": len(warm_segments(prompts)),
            "wall_s": time.perf_counter() - start}


def served_answers(loaded: LoadedModel, prompts, args) -> list:
    """The answers (WarmAnswer) `serve_into_pools` put in the pools, read back from the store it
    wrote: what a peer draft source is seeded with, so it drafts from the same served traffic."""
    answers, _ = stored_or_decoded_answers(loaded, pick_warm_prompts(prompts, args.served_per_segment),
                                           args.max_new_tokens, data_dir=args.data_dir)
    return answers


def served_answer_ids(loaded: LoadedModel, prompts, args) -> list[tuple[int, ...]]:
    """Token ids of `served_answers`."""
    return [a.token_ids for a in served_answers(loaded, prompts, args)]


def request_pool(pools: PoolRegistry, prompt, task_pool_weight: float = DEFAULT_TASK_POOL_WEIGHT):
    """What the decoder drafts from for this prompt (services/decoder/intake.py): its pool key's
    pool over its task's (ADACCEL_TASK_POOL_WEIGHT; 0: the pool key's alone)."""
    return pools.drafting_pool(prompt.pool_key, prompt.task, task_pool_weight)


def tokens_per_step_by_task(engine: DecodingEngine, pools: PoolRegistry, chosen, tokenized, max_new_tokens: int,
                            eos: int) -> dict[str, float]:
    """Strict mode's accepted tokens per step on the chosen prompts, by task (deterministic, untimed)."""
    counts: dict[str, list[int]] = {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos)
    for prompt, ids in zip(chosen, tokenized):
        generation = engine_generate(engine, ids, config, request_pool(pools, prompt))
        tokens_steps = counts.setdefault(prompt.task, [0, 0])
        tokens_steps[0] += len(generation.tokens)
        tokens_steps[1] += generation.steps
    by_task = {task: t / s for task, (t, s) in sorted(counts.items()) if s}
    total_tokens, total_steps = (sum(v[i] for v in counts.values()) for i in (0, 1))
    by_task["all"] = total_tokens / total_steps if total_steps else 0.0
    return by_task


def pick_prompts(prompts, count: int) -> list:
    """Held-out prompts, interleaved across tasks so every task is represented."""
    by_task: dict[str, list] = {}
    for p in prompts:
        if p.split == "heldout":
            by_task.setdefault(p.task, []).append(p)
    return round_robin([by_task[task] for task in sorted(by_task)], count)


def run(args) -> dict:
    loaded, prompts, warmups = load_model_and_workload(args)
    settings = EngineSettings(decoding_length=args.decoding_length, branch_length=args.branch_length)
    engine = DecodingEngine(loaded.model, settings)
    sweep_grid = parse_grid(args.budget_grid) if args.budget_sweep else []
    deepest = max([args.adaptive_max_depth] + [bl for _, bl in sweep_grid])
    pools = warm_pools(loaded, warmups, settings, deepest)
    cost_model = profile_for_bench(loaded, args)
    adaptive_engine = DecodingEngine(loaded.model, EngineSettings(
        decoding_length=args.adaptive_max_tokens, branch_length=args.adaptive_max_depth, adaptive=True),
        cost_model=cost_model)
    chosen = pick_prompts(prompts, args.prompts)
    eos = loaded.tokenizer.eos_token_id
    tokenized = [prompt_token_ids(loaded.tokenizer, p) for p in chosen]
    if args.batched_only:
        return run_batched_only(loaded, pools, prompts, chosen, tokenized, cost_model, args)
    pool_state = {"corpus_texts": len(warmups),
                  "tokens_per_step_corpus_only": tokens_per_step_by_task(
                      engine, pools, chosen, tokenized, args.max_new_tokens, eos)}
    pool_state["served"] = serve_into_pools(loaded, pools, prompts, args.served_per_segment, args.max_new_tokens, data_dir=args.data_dir)
    if pool_state["served"]["outputs"]:
        pool_state["tokens_per_step_with_served"] = tokens_per_step_by_task(
            engine, pools, chosen, tokenized, args.max_new_tokens, eos)
    base = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    configs = {
        "engine_greedy": GenerationConfig(**base, drafting=False),
        "strict": GenerationConfig(**base),
        "relaxed": GenerationConfig(**base, mode="relaxed", relaxed_top_k=args.relaxed_top_k,
                                    relaxed_min_prob=args.relaxed_min_prob),
        # The oracle's chain gets the whole draft budget as its depth.
        "oracle": GenerationConfig(**base, branch_length=args.decoding_length),
        "adaptive": GenerationConfig(**base),
    }
    # SuffixDecoding (arctic-inference) drafting into this engine, seeded with the same served
    # answers, when the package is installed (bench/suffix_peer.py; `make suffix-peer`).
    peer_missing = suffix_peer.available()
    methods = METHODS
    if peer_missing is None:
        peer = suffix_peer.SuffixDecodingPolicy(served_answer_ids(loaded, prompts, args),
                                                max_tokens=args.decoding_length)
        configs["suffix_decoding"] = GenerationConfig(**base, branch_length=args.decoding_length)
        methods = (*METHODS, "suffix_decoding")
    else:
        print(f"SuffixDecoding peer left out: arctic-inference does not import ({peer_missing}); "
              f"{suffix_peer.INSTALL_HINT}")
    stats = {m: MethodStats() for m in methods}
    # Per (prompt, repeat) tokens/s of each method: the methods of one prompt run back to back,
    # so their ratio survives the CPU's drift (and other load) far better than run totals do.
    paired: dict[str, list[float]] = {m: [] for m in methods}
    paired_by_task: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    outputs: dict[str, list[list[int]]] = {m: [[] for _ in chosen] for m in methods}
    # The greedy reference (for identity checks and the oracle) is computed once, untimed.
    references = [hf_generate(loaded, ids, args.max_new_tokens).tokens for ids in tokenized]

    def call(method: str, i: int) -> Generation:
        ids, prompt = tokenized[i], chosen[i]
        if method == "greedy":
            return hf_generate(loaded, ids, args.max_new_tokens)
        if method == "prompt_lookup":
            return hf_generate(loaded, ids, args.max_new_tokens, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
        if method == "oracle":
            return engine_generate(engine, ids, configs[method], draft_source=OracleDraft(len(ids), references[i]))
        if method == "adaptive":
            return engine_generate(adaptive_engine, ids, configs["adaptive"], request_pool(pools, prompt, args.task_pool_weight))
        if method == "suffix_decoding":
            source = suffix_peer.SuffixDecodingSource(peer, ids)
            try:
                return engine_generate(engine, ids, configs[method], draft_source=source)
            finally:
                source.close()
        pool = request_pool(pools, prompt, args.task_pool_weight) if configs[method].drafting else None
        return engine_generate(engine, ids, configs[method], pool)

    console = Console(width=150)
    total = args.repeats * len(chosen)
    from tqdm import tqdm

    with tqdm(total=total, desc="prompts x repeats", unit="prompt") as bar:
        for repeat in range(args.repeats):
            for i in range(len(chosen)):
                order = methods if (i + repeat) % 2 == 0 else tuple(reversed(methods))
                rates = {}
                for method in order:
                    t0 = time.perf_counter()
                    generation = call(method, i)
                    wall = time.perf_counter() - t0
                    stats[method].add_generation(repeat, generation, wall)
                    outputs[method][i] = generation.tokens
                    rates[method] = len(generation.tokens) / wall if wall > 0 else 0.0
                for method in methods:
                    if rates["greedy"] > 0:
                        paired[method].append(rates[method] / rates["greedy"])
                        paired_by_task[method].setdefault(chosen[i].task, []).append(rates[method] / rates["greedy"])
                bar.update(1)

    results = {m: stats[m].summary() for m in methods}
    greedy_tps = results["greedy"]["tokens_per_s"]
    for m in methods:
        results[m]["speedup_vs_greedy"] = results[m]["tokens_per_s"] / greedy_tps if greedy_tps else 0.0
        greedy_decode, decode = results["greedy"]["decode_tokens_per_s"], results[m]["decode_tokens_per_s"]
        results[m]["decode_speedup_vs_greedy"] = decode / greedy_decode if decode and greedy_decode else None
        ratios = sorted(paired[m])
        results[m]["paired_speedup_median"] = statistics.median(ratios) if ratios else 0.0
        results[m]["paired_speedup_iqr"] = ([ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]
                                            if ratios else [0.0, 0.0])
        # The never-slower guarantee is judged per task: the median of each task's paired ratios,
        # and the slowest single pair beside it (one pair is noise on this CPU; a task's median is not).
        results[m]["paired_by_task"] = {
            task: {"median": statistics.median(values), "min": min(values), "pairs": len(values)}
            for task, values in sorted(paired_by_task[m].items())}
    results["strict"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["strict"], references))
    results["adaptive"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["adaptive"], references))
    results["adaptive"]["cost_correction"] = adaptive_engine.adaptive.correction.summary()
    results["adaptive"]["draft_sizes"] = size_distribution(
        adaptive_engine, observed_accepted=stats["adaptive"].new_tokens - stats["adaptive"].steps)
    results["adaptive"]["paired_vs_strict_median"] = statistics.median(
        a / s for a, s in zip(paired["adaptive"], paired["strict"])) if paired["strict"] else 0.0
    results["prompt_lookup"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["prompt_lookup"], references))
    results["engine_greedy"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["engine_greedy"], references))
    if "suffix_decoding" in results:
        results["suffix_decoding"]["identical_to_greedy"] = all(
            o == r for o, r in zip(outputs["suffix_decoding"], references))
    results["relaxed"]["token_agreement"] = sum(
        token_agreement(o, r) for o, r in zip(outputs["relaxed"], references)) / max(len(chosen), 1)
    results["relaxed"]["mean_logprob"] = sum(
        mean_logprob(loaded, ids, o) for ids, o in zip(tokenized, outputs["relaxed"])) / max(len(chosen), 1)
    results["greedy"]["mean_logprob"] = sum(
        mean_logprob(loaded, ids, o) for ids, o in zip(tokenized, references)) / max(len(chosen), 1)
    facts = ItemFactChecker(args.workload.parent, loaded.tokenizer, chosen)
    results["greedy"]["item_facts"] = facts(references)
    for method in ("strict", "relaxed", "adaptive"):
        results[method]["item_facts"] = facts(outputs[method])
    oracle_tps = results["oracle"]["tokens_per_s"]
    results["strict"]["fraction_of_oracle"] = results["strict"]["tokens_per_s"] / oracle_tps if oracle_tps else 0.0
    sweep = relaxed_sweep(engine, loaded, pools, chosen, tokenized, references, facts, args) if args.sweep else []
    budget = (budget_sweep(loaded, pools, chosen, tokenized, references, sweep_grid, adaptive_engine, args)
              if sweep_grid else {})
    batched = batched_variant(loaded, pools, chosen, tokenized, cost_model, args) if args.batch_sizes else []
    profile = step_profile(loaded, pools, chosen, tokenized, cost_model, args) if args.step_profile else {}
    report = {
        **run_facts(loaded, chosen, cost_model, args),
        "repeats": args.repeats,
        "decoding_length": args.decoding_length,
        "branch_length": args.branch_length,
        "methods": results,
        "pools": pool_state,
        "relaxed_sweep": sweep,
        "budget_sweep": budget,
        "batched": batched,
        "step_profile": profile,
        "suffix_decoding_peer": "measured" if peer_missing is None else f"left out: {peer_missing}",
    }
    print_table(console, report)
    path = write_results("decode.json", report, args.results_dir)
    if sweep:
        plot_sweep(sweep, results["greedy"], args.results_dir / "decode_relaxed.png")
    if budget:
        plot_budget(budget, args.results_dir / "decode_budget.png")
    if report["batched"]:
        plot_batched(report["batched"], args.results_dir / "decode_batched.png")
    console.print(f"wrote {path}")
    return report


def run_facts(loaded: LoadedModel, chosen, cost_model: StepCostModel, args) -> dict:
    """What every decode report records about its run: machine, model, prompts, cost model."""
    return {
        "device": device_name(), "model": loaded.model_id, "model_path": str(args.model_path),
        "random_weights": loaded.random_weights, "prompts": len(chosen), "max_new_tokens": args.max_new_tokens,
        "cost_model": cost_model_summary(cost_model), "adaptive_max_tokens": args.adaptive_max_tokens,
        "adaptive_max_depth": args.adaptive_max_depth,
    }


def run_batched_only(loaded, pools, prompts, chosen, tokenized, cost_model, args) -> dict:
    """The batched variant alone, on the same served pools and a cost model measured now: the
    x4 / x16 check of the never-slower guarantee without the single-request methods before it."""
    served = serve_into_pools(loaded, pools, prompts, args.served_per_segment, args.max_new_tokens,
                              data_dir=args.data_dir)
    report = {
        **run_facts(loaded, chosen, cost_model, args), "served": served, "task_pool_weight": args.task_pool_weight,
        "batched": batched_variant(loaded, pools, chosen, tokenized, cost_model, args),
    }
    console = Console(width=150)
    print_random_weights_warning(console, report)
    print_batched(console, report["batched"])
    path = write_results("decode_batched.json", report, args.results_dir)
    plot_batched(report["batched"], args.results_dir / "decode_batched.png")
    console.print(f"wrote {path}")
    return report


def relaxed_sweep(engine, loaded, pools, chosen, tokenized, references, facts, args) -> list[dict]:
    """Speed against agreement with greedy over relaxed knobs (top_k, min_prob); strict is (1, 0);
    each point with its mean log-likelihood and the item-fact ads check (`facts`)."""
    points = []
    grid = [(1, 0.0), (2, 0.3), (2, 0.1), (2, 0.05), (3, 0.05), (4, 0.02)]
    for top_k, min_prob in grid:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=loaded.tokenizer.eos_token_id,
                                  mode="strict" if top_k == 1 else "relaxed", relaxed_top_k=max(top_k, 1),
                                  relaxed_min_prob=min_prob)
        tokens = steps = 0
        wall = agreement = 0.0
        outs = []
        for prompt, ids, ref in zip(chosen, tokenized, references):
            t0 = time.perf_counter()
            out, n, _, _ = engine_generate(engine, ids, config, request_pool(pools, prompt, args.task_pool_weight))
            wall += time.perf_counter() - t0
            tokens += len(out)
            steps += n
            agreement += token_agreement(out, ref)
            outs.append(out)
        points.append({"top_k": top_k, "min_prob": min_prob, "tokens_per_s": tokens / wall,
                       "mean_accepted_per_step": tokens / max(steps, 1),
                       "token_agreement": agreement / max(len(chosen), 1),
                       "mean_logprob": statistics.fmean(mean_logprob(loaded, ids, o) for ids, o in zip(tokenized, outs)),
                       "item_facts": facts(outs)})
    return points


def parse_grid(text: str) -> list[tuple[int, int]]:
    grid = []
    for part in text.split(","):
        if part.strip():
            dl, bl = part.split(":")
            grid.append((int(dl), int(bl)))
    return grid


def profile_for_bench(loaded: LoadedModel, args) -> StepCostModel:
    """The adaptive method's step-cost model, measured now on this machine (never a stored one:
    the benchmark must price steps under the conditions it measures)."""
    batches = tuple(sorted({1, 2, 4, 8, 16} | set(args.batch_sizes)))
    return profile_cost_model(loaded.model, loaded.model_id, max_seconds=args.profile_seconds, batches=batches,
                              widths=(1, 2, 4, 8, 12, 16, 24, 32, 48, args.adaptive_max_tokens + 1))


def cost_model_summary(model: StepCostModel) -> dict:
    return {
        "device": model.device, "profiled_s": model.meta.get("profiled_s"), "points": model.meta.get("points"),
        "knots": model.knots, "coefficients": model.coefficients,
        "predicted_ms": {f"batch {b}": {str(w): model.predict(w, b, 256) * 1e3 for w in (1, 2, 4, 8, 16, 32, 64)}
                         for b in (1, 4, 16)},
        "timings": model.meta.get("timings", []),
    }


def adaptive_snapshot(engine: DecodingEngine) -> tuple[dict[int, int], float]:
    return dict(engine.adaptive.size_counts), engine.adaptive.predicted_accepted


def size_distribution(engine: DecodingEngine, before: tuple[dict[int, int], float] | None = None,
                      observed_accepted: int | None = None) -> dict:
    """Draft tokens chosen per row and step by adaptive drafting (since `before`), and the
    accepted drafts the confidence estimates predicted (against those observed, when given)."""
    counts = dict(engine.adaptive.size_counts)
    predicted = engine.adaptive.predicted_accepted
    if before:
        counts = {k: v - before[0].get(k, 0) for k, v in counts.items() if v - before[0].get(k, 0) > 0}
        predicted -= before[1]
    total = sum(counts.values())
    if not total:
        return {"steps": 0}
    sizes = sorted(counts)
    cumulative, quantiles = 0, {}
    for size in sizes:
        cumulative += counts[size]
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            if str(q) not in quantiles and cumulative >= q * total:
                quantiles[str(q)] = size
    summary = {
        "steps": total,
        "mean": sum(k * v for k, v in counts.items()) / total,
        "zero_share": counts.get(0, 0) / total,
        "quantiles": quantiles,
        "histogram": {str(k): counts[k] for k in sizes},
        "predicted_accepted_per_step": predicted / total,
    }
    if observed_accepted is not None:
        summary["observed_accepted_per_step"] = observed_accepted / total
    return summary


def paired_summary(ratios: list[float]) -> dict:
    ratios = sorted(ratios)
    if not ratios:
        return {"median": 0.0, "iqr": [0.0, 0.0]}
    return {"median": statistics.median(ratios), "iqr": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]}


def budget_sweep(loaded, pools, chosen, tokenized, references, grid, adaptive_engine, args) -> dict:
    """Strict at each fixed (decoding_length, branch_length), adaptive and greedy, interleaved
    prompt by prompt (alternating order): the best fixed budget and adaptive against it."""
    count = min(args.sweep_prompts, len(chosen))
    eos = loaded.tokenizer.eos_token_id
    fixed_engine = DecodingEngine(loaded.model, EngineSettings())
    labels = ["greedy", "adaptive"] + [f"{dl}x{bl}" for dl, bl in grid]
    configs = {f"{dl}x{bl}": GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                              decoding_length=dl, branch_length=bl) for dl, bl in grid}
    adaptive_config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    stats = {label: MethodStats() for label in labels}
    paired = {label: [] for label in labels}  # vs greedy
    adaptive_vs = {label: [] for label in labels}  # adaptive / this, per prompt
    identical = {label: True for label in labels}
    sizes_before = adaptive_snapshot(adaptive_engine)
    from tqdm import tqdm

    with tqdm(total=count * args.sweep_repeats, desc="budget sweep", unit="prompt") as bar:
        for repeat in range(args.sweep_repeats):
            for i in range(count):
                pool = request_pool(pools, chosen[i], args.task_pool_weight)
                order = labels if (i + repeat) % 2 == 0 else list(reversed(labels))
                rates = {}
                for label in order:
                    t0 = time.perf_counter()
                    if label == "greedy":
                        tokens, steps, _, _ = hf_generate(loaded, tokenized[i], args.max_new_tokens)
                    elif label == "adaptive":
                        tokens, steps, _, _ = engine_generate(adaptive_engine, tokenized[i], adaptive_config, pool)
                    else:
                        tokens, steps, _, _ = engine_generate(fixed_engine, tokenized[i], configs[label], pool)
                    wall = time.perf_counter() - t0
                    stats[label].add(repeat, len(tokens), steps, wall)
                    rates[label] = len(tokens) / wall if wall > 0 else 0.0
                    identical[label] &= tokens == references[i]
                for label in labels:
                    paired[label].append(rates[label] / rates["greedy"])
                    adaptive_vs[label].append(rates["adaptive"] / rates[label])
                bar.update(1)
    greedy_tps = stats["greedy"].summary()["tokens_per_s"]

    def entry(label: str) -> dict:
        summary = stats[label].summary()
        pair = paired_summary(paired[label])
        return {"tokens_per_s": summary["tokens_per_s"], "speedup_vs_greedy": summary["tokens_per_s"] / greedy_tps,
                "paired_speedup_median": pair["median"], "paired_speedup_iqr": pair["iqr"],
                "mean_accepted_per_step": summary["mean_accepted_per_step"], "steps": summary["steps"],
                "wall_s": summary["wall_s"], "identical_to_greedy": identical[label]}

    settings = []
    for (dl, bl), label in zip(grid, labels[2:]):
        row = {"decoding_length": dl, "branch_length": bl, **entry(label)}
        row["adaptive_vs_this_paired_median"] = paired_summary(adaptive_vs[label])["median"]
        settings.append(row)
    best = max(settings, key=lambda r: r["paired_speedup_median"])
    best_totals = max(settings, key=lambda r: r["tokens_per_s"])
    adaptive = entry("adaptive")
    adaptive["draft_sizes"] = size_distribution(adaptive_engine, sizes_before,
                                                observed_accepted=stats["adaptive"].new_tokens - stats["adaptive"].steps)
    default = next((r for r in settings if (r["decoding_length"], r["branch_length"]) ==
                    (args.decoding_length, args.branch_length)), None)
    return {
        "prompts": count,
        "repeats": args.sweep_repeats,
        "greedy": entry("greedy"),
        "settings": settings,
        "adaptive": adaptive,
        "best_fixed": {"decoding_length": best["decoding_length"], "branch_length": best["branch_length"],
                       "by": "paired_speedup_median"},
        "best_fixed_by_totals": {"decoding_length": best_totals["decoding_length"],
                                 "branch_length": best_totals["branch_length"]},
        "adaptive_vs_best_fixed_paired_median": best["adaptive_vs_this_paired_median"],
        "adaptive_vs_best_fixed_totals": adaptive["tokens_per_s"] / best["tokens_per_s"],
        "adaptive_vs_best_totals_setting_totals": adaptive["tokens_per_s"] / best_totals["tokens_per_s"],
        "adaptive_vs_default_paired_median": default["adaptive_vs_this_paired_median"] if default else None,
        "adaptive_vs_worst_fixed_paired_median": min(r["adaptive_vs_this_paired_median"] for r in settings),
    }


def batched_variant(loaded, pools, chosen, tokenized, cost_model, args) -> list[dict]:
    """Concurrent requests through generate_batch: no drafting, the fixed default budget per row,
    and adaptive (one budget per forward, shared by rows), interleaved group by group."""
    eos = loaded.tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    plain = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos, drafting=False)
    fixed_engine = DecodingEngine(loaded.model, EngineSettings(decoding_length=args.decoding_length,
                                                               branch_length=args.branch_length))
    references = {i: None for i in range(len(chosen))}
    results = []
    from tqdm import tqdm

    for batch_size in args.batch_sizes:
        adaptive_engine = DecodingEngine(loaded.model, EngineSettings(
            decoding_length=args.adaptive_max_tokens, branch_length=args.adaptive_max_depth, adaptive=True),
            cost_model=cost_model)
        # Groups of consecutive prompts (cycling when there are fewer prompts than a batch).
        groups_count = max(1, min(args.sweep_prompts, len(chosen)) // batch_size)
        groups = [[(g * batch_size + j) % len(chosen) for j in range(batch_size)] for g in range(groups_count)]
        methods = {"engine_greedy": (fixed_engine, plain), "fixed": (fixed_engine, config),
                   "adaptive": (adaptive_engine, config)}
        stats = {m: {"tokens": 0, "wall_s": 0.0, "wall_with_prefill_s": 0.0, "forwards": 0} for m in methods}
        paired = {m: [] for m in methods}
        adaptive_vs_fixed = []
        outputs = {m: {} for m in methods}
        with tqdm(total=len(groups) * args.sweep_repeats, desc=f"batched x{batch_size}", unit="group") as bar:
            for repeat in range(args.sweep_repeats):
                for g, group in enumerate(groups):
                    order = list(methods) if (g + repeat) % 2 == 0 else list(reversed(methods))
                    rates = {}
                    for method in order:
                        engine, cfg = methods[method]
                        group_pools = [request_pool(pools, chosen[i], args.task_pool_weight) if cfg.drafting else None for i in group]
                        produced = [[] for _ in group]
                        forwards = 0
                        t0 = time.perf_counter()
                        # Timed from the end of iter_batch's first list (the prefills and their
                        # first tokens): prefill (prompts of up to a few thousand tokens) is the
                        # same for every method and would mask them.
                        decode_start, first_tokens = None, 0
                        for step in engine.iter_batch([tokenized[i] for i in group], [cfg] * len(group),
                                                      group_pools):
                            forwards += 1
                            for row, result in enumerate(step):
                                if result is not None:
                                    produced[row].extend(result.token_ids)
                            if decode_start is None:
                                decode_start, first_tokens = time.perf_counter(), sum(map(len, produced))
                        end = time.perf_counter()
                        tokens = sum(map(len, produced)) - first_tokens
                        wall = end - (decode_start or end)
                        stats[method]["tokens"] += tokens
                        stats[method]["wall_s"] += wall
                        stats[method]["wall_with_prefill_s"] += end - t0
                        stats[method]["forwards"] += max(forwards - 1, 0)
                        rates[method] = tokens / wall if wall > 0 else 0.0
                        for i, out in zip(group, produced):
                            outputs[method][i] = out
                    for method in methods:
                        paired[method].append(rates[method] / rates["engine_greedy"])
                    adaptive_vs_fixed.append(rates["adaptive"] / rates["fixed"])
                    bar.update(1)
        entry = {"batch_size": batch_size, "groups": len(groups), "repeats": args.sweep_repeats, "methods": {}}
        for method in methods:
            m = stats[method]
            entry["methods"][method] = {
                "tokens_per_s": m["tokens"] / m["wall_s"], "forwards": m["forwards"],
                "tokens_per_forward": m["tokens"] / max(m["forwards"], 1), "wall_s": m["wall_s"],
                "wall_with_prefill_s": m["wall_with_prefill_s"],
                "paired_vs_engine_greedy": paired_summary(paired[method]),
                "identical_to_engine_greedy": all(outputs[method][i] == outputs["engine_greedy"][i]
                                                  for i in outputs[method]),
            }
        entry["adaptive_vs_fixed_paired"] = paired_summary(adaptive_vs_fixed)
        entry["adaptive_vs_fixed_totals"] = (entry["methods"]["adaptive"]["tokens_per_s"]
                                             / entry["methods"]["fixed"]["tokens_per_s"])
        entry["adaptive_draft_sizes"] = size_distribution(adaptive_engine)
        entry["adaptive_widths"] = {str(k): v for k, v in sorted(adaptive_engine.adaptive.width_counts.items())}
        # Measured / predicted step seconds by batch and width bucket (common/drafting/cost_correction.py).
        entry["adaptive_cost_correction"] = adaptive_engine.adaptive.correction.summary()
        results.append(entry)
    del references
    return results


class StepPartTimes:
    """Seconds per part of a step (prefill excluded), summed over steps: the engine's StepTimer."""

    def __init__(self) -> None:
        self.seconds = {part: 0.0 for part in (*STEP_PARTS, "step")}
        self.steps = 0

    def record(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds
        self.steps += part == "step"


def step_profile(loaded, pools, chosen, tokenized, cost_model, args) -> dict:
    """Milliseconds per step by part, for the fixed default budget and for adaptive drafting."""
    eos = loaded.tokenizer.eos_token_id
    count = min(args.sweep_prompts, len(chosen))
    times = {name: StepPartTimes() for name in ("strict", "adaptive", "engine_greedy")}
    variants = {
        "strict": DecodingEngine(loaded.model, EngineSettings(decoding_length=args.decoding_length,
                                                              branch_length=args.branch_length),
                                 step_timer=times["strict"]),
        "adaptive": DecodingEngine(loaded.model, EngineSettings(decoding_length=args.adaptive_max_tokens,
                                                                branch_length=args.adaptive_max_depth, adaptive=True),
                                   cost_model=cost_model, step_timer=times["adaptive"]),
        "engine_greedy": DecodingEngine(loaded.model, EngineSettings(), step_timer=times["engine_greedy"]),
    }
    report = {}
    for name, engine in variants.items():
        timer = times[name]
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                  drafting=name != "engine_greedy")
        drafted = tokens = 0
        for i in range(count):
            for step in engine.generate(tokenized[i], config, request_pool(pools, chosen[i], args.task_pool_weight)):
                drafted += step.drafted
                tokens += len(step.token_ids)
        steps = max(timer.steps, 1)
        parts = {part: timer.seconds[part] / steps * 1e3 for part in STEP_PARTS}
        step_ms = timer.seconds["step"] / steps * 1e3
        parts["other"] = step_ms - sum(parts.values())
        report[name] = {"step_ms": step_ms, "parts_ms": parts, "steps": timer.steps,
                        "draft_tokens_per_step": drafted / steps, "tokens_per_step": tokens / steps,
                        "forward_share": parts["forward"] / step_ms if step_ms else 0.0}
    return report


def plot_budget(budget: dict, path: Path) -> None:
    fig, axes = figure(1, 2, size=(11, 4))
    by_bl: dict[int, list[dict]] = {}
    for row in budget["settings"]:
        by_bl.setdefault(row["branch_length"], []).append(row)
    for bl, rows in sorted(by_bl.items()):
        rows = sorted(rows, key=lambda r: r["decoding_length"])
        xs = [r["decoding_length"] for r in rows]
        axes[0].plot(xs, [r["paired_speedup_median"] for r in rows], "o-", label=f"branch_length {bl}")
        axes[1].plot(xs, [r["mean_accepted_per_step"] for r in rows], "o-", label=f"branch_length {bl}")
    adaptive = budget["adaptive"]
    axes[0].axhline(adaptive["paired_speedup_median"], color="k", ls="--", label="adaptive")
    axes[1].axhline(adaptive["mean_accepted_per_step"], color="k", ls="--", label="adaptive")
    for ax, label in zip(axes, ("speedup vs greedy (paired median)", "tokens per step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding_length (draft tokens per step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Strict mode: fixed draft budgets vs adaptive (same prompts, interleaved)")
    save_figure(fig, path)


def plot_batched(batched: list[dict], path: Path) -> None:
    """Throughput against concurrent requests: fixed tree and adaptive, each over the same loop
    without drafts (paired by group), the line at 1 being "speculation costs nothing"."""
    fig, ax = figure(size=(6, 4))
    sizes = [b["batch_size"] for b in batched]
    for method, style in (("fixed", "s-"), ("adaptive", "o-")):
        ax.plot(sizes, [b["methods"][method]["paired_vs_engine_greedy"]["median"] for b in batched], style,
                label=method)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="no drafting")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("concurrent requests (one batched forward per step)")
    ax.set_ylabel("decode tokens/s x no drafting (paired median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Batched serving: speculation against the same loop without drafts")
    save_figure(fig, path)


def plot_sweep(points: list[dict], greedy: dict, path: Path) -> None:
    """Speed against drift (token agreement), and against the ads check (item-fact precision,
    greedy's own as the line to hold)."""
    fig, (ax, facts_ax) = figure(1, 2, size=(11, 4))
    ys = [p["tokens_per_s"] / greedy["tokens_per_s"] for p in points]
    panels = [(ax, [p["token_agreement"] for p in points], "token agreement with greedy")]
    precisions = [(p.get("item_facts") or {}).get("precision") for p in points]
    if all(x is not None for x in precisions):
        panels.append((facts_ax, precisions, "item facts stated that belong to the item"))
        greedy_precision = (greedy.get("item_facts") or {}).get("precision")
        if greedy_precision is not None:
            facts_ax.axvline(greedy_precision, color="grey", linestyle="--", label="greedy")
            facts_ax.legend()
    else:
        facts_ax.set_axis_off()
    for axes, xs, label in panels:
        axes.plot(xs, ys, "o-")
        for p, x, y in zip(points, xs, ys):
            axes.annotate(f"k={p['top_k']}, p>={p['min_prob']}", (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
        axes.set(xlabel=label, ylabel="speedup vs greedy generate")
        axes.grid(alpha=0.3)
    ax.set_title("Relaxed verification: speed against drift")
    facts_ax.set_title("... and against the item-fact ads check")
    save_figure(fig, path)


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"decode benchmark: {report['model']} on {report['device']}, {report['prompts']} prompts "
                        f"x {report['repeats']} repeats, {report['max_new_tokens']} new tokens")
    for column in ("method", "tokens/s", "spread (min-max)", "x greedy", "x greedy paired (IQR)",
                   "decode x greedy", "TTFT ms", "tokens/step", "steps", "notes"):
        table.add_column(column, justify="left" if column in ("method", "notes") else "right")
    for name, m in report["methods"].items():
        notes = []
        if "identical_to_greedy" in m:
            notes.append("identical" if m["identical_to_greedy"] else "DIFFERS from greedy")
        if "token_agreement" in m:
            notes.append(f"agreement {m['token_agreement']:.3f}")
        if "fraction_of_oracle" in m:
            notes.append(f"{m['fraction_of_oracle']:.2f} of oracle")
        if (m.get("item_facts") or {}).get("precision") is not None:
            notes.append(f"item facts {m['item_facts']['precision']:.2f}")
        s = m["tokens_per_s_spread"]
        table.add_row(name, f"{m['tokens_per_s']:.1f}", f"{s['min']:.1f}-{s['max']:.1f}",
                      f"{m['speedup_vs_greedy']:.2f}",
                      f"{m['paired_speedup_median']:.2f} ({m['paired_speedup_iqr'][0]:.2f}-{m['paired_speedup_iqr'][1]:.2f})",
                      _optional(m.get("decode_speedup_vs_greedy"), "{:.2f}"),
                      _optional(m.get("mean_time_to_first_token_s"), "{:.0f}", 1e3),
                      f"{m['mean_accepted_per_step']:.2f}", str(m["steps"]),
                      ", ".join(notes))
    console.print(table)
    by_task = {name: m["paired_by_task"] for name, m in report["methods"].items() if m.get("paired_by_task")}
    if by_task:
        console.print("x greedy paired, median (slowest pair) by task: " + "; ".join(
            f"{name} " + ", ".join(f"{task} {v['median']:.2f} ({v['min']:.2f})" for task, v in tasks.items())
            for name, tasks in by_task.items() if name in ("strict", "adaptive", "engine_greedy")))
    pools = report.get("pools", {})
    if pools:
        served = pools.get("served", {})
        console.print(f"pools: {pools['corpus_texts']} corpus texts + {served.get('outputs', 0)} served answers "
                      f"({served.get('per_segment', 0)} per pool key and task: {served.get('by_task', {})}, "
                      f"{served.get('wall_s', 0):.0f} s); strict tokens/step "
                      f"corpus only {_by_task(pools['tokens_per_step_corpus_only'])}"
                      + (f"; with served answers {_by_task(pools['tokens_per_step_with_served'])}"
                         if "tokens_per_step_with_served" in pools else ""))
    print_random_weights_warning(console, report)
    for p in report["relaxed_sweep"]:
        item_facts = (p.get("item_facts") or {}).get("precision")
        console.print(f"  relaxed top_k={p['top_k']} min_prob={p['min_prob']}: {p['tokens_per_s']:.1f} tok/s, "
                      f"{p['mean_accepted_per_step']:.2f} tok/step, agreement {p['token_agreement']:.3f}, "
                      f"log-likelihood {p['mean_logprob']:.3f}, item facts "
                      + (f"{item_facts:.2f}" if item_facts is not None else "-"))
    adaptive = report["methods"].get("adaptive", {})
    if adaptive.get("draft_sizes", {}).get("steps"):
        sizes = adaptive["draft_sizes"]
        console.print(f"adaptive: {adaptive['paired_vs_strict_median']:.2f}x strict (paired median); draft tokens "
                      f"per step mean {sizes['mean']:.1f}, none drafted in {sizes['zero_share']:.0%} of steps, "
                      f"quantiles {sizes['quantiles']}; accepted per step predicted "
                      f"{sizes['predicted_accepted_per_step']:.2f}, observed {sizes.get('observed_accepted_per_step', 0):.2f}")
    budget = report.get("budget_sweep")
    if budget:
        table = Table(title=f"budget sweep (strict, fixed decoding_length x branch_length; {budget['prompts']} prompts "
                            f"x {budget['repeats']}, interleaved with greedy)")
        for column in ("setting", "tokens/s", "x greedy", "x greedy paired (IQR)", "tokens/step", "adaptive / this",
                       "identical"):
            table.add_column(column, justify="left" if column == "setting" else "right")
        rows = [("adaptive", budget["adaptive"])] + [(f"{r['decoding_length']} x {r['branch_length']}", r)
                                                     for r in budget["settings"]]
        for name, r in rows:
            table.add_row(name, f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_greedy']:.2f}",
                          f"{r['paired_speedup_median']:.2f} ({r['paired_speedup_iqr'][0]:.2f}-"
                          f"{r['paired_speedup_iqr'][1]:.2f})", f"{r['mean_accepted_per_step']:.2f}",
                          f"{r.get('adaptive_vs_this_paired_median', 1.0):.2f}", str(r["identical_to_greedy"]))
        console.print(table)
        best = budget["best_fixed"]
        console.print(f"best fixed: {best['decoding_length']} x {best['branch_length']}; adaptive vs best "
                      f"{budget['adaptive_vs_best_fixed_paired_median']:.2f}x (paired median), "
                      f"{budget['adaptive_vs_best_fixed_totals']:.2f}x (totals); lowest against any fixed setting "
                      f"{budget['adaptive_vs_worst_fixed_paired_median']:.2f}x")
    print_batched(console, report.get("batched", []))
    profile = report.get("step_profile")
    if profile:
        table = Table(title="step profile (ms per step, single request)")
        for column in ("variant", "step", *STEP_PARTS, "other", "draft tok/step", "tok/step"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for name, p in profile.items():
            table.add_row(name, f"{p['step_ms']:.2f}", *(f"{p['parts_ms'][k]:.2f}" for k in (*STEP_PARTS, "other")),
                          f"{p['draft_tokens_per_step']:.1f}", f"{p['tokens_per_step']:.2f}")
        console.print(table)


def print_random_weights_warning(console: Console, report: dict) -> None:
    if report["random_weights"]:
        console.print("[bold red]model has RANDOM weights: acceptance figures mean nothing[/]")


def print_batched(console: Console, batched: list[dict]) -> None:
    for entry in batched:
        table = Table(title=f"batched: {entry['batch_size']} concurrent requests, {entry['groups']} groups "
                            f"x {entry['repeats']} (decode after the prefills' first tokens; prefill excluded)")
        for column in ("method", "tokens/s", "x no drafting (paired)", "tokens/forward", "forwards", "identical"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for name, m in entry["methods"].items():
            table.add_row(name, f"{m['tokens_per_s']:.1f}", f"{m['paired_vs_engine_greedy']['median']:.2f}",
                          f"{m['tokens_per_forward']:.2f}", str(m["forwards"]), str(m["identical_to_engine_greedy"]))
        console.print(table)
        sizes = entry["adaptive_draft_sizes"]
        console.print(f"  adaptive / fixed: {entry['adaptive_vs_fixed_paired']['median']:.2f}x paired, "
                      f"{entry['adaptive_vs_fixed_totals']:.2f}x totals; draft tokens per row and step: "
                      f"mean {sizes.get('mean', 0):.1f}, quantiles {sizes.get('quantiles')}, "
                      f"padded widths {entry['adaptive_widths']}")


def _optional(value: float | None, form: str, scale: float = 1.0) -> str:
    return "-" if value is None else form.format(value * scale)


def _by_task(by_task: dict[str, float]) -> str:
    return ", ".join(f"{task} {value:.2f}" for task, value in by_task.items())


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = bench_parser("bench.decode", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=12 if quick else 40)
    parser.add_argument("--max-new-tokens", type=int, default=64 if quick else 96)
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--decoding-length", type=int, default=16)
    parser.add_argument("--branch-length", type=int, default=8)
    parser.add_argument("--relaxed-top-k", type=int, default=2)
    parser.add_argument("--relaxed-min-prob", type=float, default=0.1)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--served-per-segment", type=int, default=1 if quick else 10,
                        help="before timing, decode this many warm-split prompts per pool key and task and insert "
                             "the answers into their pools, as a running deployment's Kafka loop does (0 = corpus "
                             "texts only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--task-pool-weight", type=float, default=DEFAULT_TASK_POOL_WEIGHT,
                        help="the task pools' weight under each pool key's, as ADACCEL_TASK_POOL_WEIGHT (0: off)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--no-budget-sweep", dest="budget_sweep", action="store_false")
    parser.add_argument("--budget-grid", default=None,
                        help="fixed budgets to sweep, 'dl:bl,dl:bl,...' (default: a grid, smaller when quick)")
    parser.add_argument("--sweep-prompts", type=int, default=8 if quick else 18,
                        help="prompts in the budget sweep and the batched variant (a prefix of --prompts)")
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--adaptive-max-tokens", type=int, default=20, help="adaptive: candidate draft tokens per step")
    parser.add_argument("--adaptive-max-depth", type=int, default=16, help="adaptive: deepest candidate branch")
    parser.add_argument("--profile-seconds", type=float, default=6.0 if quick else 20.0,
                        help="step-cost profiling time limit (the adaptive method's cost model)")
    parser.add_argument("--batch-sizes", default="4,16", help="concurrent requests in the batched variant ('' = skip)")
    parser.add_argument("--no-step-profile", dest="step_profile", action="store_false")
    parser.add_argument("--batched-only", action="store_true",
                        help="only the batched variant (--batch-sizes over --sweep-prompts), into decode_batched.json")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    resolve_model_arguments(args)
    if args.budget_grid is None:
        args.budget_grid = ",".join(f"{dl}:{bl}" for dl, bl in (QUICK_SWEEP if quick else FULL_SWEEP))
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
