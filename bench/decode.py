"""make bench-decode: our decoding engine against plain greedy and prompt lookup, same run, same prompts.

Methods (each prompt runs every method, in alternating order, repeated; the CPU's speed drifts):
  greedy         transformers `generate`, greedy: what a user runs without us (the baseline)
  prompt_lookup  transformers prompt-lookup decoding (`prompt_lookup_num_tokens`)
  engine_greedy  our engine with drafting off: our loop's own overhead or gain
  strict         our engine, per-pool trie drafts + the request's overlay, lossless
  relaxed        our engine, DARE's relaxed acceptance (top-k and min probability)
  oracle         our engine fed the true greedy continuation as a chain of the same budget: the ceiling

Pools are warmed with the workload's warm-split texts and evaluated on held-out prompts.
Workload file: JSONL as documented in common/workload/export.py (type "prompt" lines with
split "heldout" are decoded, type "warmup" lines warm the pool of their pool_key).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import StoppingCriteria, StoppingCriteriaList

from bench.common import RESULTS_DIR, device_name, spread, write_results
from common.drafting.draft_tree import DraftTree
from common.drafting.pools import PoolRegistry
from common.drafting.trie import TrieSettings
from common.modeling.loading import LoadedModel, load_model
from common.prompt_tokens import tokenize_blocks
from common.workload.export import load_prompts
from services.decoder.engine import DecodingEngine, EngineSettings, GenerationConfig

METHODS = ("greedy", "prompt_lookup", "engine_greedy", "strict", "relaxed", "oracle")


@dataclass
class MethodStats:
    new_tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    # tokens/s of each repeat, for the spread
    repeat_tokens: list[int] = field(default_factory=list)
    repeat_wall_s: list[float] = field(default_factory=list)

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


class CountSteps(StoppingCriteria):
    """Counts generate()'s loop iterations (one per forward pass of the target model)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, **kwargs) -> tuple[list[int], int]:
    counter = CountSteps()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id or 0,
            stopping_criteria=StoppingCriteriaList([counter]), **kwargs)
    return out[0, len(prompt):].tolist(), counter.calls


def engine_generate(engine: DecodingEngine, prompt: list[int], config: GenerationConfig, pool=None,
                    draft_source=None) -> tuple[list[int], int]:
    tokens, steps = [], 0
    for step in engine.generate(prompt, config, pool, draft_source=draft_source):
        tokens.extend(step.token_ids)
        steps += 1
    return tokens, steps


@torch.inference_mode()
def mean_logprob(loaded: LoadedModel, prompt: list[int], output: list[int]) -> float:
    """Per-token log-likelihood of `output` under the model: the quality proxy for relaxed mode."""
    if not output:
        return 0.0
    ids = torch.tensor([prompt + output])
    logits = loaded.model(ids).logits[0, len(prompt) - 1:-1]  # [len(output), V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return float(logprobs.gather(1, torch.tensor(output)[:, None]).mean())


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions where two outputs agree (over the longer length)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def warm_pools(loaded: LoadedModel, warmups, settings: EngineSettings) -> PoolRegistry:
    pools = PoolRegistry(TrieSettings(ngram_length=settings.key_length + settings.branch_length))
    for warmup in warmups:
        ids = loaded.tokenizer(warmup.text, add_special_tokens=False)["input_ids"]
        pools.get_or_create(warmup.pool_key).insert(ids + [loaded.tokenizer.eos_token_id], "output")
    return pools


def pick_prompts(prompts, count: int) -> list:
    """Held-out prompts, interleaved across tasks so every task is represented."""
    by_task: dict[str, list] = {}
    for p in prompts:
        if p.split == "heldout":
            by_task.setdefault(p.task, []).append(p)
    picked, i = [], 0
    while len(picked) < count and any(i < len(v) for v in by_task.values()):
        for task in sorted(by_task):
            if i < len(by_task[task]) and len(picked) < count:
                picked.append(by_task[task][i])
        i += 1
    return picked


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model_path)
    prompts, warmups = load_prompts(args.workload)
    settings = EngineSettings(decoding_length=args.decoding_length, branch_length=args.branch_length)
    engine = DecodingEngine(loaded.model, settings)
    pools = warm_pools(loaded, warmups, settings)
    chosen = pick_prompts(prompts, args.prompts)
    eos = loaded.tokenizer.eos_token_id
    tokenized = [tokenize_blocks(loaded.tokenizer, [b.text for b in p.blocks]).token_ids for p in chosen]
    base = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    configs = {
        "engine_greedy": GenerationConfig(**base, drafting=False),
        "strict": GenerationConfig(**base),
        "relaxed": GenerationConfig(**base, mode="relaxed", relaxed_top_k=args.relaxed_top_k,
                                    relaxed_min_prob=args.relaxed_min_prob),
        # The oracle's chain gets the whole draft budget as its depth.
        "oracle": GenerationConfig(**base, branch_length=args.decoding_length),
    }
    stats = {m: MethodStats() for m in METHODS}
    # Per (prompt, repeat) tokens/s of each method: the methods of one prompt run back to back,
    # so their ratio survives the CPU's drift (and other load) far better than run totals do.
    paired: dict[str, list[float]] = {m: [] for m in METHODS}
    outputs: dict[str, list[list[int]]] = {m: [[] for _ in chosen] for m in METHODS}
    # The greedy reference (for identity checks and the oracle) is computed once, untimed.
    references = [hf_generate(loaded, ids, args.max_new_tokens)[0] for ids in tokenized]

    def call(method: str, i: int) -> tuple[list[int], int]:
        ids, prompt = tokenized[i], chosen[i]
        if method == "greedy":
            return hf_generate(loaded, ids, args.max_new_tokens)
        if method == "prompt_lookup":
            return hf_generate(loaded, ids, args.max_new_tokens, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
        if method == "oracle":
            return engine_generate(engine, ids, configs[method], draft_source=OracleDraft(len(ids), references[i]))
        pool = pools.resolve(prompt.pool_key) if configs[method].drafting else None
        return engine_generate(engine, ids, configs[method], pool)

    console = Console(width=150)
    total = args.repeats * len(chosen)
    from tqdm import tqdm

    with tqdm(total=total, desc="prompts x repeats", unit="prompt") as bar:
        for repeat in range(args.repeats):
            for i in range(len(chosen)):
                order = METHODS if (i + repeat) % 2 == 0 else tuple(reversed(METHODS))
                rates = {}
                for method in order:
                    t0 = time.perf_counter()
                    tokens, steps = call(method, i)
                    wall = time.perf_counter() - t0
                    stats[method].add(repeat, len(tokens), steps, wall)
                    outputs[method][i] = tokens
                    rates[method] = len(tokens) / wall if wall > 0 else 0.0
                for method in METHODS:
                    if rates["greedy"] > 0:
                        paired[method].append(rates[method] / rates["greedy"])
                bar.update(1)

    results = {m: stats[m].summary() for m in METHODS}
    greedy_tps = results["greedy"]["tokens_per_s"]
    for m in METHODS:
        results[m]["speedup_vs_greedy"] = results[m]["tokens_per_s"] / greedy_tps if greedy_tps else 0.0
        ratios = sorted(paired[m])
        results[m]["paired_speedup_median"] = statistics.median(ratios) if ratios else 0.0
        results[m]["paired_speedup_iqr"] = ([ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]
                                            if ratios else [0.0, 0.0])
    results["strict"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["strict"], references))
    results["prompt_lookup"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["prompt_lookup"], references))
    results["engine_greedy"]["identical_to_greedy"] = all(o == r for o, r in zip(outputs["engine_greedy"], references))
    results["relaxed"]["token_agreement"] = sum(
        token_agreement(o, r) for o, r in zip(outputs["relaxed"], references)) / max(len(chosen), 1)
    results["relaxed"]["mean_logprob"] = sum(
        mean_logprob(loaded, ids, o) for ids, o in zip(tokenized, outputs["relaxed"])) / max(len(chosen), 1)
    results["greedy"]["mean_logprob"] = sum(
        mean_logprob(loaded, ids, o) for ids, o in zip(tokenized, references)) / max(len(chosen), 1)
    oracle_tps = results["oracle"]["tokens_per_s"]
    results["strict"]["fraction_of_oracle"] = results["strict"]["tokens_per_s"] / oracle_tps if oracle_tps else 0.0
    sweep = relaxed_sweep(engine, loaded, pools, chosen, tokenized, references, args) if args.sweep else []
    report = {
        "device": device_name(),
        "model": loaded.model_id,
        "model_path": str(args.model_path),
        "random_weights": loaded.random_weights,
        "prompts": len(chosen),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "decoding_length": args.decoding_length,
        "branch_length": args.branch_length,
        "methods": results,
        "relaxed_sweep": sweep,
    }
    print_table(console, report)
    path = write_results("decode.json", report, args.results_dir)
    if sweep:
        plot_sweep(sweep, results["greedy"]["tokens_per_s"], args.results_dir / "decode_relaxed.png")
    console.print(f"wrote {path}")
    return report


def relaxed_sweep(engine, loaded, pools, chosen, tokenized, references, args) -> list[dict]:
    """Speed against agreement with greedy over relaxed knobs (top_k, min_prob); strict is (1, 0)."""
    points = []
    grid = [(1, 0.0), (2, 0.3), (2, 0.1), (2, 0.05), (3, 0.05), (4, 0.02)]
    for top_k, min_prob in grid:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=loaded.tokenizer.eos_token_id,
                                  mode="strict" if top_k == 1 else "relaxed", relaxed_top_k=max(top_k, 1),
                                  relaxed_min_prob=min_prob)
        tokens = steps = 0
        wall = agreement = 0.0
        for prompt, ids, ref in zip(chosen, tokenized, references):
            t0 = time.perf_counter()
            out, n = engine_generate(engine, ids, config, pools.resolve(prompt.pool_key))
            wall += time.perf_counter() - t0
            tokens += len(out)
            steps += n
            agreement += token_agreement(out, ref)
        points.append({"top_k": top_k, "min_prob": min_prob, "tokens_per_s": tokens / wall,
                       "mean_accepted_per_step": tokens / max(steps, 1),
                       "token_agreement": agreement / max(len(chosen), 1)})
    return points


def plot_sweep(points: list[dict], greedy_tps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["token_agreement"] for p in points]
    ys = [p["tokens_per_s"] / greedy_tps for p in points]
    ax.plot(xs, ys, "o-")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"k={p['top_k']}, p>={p['min_prob']}", (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("token agreement with greedy")
    ax.set_ylabel("speedup vs greedy generate")
    ax.set_title("Relaxed verification: speed against drift")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"decode benchmark: {report['model']} on {report['device']}, {report['prompts']} prompts "
                        f"x {report['repeats']} repeats, {report['max_new_tokens']} new tokens")
    for column in ("method", "tokens/s", "spread (min-max)", "x greedy", "x greedy paired (IQR)", "tokens/step",
                   "steps", "notes"):
        table.add_column(column, justify="left" if column in ("method", "notes") else "right")
    for name, m in report["methods"].items():
        notes = []
        if "identical_to_greedy" in m:
            notes.append("identical" if m["identical_to_greedy"] else "DIFFERS from greedy")
        if "token_agreement" in m:
            notes.append(f"agreement {m['token_agreement']:.3f}")
        if "fraction_of_oracle" in m:
            notes.append(f"{m['fraction_of_oracle']:.2f} of oracle")
        s = m["tokens_per_s_spread"]
        table.add_row(name, f"{m['tokens_per_s']:.1f}", f"{s['min']:.1f}-{s['max']:.1f}",
                      f"{m['speedup_vs_greedy']:.2f}",
                      f"{m['paired_speedup_median']:.2f} ({m['paired_speedup_iqr'][0]:.2f}-{m['paired_speedup_iqr'][1]:.2f})",
                      f"{m['mean_accepted_per_step']:.2f}", str(m["steps"]),
                      ", ".join(notes))
    console.print(table)
    if report["random_weights"]:
        console.print("[bold red]model has RANDOM weights: acceptance figures mean nothing[/]")
    for p in report["relaxed_sweep"]:
        console.print(f"  relaxed top_k={p['top_k']} min_prob={p['min_prob']}: {p['tokens_per_s']:.1f} tok/s, "
                      f"{p['mean_accepted_per_step']:.2f} tok/step, agreement {p['token_agreement']:.3f}")


def parse_args(argv: list[str] | None = None):
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--model-path", type=Path, default=None, help="default: <data-dir>/models/default")
    parser.add_argument("--workload", type=Path, default=None, help="default: <data-dir>/workload/prompts.jsonl")
    parser.add_argument("--prompts", type=int, default=12 if quick else 40)
    parser.add_argument("--max-new-tokens", type=int, default=64 if quick else 96)
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--decoding-length", type=int, default=16)
    parser.add_argument("--branch-length", type=int, default=8)
    parser.add_argument("--relaxed-top-k", type=int, default=2)
    parser.add_argument("--relaxed-min-prob", type=float, default=0.1)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.model_path = args.model_path or args.data_dir / "models" / "default"
    args.workload = args.workload or args.data_dir / "workload" / "prompts.jsonl"
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
