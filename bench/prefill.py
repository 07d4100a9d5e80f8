"""make bench-prefill: time to first token with beyond-prefix block reuse against full prefill and
prefix caching, same run, same prompts, methods interleaved.

Prompts: generative-rec prompts of the workload ([instruction][user history][items...][question]),
grown or cut to about 1k, 2k and 4k tokens with more candidate items of the same category taken
from other rec prompts (items recur across prompts by popularity, as in the catalog). 50 items
make about 2.9k tokens, so a 4k prompt holds about 70. The model's max_position_embeddings is
4096: a "4k" prompt is cut to 4096 - 32 - 1 tokens so that 32 generated tokens still fit.

Warm-up, as in production: before a prompt is measured, two other prompts are served, one of the
same user with other candidates (its user history block is then cached, and prefix caching gets
[instruction][user history] as an exact shared prefix) and one of another user with the measured
prompt's items in another order (its item blocks are cached, at other positions).

Methods (TTFT = prompt given -> first token out of the engine, lookups and assembly included):
  full             the engine prefills the whole prompt
  prefix           longest block-aligned prefix shared with an earlier prompt reused as is
                   (vLLM / SGLang prefix caching), the rest prefilled
  reuse            cached blocks re-rotated and concatenated, no correction
  reuse_recompute  + CacheBlend selective recompute (15% of reused tokens, check layer 1)
  epic             + EPIC: the first 16 tokens of every reused block recomputed
Accuracy against full prefill: top-1 agreement and KL(full || method) of the first-token
distribution, and agreement of the first 32 greedy tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import DynamicCache

from adaccel.v1 import common_pb2
from bench.common import (
    add_model_arguments,
    parse_model_bench_args,
    quick_run,
    spread,
    write_results,
)
from common.blocks.calibration import kl_nats
from common.machine import device_name
from common.modeling.dtypes import serving_dtype
from common.modeling.loading import LoadedModel, load_model
from common.prompt_tokens import TokenizedPrompt, tokenize_chat
from common.workload.export import load_prompts
from kernels.backend import resolve_backend
from services.decoder.block_cache import BlockCache, LocalBlockMemory, ReuseSettings
from services.decoder.engine import DecodingEngine, GenerationConfig

METHODS = ("full", "prefix", "reuse", "reuse_recompute", "epic")
BLOCK_MODE = {"reuse": "reuse", "reuse_recompute": "cacheblend", "epic": "epic"}
KIND = {"instruction": common_pb2.BLOCK_KIND_INSTRUCTION, "user_history": common_pb2.BLOCK_KIND_USER_HISTORY,
        "item": common_pb2.BLOCK_KIND_ITEM, "text": common_pb2.BLOCK_KIND_TEXT}
GENERATED = 32


@dataclass
class BenchPrompt:
    blocks: list[common_pb2.PromptBlock]
    tokenized: TokenizedPrompt
    warmups: list[list[common_pb2.PromptBlock]]


def as_blocks(blocks) -> list[common_pb2.PromptBlock]:
    return [common_pb2.PromptBlock(id=b.id, kind=KIND[b.kind], text=b.text) for b in blocks]


def build_prompts(prompts, tokenizer, target: int, count: int, limit: int, rng: np.random.Generator
                  ) -> list[BenchPrompt]:
    """`count` prompts of about `target` tokens (at most `limit`), each with its warm-up prompts."""
    rec = [p for p in prompts if p.task == "generative_rec"]
    items_by_pool: dict[str, list] = {}
    for p in rec:
        for b in p.blocks:
            if b.kind == "item":
                items_by_pool.setdefault(p.pool_key, []).append(b)  # repeats = popularity
    by_user: dict[str, list] = {}
    for p in rec:
        by_user.setdefault(p.user_ids[0], []).append(p)
    out = []
    for p in rng.permutation(len(rec)).tolist():
        base = rec[p]
        instr, history, question = base.blocks[0], base.blocks[1], base.blocks[-1]
        items = list(base.blocks[2:-1])
        seen = {b.id for b in items}
        pool = items_by_pool[base.pool_key]
        fixed = len(tokenize_chat(tokenizer, [instr.text, history.text, question.text], 1).token_ids)
        sizes = [len(tokenizer(b.text, add_special_tokens=False)["input_ids"]) for b in items]
        while fixed + sum(sizes) < target:
            extra = pool[int(rng.integers(len(pool)))]
            if extra.id in seen:
                if len(seen) >= len({b.id for b in pool}):
                    break
                continue
            seen.add(extra.id)
            items.append(extra)
            sizes.append(len(tokenizer(extra.text, add_special_tokens=False)["input_ids"]))
        while items and fixed + sum(sizes) > min(target, limit):
            items.pop()
            sizes.pop()
        if fixed + sum(sizes) < 0.9 * target or len(items) < 2:
            continue  # the category has too few items for this size
        blocks = as_blocks([instr, history, *items, question])
        # Warm-up 1: same user, other candidates (user history cached; shared prefix for prefix caching).
        others = [b for b in pool if b.id not in seen][:8] or items[:1]
        same_user = as_blocks([instr, history, *others, question])
        # Warm-up 2: another user, the same items in another order (item blocks cached elsewhere).
        other_user = next((q.blocks[1] for q in rec if q.user_ids[0] != base.user_ids[0]), history)
        shuffled = [items[i] for i in rng.permutation(len(items))]
        other = as_blocks([instr, other_user, *shuffled, question])
        tokenized = tokenize_chat(tokenizer, [b.text for b in blocks], 1)
        out.append(BenchPrompt(blocks, tokenized, [same_user, other]))
        if len(out) == count:
            break
    return out


class PrefixCache:
    """Prefix caching as vLLM / SGLang do it: the KV of earlier prompts, reusable only for the
    longest block-aligned prefix a new prompt shares with one of them."""

    def __init__(self):
        self.entries: list[tuple[list[int], list[tuple[int, int]], DynamicCache]] = []

    @torch.inference_mode()
    def add(self, model, tokenized: TokenizedPrompt) -> None:
        out = model(input_ids=torch.tensor([tokenized.token_ids], device=model.device), use_cache=True,
                    logits_to_keep=1)
        self.entries.append((tokenized.token_ids, tokenized.spans, out.past_key_values))

    def lookup(self, tokenized: TokenizedPrompt) -> tuple[int, DynamicCache | None]:
        """(shared length, a copy of the cache cut to it); the copy stands in for paged blocks."""
        best, best_cache = 0, None
        for ids, spans, cache in self.entries:
            shared = 0
            for (start, end), (s2, e2) in zip(tokenized.spans, spans):
                if (start, end) != (s2, e2) or tokenized.token_ids[start:end] != ids[start:end]:
                    break
                shared = end
            if shared > best:
                best, best_cache = shared, cache
        if best_cache is None:
            return 0, None
        cache = copy.deepcopy(best_cache)
        cache.crop(best - cache.get_seq_length())  # transformers 5 crops by a negative count
        return best, cache


@torch.inference_mode()
def first_token_logits(model, prompt_ids: list[int], cache: DynamicCache | None) -> torch.Tensor:
    """Next-token logits after the prompt, from `cache` as the engine uses it (last token re-run)."""
    if cache is None:
        out = model(input_ids=torch.tensor([prompt_ids], device=model.device), logits_to_keep=1)
        return out.logits[0, -1].float()
    cache = copy.deepcopy(cache)
    reused = cache.get_seq_length()
    if reused >= len(prompt_ids):
        cache.crop(len(prompt_ids) - 1 - reused)
        reused = len(prompt_ids) - 1
    rest = prompt_ids[reused:]
    positions = torch.arange(reused, len(prompt_ids), device=model.device)[None]
    out = model(input_ids=torch.tensor([rest], device=model.device), position_ids=positions, past_key_values=cache, logits_to_keep=1)
    return out.logits[0, -1].float()


def run_method(method, prompt: BenchPrompt, engine, block_cache: BlockCache, prefix: PrefixCache,
               config: GenerationConfig, generate_all: bool):
    """(ttft_s, tokens, (cached, computed, recomputed) prompt tokens)."""
    ids = prompt.tokenized.token_ids
    cache, cached, computed, recomputed = None, 0, len(ids), 0
    if method == "prefix":
        shared, cache = prefix.lookup(prompt.tokenized)  # the copy is outside the clock
    t0 = time.perf_counter()
    if method == "prefix":
        cached, computed = shared, len(ids) - shared
    elif method in BLOCK_MODE:
        block_cache.mode = BLOCK_MODE[method]
        prepared = block_cache.prepare(prompt.tokenized, prompt.blocks)
        cache, cached, computed, recomputed = (prepared.past_key_values, prepared.cached_tokens,
                                               prepared.computed_tokens, prepared.recomputed_tokens)
    steps = engine.generate(ids, config, past_key_values=cache)
    tokens = list(next(steps).token_ids)
    ttft = time.perf_counter() - t0
    if generate_all:
        for step in steps:
            tokens.extend(step.token_ids)
    return ttft, tokens, (cached, computed, recomputed)


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded: LoadedModel = load_model(args.model_path, device=args.device, dtype=serving_dtype(args.dtype, args.device))
    max_positions = loaded.model.config.max_position_embeddings
    limit = min(args.max_prompt_tokens, max_positions - GENERATED - 1)
    prompts, _ = load_prompts(args.workload)
    rng = np.random.default_rng(args.seed)
    sizes = [min(s, limit) for s in args.sizes]
    bench_prompts = {size: build_prompts(prompts, loaded.tokenizer, size, args.prompts, limit, rng) for size in sizes}
    engine = DecodingEngine(loaded.model)
    config = GenerationConfig(max_new_tokens=GENERATED, eos_token_id=None)
    settings = ReuseSettings(mode="cacheblend", recompute_ratio=args.recompute_ratio, epic_tokens=args.epic_tokens,
                             kernel_backend=resolve_backend("auto", args.device))
    block_cache = BlockCache(loaded.model, loaded.tokenizer, loaded.blocks_model_id, settings,
                             LocalBlockMemory(4 << 30, 1 << 30), None)
    prefix = PrefixCache()
    console = Console(width=160)
    records = {size: {m: {"ttft": [], "top1": [], "kl": [], "agree32": [], "cached": [], "computed": [],
                          "recomputed": [], "vs_prefix": [], "vs_full": []} for m in METHODS} for size in sizes}
    total = sum(len(v) for v in bench_prompts.values()) * args.repeats
    with tqdm(total=total, desc="prompts x repeats", unit="prompt") as bar:
        for size in sizes:
            for prompt in bench_prompts[size]:
                for warm in prompt.warmups:  # served before: their blocks published, their KV in the prefix cache
                    tokenized = tokenize_chat(loaded.tokenizer, [b.text for b in warm], 1)
                    block_cache.prepare(tokenized, warm)
                    prefix.add(loaded.model, tokenized)
                block_cache.flush(600)
                ids = prompt.tokenized.token_ids
                ref_logits = first_token_logits(loaded.model, ids, None)
                ref_tokens = None
                for repeat in range(args.repeats):
                    order = METHODS if repeat % 2 == 0 else tuple(reversed(METHODS))
                    ttfts = {}
                    for method in order:
                        ttft, tokens, counts = run_method(
                            method, prompt, engine, block_cache, prefix, config, generate_all=repeat == 0)
                        ttfts[method] = ttft
                        rec = records[size][method]
                        rec["ttft"].append(ttft)
                        if repeat == 0:
                            cached, computed, recomputed = counts
                            rec["cached"].append(cached)
                            rec["computed"].append(computed + recomputed)
                            rec["recomputed"].append(recomputed)
                            if method == "full":
                                ref_tokens = tokens
                            rec.setdefault("tokens", []).append(tokens)
                            if method in BLOCK_MODE:  # the same assembly again (deterministic), untimed
                                block_cache.mode = BLOCK_MODE[method]
                                again = block_cache.prepare(prompt.tokenized, prompt.blocks)
                                logits = first_token_logits(loaded.model, ids, again.past_key_values)
                            elif method == "prefix":
                                logits = first_token_logits(loaded.model, ids, prefix.lookup(prompt.tokenized)[1])
                            else:
                                logits = ref_logits
                            rec["top1"].append(float(logits.argmax() == ref_logits.argmax()))
                            rec["kl"].append(max(float(kl_nats(ref_logits[None], logits[None])[0]), 0.0))
                    for method in METHODS:
                        records[size][method]["vs_prefix"].append(ttfts["prefix"] / ttfts[method])
                        records[size][method]["vs_full"].append(ttfts["full"] / ttfts[method])
                    bar.update(1)
                for method in METHODS:
                    tokens = records[size][method]["tokens"][-1]
                    records[size][method]["agree32"].append(
                        sum(a == b for a, b in zip(tokens, ref_tokens)) / max(len(ref_tokens), 1))
    results = []
    for size in sizes:
        n_tokens = [len(p.tokenized.token_ids) for p in bench_prompts[size]]
        methods = {}
        for method in METHODS:
            r = records[size][method]
            methods[method] = {
                "ttft_s": statistics.median(r["ttft"]),
                "ttft_spread_s": spread(r["ttft"]),
                "computed_tokens": round(statistics.fmean(r["computed"])),
                "cached_tokens": round(statistics.fmean(r["cached"])),
                "recomputed_tokens": round(statistics.fmean(r["recomputed"])),
                "top1_agreement": statistics.fmean(r["top1"]),
                "kl": statistics.fmean(r["kl"]),
                "kl_max": max(r["kl"]),
                "agreement_32_tokens": statistics.fmean(r["agree32"]),
                "speedup_vs_prefix_paired_median": statistics.median(r["vs_prefix"]),
                "speedup_vs_full_paired_median": statistics.median(r["vs_full"]),
            }
        results.append({"prompt_tokens": round(statistics.fmean(n_tokens)), "target_tokens": size,
                        "prompts": len(n_tokens), "prompt_tokens_range": [min(n_tokens), max(n_tokens)],
                        "methods": methods})
    report = {
        "device": device_name(),
        "model": loaded.model_id,
        "model_path": str(args.model_path),
        "random_weights": loaded.random_weights,
        "max_position_embeddings": max_positions,
        "repeats": args.repeats,
        "recompute_ratio": args.recompute_ratio,
        "epic_tokens": args.epic_tokens,
        "generated_tokens": GENERATED,
        "results": results,
    }
    print_table(console, report)
    path = write_results("prefill.json", report, args.results_dir)
    console.print(f"wrote {path}")
    return report


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"prefill benchmark: {report['model']} on {report['device']}, {report['repeats']} repeats "
                        "(TTFT median; speedups paired per prompt and repeat)")
    for column in ("tokens", "method", "TTFT ms", "x prefix", "x full", "cached", "computed", "top-1", "KL",
                   "32-tok agree"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for entry in report["results"]:
        for name, m in entry["methods"].items():
            table.add_row(f"{entry['prompt_tokens']} ({entry['prompts']})", name, f"{m['ttft_s'] * 1000:.1f}",
                          f"{m['speedup_vs_prefix_paired_median']:.2f}", f"{m['speedup_vs_full_paired_median']:.2f}",
                          str(m["cached_tokens"]), str(m["computed_tokens"]), f"{m['top1_agreement']:.3f}",
                          f"{m['kl']:.4f}", f"{m['agreement_32_tokens']:.3f}")
    console.print(table)
    if report["random_weights"]:
        console.print("[bold red]model has RANDOM weights: accuracy figures mean nothing[/]")


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--prompts", type=int, default=2 if quick else 8, help="prompts per size")
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--recompute-ratio", type=float, default=0.15)
    parser.add_argument("--epic-tokens", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    return parse_model_bench_args(parser, argv, threads=1)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
