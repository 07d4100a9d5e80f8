"""make bench-pool-growth: accepted tokens per step as pools fill with served answers.

A deployment's pools start from the corpus and then take in every answer the decoders publish
(the Kafka loop). This bench grows them the same way, in steps: after each step (0, 1, 3, 10,
30 answers per pool key and task, cumulative), strict decoding of the same held-out prompts
(items and users the pools never saw) measures accepted tokens per step by task. Counts are
deterministic (no timing): tokens per step is what the speedup follows (bench-decode measures
the speed at one pool state against greedy in the same run).

Writes bench/results/pool_growth.json and pool_growth.png.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import (
    RESULTS_DIR,
    add_model_arguments,
    bench_parser,
    figure,
    load_model_and_workload,
    prompt_token_ids,
    quick_run,
    resolve_model_arguments,
    save_figure,
    write_results,
)
from bench.decode import pick_prompts, serve_into_pools, tokens_per_step_by_task, warm_pools
from common.machine import device_name
from services.decoder.engine import DecodingEngine, EngineSettings


def run(args) -> dict:
    loaded, prompts, warmups = load_model_and_workload(args)
    settings = EngineSettings(decoding_length=args.decoding_length, branch_length=args.branch_length)
    engine = DecodingEngine(loaded.model, settings)
    pools = warm_pools(loaded, warmups, settings, args.branch_length)
    chosen = pick_prompts(prompts, args.prompts)
    tokenized = [prompt_token_ids(loaded.tokenizer, p) for p in chosen]
    eos = loaded.tokenizer.eos_token_id
    points, served_so_far, outputs = [], 0, 0
    for per_segment in args.steps:
        served = serve_into_pools(loaded, pools, prompts, per_segment, args.max_new_tokens, already=served_so_far, data_dir=args.data_dir)
        served_so_far = per_segment
        outputs += served["outputs"]
        by_task = tokens_per_step_by_task(engine, pools, chosen, tokenized, args.max_new_tokens, eos)
        points.append({"served_per_segment": per_segment, "served_answers": outputs, "tokens_per_step": by_task})
        print(f"{per_segment:>3} per segment ({outputs} answers): " + ", ".join(f"{t} {v:.2f}" for t, v in by_task.items()))
    report = {"device": device_name(), "model": loaded.model_id, "model_path": str(args.model_path),
              "prompts": len(chosen), "corpus_texts": len(warmups), "decoding_length": args.decoding_length,
              "branch_length": args.branch_length, "max_new_tokens": args.max_new_tokens, "points": points}
    print_table(Console(width=120), report)
    path = write_results("pool_growth.json", report, args.results_dir)
    plot(points, args.results_dir / "pool_growth.png", report["model"])
    print(f"wrote {path}")
    return report


def print_table(console: Console, report: dict) -> None:
    tasks = list(report["points"][0]["tokens_per_step"])
    table = Table(title=f"strict tokens/step as pools take in served answers ({report['prompts']} held-out prompts, "
                        f"{report['decoding_length']} x {report['branch_length']} drafts)")
    for column in ("per pool key and task", "answers", *tasks):
        table.add_column(column, justify="right")
    for point in report["points"]:
        table.add_row(str(point["served_per_segment"]), str(point["served_answers"]),
                      *(f"{point['tokens_per_step'][t]:.2f}" for t in tasks))
    console.print(table)


def plot(points: list[dict], path: Path, model: str) -> None:
    fig, ax = figure()
    answers = [p["served_answers"] for p in points]
    for task in points[0]["tokens_per_step"]:
        ax.plot(answers, [p["tokens_per_step"][task] for p in points], marker="o",
                linewidth=2.5 if task == "all" else 1.2, label=task)
    ax.set_xscale("symlog", linthresh=max(1, min((a for a in answers if a > 0), default=1)))
    ax.set_xticks(answers, [str(a) for a in answers])
    ax.minorticks_off()
    ax.set_xlabel("served answers in the pools (cumulative)")
    ax.set_ylabel("accepted tokens per step (strict)")
    ax.set_title(f"pools learning from traffic: {model}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = bench_parser("bench.pool_growth", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=12 if quick else 24)
    parser.add_argument("--max-new-tokens", type=int, default=64 if quick else 96)
    parser.add_argument("--steps", default="0,1,3" if quick else "0,1,3,10,30",
                        help="cumulative served answers per pool key and task at each point")
    parser.add_argument("--decoding-length", type=int, default=16)
    parser.add_argument("--branch-length", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    resolve_model_arguments(args)
    args.steps = sorted({int(v) for v in args.steps.split(",") if v.strip()})
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
