"""make bench-projection: what this acceptance would buy on a realistic model size - a PROJECTION.

The default model is 2.7M parameters: on a CPU its forward is mostly fixed cost, and a draft
tree costs ~1.8x a one-token step. A 0.5-1.5B model reads hundreds of MB of weights per
forward, so verifying 16 tokens costs little more than 1 (memory-bound), on a CPU as on a GPU.
This bench measures that cost curve for a random-weight model of a realistic configuration
(Qwen2-0.5B or TinyLlama-1.1B shapes; random weights, so no acceptance can be measured on it)
with the engine's own step (tree inputs, the forward the engine uses, verification, KV crop:
services/decoder/cost_profile.py), and combines it with the accepted tokens per step measured
on the default model (bench/results/decode.json's budget sweep):

    projected decode-phase speedup(budget) = tokens_per_step(budget) x cost(1) / cost(1 + budget)

where cost(1) is a greedy step. It ignores drafting and bookkeeping time (~1 ms per step on
this CPU, small against a big model's step) and assumes the big model accepts drafts as the
default model does: a projection, labelled as one everywhere it is printed or stored.

--device cuda --dtype bfloat16 is the GPU variant (the lent device, when a task has one).
Writes bench/results/projection[-<device>].json and a plot of the cost curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from bench.common import RESULTS_DIR, bench_parser, figure, quick_run, save_figure, write_results
from common.machine import device_name
from services.decoder.cost_profile import profile_step_costs

# Shapes of public checkpoints (no weights: random initialisation, nothing downloaded).
CONFIGS = {
    "qwen2-0.5b": lambda: Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                      max_position_embeddings=32768, tie_word_embeddings=True,
                                      use_sliding_window=False),
    "tinyllama-1.1b": lambda: LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                          max_position_embeddings=2048),
    # A smoke-test shape (tests and BENCH_QUICK): same code path, seconds instead of minutes.
    "tiny": lambda: Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                use_sliding_window=False),
}


def random_model(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    config = CONFIGS[name]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def measured_acceptance(decode_json: Path) -> tuple[list[dict], str]:
    """(decoding_length, branch_length, tokens/step) of each fixed budget in decode.json, and
    the model they were measured on."""
    report = json.loads(decode_json.read_text())
    settings = report.get("budget_sweep", {}).get("settings", [])
    if not settings:
        raise SystemExit(f"{decode_json} has no budget sweep: run make bench-decode first")
    return [{"decoding_length": s["decoding_length"], "branch_length": s["branch_length"],
             "tokens_per_step": s["mean_accepted_per_step"]} for s in settings], report.get("model", "")


def run(args) -> dict:
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    acceptance, source_model = measured_acceptance(args.decode_json)
    widths = sorted({1} | {1 + a["decoding_length"] for a in acceptance})
    started = time.perf_counter()
    model = random_model(args.config, args.device, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    built_s = time.perf_counter() - started
    timings = profile_step_costs(model, widths=widths, batches=(1,), cache_lengths=(args.cache_length,),
                                 repeats=args.repeats)
    cost = {t.width: t.seconds for t in timings}
    rows = []
    for a in acceptance:
        width = 1 + a["decoding_length"]
        rows.append({**a, "step_ms": cost[width] * 1e3, "cost_vs_greedy_step": cost[width] / cost[1],
                     "projected_decode_speedup": a["tokens_per_step"] * cost[1] / cost[width]})
    best = max(rows, key=lambda r: r["projected_decode_speedup"])
    report = {
        "kind": "PROJECTION: cost measured on a random-weight model, acceptance measured on the default model",
        "device": device_name() if args.device == "cpu" else f"{args.device}: {device_name()}",
        "config": args.config, "parameters": parameters, "dtype": args.dtype, "cache_length": args.cache_length,
        "model_built_s": built_s, "greedy_step_ms": cost[1] * 1e3,
        "cost_ms_by_width": {str(w): cost[w] * 1e3 for w in widths},
        "acceptance_from": {"file": str(args.decode_json), "model": source_model},
        "budgets": rows, "best": best,
    }
    print_table(Console(width=120), report)
    suffix = "" if args.device == "cpu" else f"-{args.device}"
    path = write_results(f"projection{suffix}.json", report, args.results_dir)
    plot(report, args.results_dir / f"projection{suffix}.png")
    print(f"wrote {path}")
    return report


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"PROJECTION, not a measurement of decoding: {report['config']} "
                        f"({report['parameters'] / 1e6:.0f}M params, random weights, {report['dtype']}) "
                        f"step cost x default-model acceptance; greedy step {report['greedy_step_ms']:.1f} ms "
                        f"at {report['cache_length']} cached tokens on {report['device']}")
    for column in ("budget", "tokens/step (default model)", "step ms", "x greedy step", "projected decode x greedy"):
        table.add_column(column, justify="right")
    for r in report["budgets"]:
        table.add_row(f"{r['decoding_length']} x {r['branch_length']}", f"{r['tokens_per_step']:.2f}",
                      f"{r['step_ms']:.1f}", f"{r['cost_vs_greedy_step']:.2f}", f"{r['projected_decode_speedup']:.2f}")
    console.print(table)


def plot(report: dict, path: Path) -> None:
    widths = [int(w) for w in report["cost_ms_by_width"]]
    costs = list(report["cost_ms_by_width"].values())
    fig, ax = figure()
    ax.plot(widths, [c / costs[0] for c in costs], marker="o")
    ax.set_xlabel("tokens verified in one step (root + draft)")
    ax.set_ylabel("step cost / greedy step")
    ax.set_title(f"verification cost, {report['config']} random weights ({report['dtype']}), "
                 f"{report['cache_length']} cached tokens", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = bench_parser("bench.projection", __doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny" if quick else "qwen2-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 on CPU; bfloat16 on a GPU")
    parser.add_argument("--cache-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2 if quick else 3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--decode-json", type=Path, default=RESULTS_DIR / "decode.json")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
