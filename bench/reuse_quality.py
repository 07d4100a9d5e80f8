"""make bench-reuse-quality: how well each block-reuse mode keeps the answer on a model, against
how much of prefill it saves: the speed against quality curve, and a deviation profile.

Prompts are bench-prefill's generative-recommendation prompts at about 1k / 2k / 4k tokens
([instruction][user history][items...][question] through the chat template). For each prompt, every
block but the question is cached, and the assembled prompt is compared with full prefill:

  full             plain prefill (the reference)
  prefix           prefix caching: [instruction][user history] reused exactly, the items prefilled
  reuse            cached blocks re-rotated and concatenated, no correction
  cacheblend R     + CacheBlend's selective recompute of the share R of reused tokens (check layer 1)
  epic K           + EPIC: the first K tokens of every reused block recomputed

each with blocks cached two ways (--contexts):
  standalone       each block computed alone at positions [0, n): what the decoder stores today
  instruction      each block computed right after the prompt's instruction block (so it does not
                   turn its own first token into an attention sink, and the user history, which
                   follows the instruction directly, is exact)

Accuracy against full prefill: first-token top-1 and KL(full || method), agreement of the first
--generated greedy tokens, and the ads check: whether the answer names the same candidate items,
in the same order, as full prefill's answer does within those tokens (common/workload/answer_checks.py).
Speed: time to the first token (assembly or prefill, lookups excluded, on the model's thread) as a
ratio to prefix caching's in the same prompt, and the share of token-layers computed.

Deviation profile (one prompt per size): per layer, the relative L2 error of the reused values
(and keys, after re-rotation) of item tokens against full prefill's, for both contexts.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from tqdm import tqdm

from bench.common import (
    add_model_arguments,
    bench_parser,
    figure,
    parse_model_bench_args,
    quick_run,
    results_table,
    save_figure,
    spread,
    write_results,
)
from bench.prefill import build_prompts
from common.blocks.assembly import Assembly, BlockKV, assemble, compute_block_kv
from common.blocks.calibration import continuation_logits, kl_nats
from common.blocks.rope import rerotate_keys, rope_spec
from common.machine import device_name
from common.modeling.dtypes import serving_dtype
from common.modeling.loading import load_model
from common.workload.answer_checks import candidate_from_block, recommended_items
from common.workload.export import load_prompts

CONTEXTS = ("standalone", "instruction")


@dataclass(frozen=True)
class Method:
    name: str  # "reuse", "cacheblend 0.15", "epic 16"
    mode: str
    recompute_ratio: float = 0.0
    epic_tokens: int = 0

    def run(self, model, blocks, tail) -> Assembly:
        return assemble(model, blocks, tail, mode=self.mode, recompute_ratio=self.recompute_ratio,
                        epic_tokens=self.epic_tokens)


def reuse_methods(ratios, epic_tokens) -> list[Method]:
    return ([Method("reuse", "reuse")] + [Method(f"cacheblend {r:g}", "cacheblend", recompute_ratio=r) for r in ratios]
            + [Method(f"epic {k}", "epic", epic_tokens=k) for k in epic_tokens])


@torch.inference_mode()
def prefix_caching(model, ids: list[int], shared: int) -> tuple[float, torch.Tensor, object]:
    """(seconds, last logits [1, V], cache): the first `shared` tokens' KV reused exactly (computed
    outside the clock), the rest prefilled."""
    cache = model(input_ids=torch.tensor([ids[:shared]], device=model.device), use_cache=True).past_key_values
    start = time.perf_counter()
    out = model(input_ids=torch.tensor([ids[shared:]], device=model.device),
                position_ids=torch.arange(shared, len(ids), device=model.device)[None], past_key_values=cache,
                logits_to_keep=1)
    return time.perf_counter() - start, out.logits[:, -1].float(), out.past_key_values


def cached_blocks(model, blocks_ids: list[list[int]], context: str) -> list[BlockKV]:
    standalone0 = compute_block_kv(model, blocks_ids[0])
    if context == "standalone":
        return [standalone0] + [compute_block_kv(model, ids) for ids in blocks_ids[1:]]
    return [standalone0] + [compute_block_kv(model, ids, context=standalone0) for ids in blocks_ids[1:]]


def relative_errors(full_cache, kvs: list[BlockKV], spans, spec, first_item: int) -> dict[str, list[float]]:
    """Per layer, mean relative L2 error over item tokens of reused keys / values vs full prefill's."""
    out = {"key": [], "value": []}
    for layer in range(len(kvs[0].keys)):
        k_err, v_err = [], []
        for (start, end), kv in list(zip(spans, kvs))[first_item:]:
            k_ref = full_cache.layers[layer].keys[:, :, start:end]  # [1, Hkv, n, D]
            v_ref = full_cache.layers[layer].values[:, :, start:end]
            k = rerotate_keys(kv.keys[layer], start - kv.base_position, spec)
            k_err.append(((k - k_ref).norm(dim=(1, 3)) / k_ref.norm(dim=(1, 3)))[0])  # [n]
            v_err.append(((kv.values[layer] - v_ref).norm(dim=(1, 3)) / v_ref.norm(dim=(1, 3)))[0])
        out["key"].append(float(torch.cat(k_err).mean()))
        out["value"].append(float(torch.cat(v_err).mean()))
    return out


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model_path, device=args.device, dtype=serving_dtype(args.dtype, args.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    limit = min(args.max_prompt_tokens, model.config.max_position_embeddings - args.generated - 1)
    prompts, _ = load_prompts(args.workload)
    rng = np.random.default_rng(args.seed)
    sizes = [min(s, limit) for s in args.sizes]
    bench_prompts = {s: build_prompts(prompts, tokenizer, s, args.prompts, limit, rng) for s in sizes}
    for size in [s for s in sizes if not bench_prompts[s]]:
        print(f"no generative-rec prompt of about {size} tokens can be built from the workload: size skipped")
    sizes = [s for s in sizes if bench_prompts[s]]
    methods = reuse_methods(args.cacheblend_ratios, args.epic_tokens)
    spec = rope_spec(model)
    n_layers = model.config.num_hidden_layers
    names = ["full", "prefix"] + [f"{m.name} / {c}" for c in args.contexts for m in methods]
    records = {s: {n: {"ttft": [], "vs_prefix": [], "computed_share": [], "top1": [], "kl": [], "agree": [],
                       "same_items": []} for n in names} for s in sizes}
    profiles = {}
    total = sum(len(v) for v in bench_prompts.values())
    with tqdm(total=total, desc="prompts", unit="prompt") as bar:
        for size in sizes:
            for index, prompt in enumerate(bench_prompts[size]):
                ids = prompt.tokenized.token_ids
                spans = prompt.tokenized.spans
                blocks_ids = [ids[s:e] for s, e in spans[:-1]]
                tail = ids[spans[-1][0]:]
                candidates = [c for b in prompt.blocks if (c := candidate_from_block(b.text)) is not None]

                def answer(cache, last_logits) -> tuple[list[int], list[str]]:
                    """Greedy tokens from a prompt's cache, and the candidates they name (grows `cache`)."""
                    _, tokens = continuation_logits(model, cache, last_logits, len(ids), args.generated)
                    tokens = tokens.tolist()
                    return tokens, recommended_items(tokenizer.decode(tokens), candidates)

                def score(name, seconds, computed_share, last_logits, tokens, items):
                    ref_logits, ref_tokens, ref_items = ref
                    rec = records[size][name]
                    rec["ttft"].append(seconds)
                    rec["computed_share"].append(computed_share)
                    rec["top1"].append(float(last_logits.argmax() == ref_logits.argmax()))
                    rec["kl"].append(max(float(kl_nats(ref_logits, last_logits)[0]), 0.0))
                    rec["agree"].append(sum(a == b for a, b in zip(tokens, ref_tokens)) / len(ref_tokens))
                    rec["same_items"].append(float(items == ref_items))

                start = time.perf_counter()
                full = assemble(model, [(b, None) for b in blocks_ids], tail, mode="full")
                full_s = time.perf_counter() - start
                # Greedy decoding appends to full.cache; the deviation profile below reads prompt positions only.
                ref = (full.last_logits, *answer(full.cache, full.last_logits))
                score("full", full_s, 1.0, *ref)  # the reference against itself: top-1 1, KL 0
                shared = spans[1][1]  # [instruction][user history]: the same user came before
                seconds, logits, cache = prefix_caching(model, ids, shared)
                score("prefix", seconds, (len(ids) - shared) / len(ids), logits, *answer(cache, logits))
                prefix_s = seconds
                for context in args.contexts:
                    kvs = cached_blocks(model, blocks_ids, context)
                    if index == 0:
                        profiles.setdefault(str(size), {})[context] = relative_errors(full.cache, kvs, spans[:-1],
                                                                                      spec, first_item=2)
                    for method in methods:
                        start = time.perf_counter()
                        out = method.run(model, list(zip(blocks_ids, kvs, strict=True)), tail)
                        seconds = time.perf_counter() - start
                        name = f"{method.name} / {context}"
                        score(name, seconds, out.stats.token_layers / (len(ids) * n_layers), out.last_logits,
                              *answer(out.cache, out.last_logits))
                        records[size][name]["vs_prefix"].append(prefix_s / seconds)
                records[size]["prefix"]["vs_prefix"].append(1.0)
                records[size]["full"]["vs_prefix"].append(prefix_s / full_s)
                bar.update(1)
    results = []
    for size in sizes:
        n_tokens = [len(p.tokenized.token_ids) for p in bench_prompts[size]]
        rows = {}
        for name in names:
            r = records[size][name]
            rows[name] = {
                "ttft_s": statistics.median(r["ttft"]), "ttft_spread_s": spread(r["ttft"]),
                "speedup_vs_prefix_median": statistics.median(r["vs_prefix"]),
                "computed_token_layers_share": statistics.fmean(r["computed_share"]),
                "top1_agreement": statistics.fmean(r["top1"]), "kl": statistics.fmean(r["kl"]),
                "kl_max": max(r["kl"]), "agreement_tokens": statistics.fmean(r["agree"]),
                "same_recommended_items": statistics.fmean(r["same_items"]),
            }
        results.append({"prompt_tokens": round(statistics.fmean(n_tokens)), "target_tokens": size,
                        "prompts": len(n_tokens), "prompt_tokens_range": [min(n_tokens), max(n_tokens)],
                        "methods": rows})
    report = {"device": device_name(), "model": loaded.model_id, "model_path": str(args.model_path),
              "random_weights": loaded.random_weights, "generated_tokens": args.generated,
              "contexts": list(args.contexts), "results": results, "deviation_profile": profiles}
    console = Console(width=170)
    print_table(console, report)
    path = write_results("reuse_quality.json", report, args.results_dir)
    plot(report, args.results_dir / "reuse_quality.png")
    console.print(f"wrote {path} and reuse_quality.png")
    return report


def print_table(console: Console, report: dict) -> None:
    table = results_table(
        f"block reuse quality: {report['model']} on {report['device']} (against full prefill; "
        f"{report['generated_tokens']} greedy tokens)",
        ("tokens", "method / blocks", "TTFT ms", "x prefix", "computed", "top-1", "KL", "agree", "same items"))
    for entry in report["results"]:
        for name, m in entry["methods"].items():
            table.add_row(f"{entry['prompt_tokens']} ({entry['prompts']})", name, f"{m['ttft_s'] * 1000:.0f}",
                          f"{m['speedup_vs_prefix_median']:.2f}", f"{m['computed_token_layers_share']:.2f}",
                          f"{m['top1_agreement']:.2f}", f"{m['kl']:.3f}", f"{m['agreement_tokens']:.2f}",
                          f"{m['same_recommended_items']:.2f}")
    console.print(table)
    for size, by_context in report["deviation_profile"].items():
        for context, errs in by_context.items():
            values = errs["value"]
            picks = sorted({0, len(values) // 4, len(values) // 2, 3 * len(values) // 4, len(values) - 1})
            console.print(f"deviation profile {size} tokens, {context} blocks: value error by layer "
                          + ", ".join(f"L{i} {values[i]:.2f}" for i in picks))
    if report["random_weights"]:
        console.print("[bold red]model has RANDOM weights: accuracy figures mean nothing[/]")


def plot(report: dict, path: Path) -> None:
    fig, axes = figure(1, 3, size=(16, 4.5))
    for entry in report["results"]:
        for context in report["contexts"]:
            points = [(m["speedup_vs_prefix_median"], m["kl"], m["same_recommended_items"], name)
                      for name, m in entry["methods"].items() if name.endswith(f"/ {context}")]
            label = f"{entry['prompt_tokens']} tok, {context}"
            axes[0].plot([p[0] for p in points], [p[1] for p in points], "o", label=label)
            axes[1].plot([p[0] for p in points], [p[2] for p in points], "o", label=label)
    axes[0].set(xlabel="TTFT speedup vs prefix caching", ylabel="first-token KL vs full prefill (nats)",
                title="speed against first-token divergence")
    axes[1].set(xlabel="TTFT speedup vs prefix caching", ylabel="same recommended items as full prefill",
                title="speed against the ads check")
    axes[1].axhline(0.95, color="grey", linestyle=":", linewidth=1)  # the target
    for ax in axes[:2]:
        ax.axvline(5.0, color="grey", linestyle=":", linewidth=1)  # 5x prefix caching
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 40], labels=["1", "2", "5", "10", "20", "40"])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    for size, by_context in report["deviation_profile"].items():
        for context, errs in by_context.items():
            axes[2].plot(errs["value"], label=f"{size} tok, {context}")
    axes[2].set(xlabel="layer", ylabel="relative error of reused values (item tokens)", title="deviation profile")
    axes[2].legend(fontsize=7)
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = bench_parser("bench.reuse_quality", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--prompts", type=int, default=1 if quick else 3, help="prompts per size")
    parser.add_argument("--cacheblend-ratios", type=float, nargs="*", default=[0.05, 0.10, 0.15, 0.20])
    parser.add_argument("--epic-tokens", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--contexts", nargs="+", choices=CONTEXTS, default=list(CONTEXTS))
    parser.add_argument("--generated", type=int, default=32, help="greedy tokens compared per answer")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    return parse_model_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
