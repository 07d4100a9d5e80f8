"""python -m bench.publish_schedule: when the model's owner computes missed blocks for publishing.

The decoder's batcher thread is the model's one owner: besides prefill and steps it computes the
KV of every prompt block that missed the cache (standalone, at position 0) so that later requests
can reuse it. Policies, via Batcher(publish_every_steps=N), each also computing blocks while idle:
  idle           N = 0: blocks are computed only while no request runs
  every 16 steps N = 16: one block per 16 steps while requests run (the decoder's default)
  every step     N = 1: one block after every step
Scenario (per repeat, same prompts for every policy, policies interleaved): a fresh block cache in
pure reuse mode (so every cacheable block of a prompt either hits or is queued), `--running`
requests start together and, once they decode, `--arrivals` more arrive. Reported: decode speed
of the running requests (tokens after their first / seconds), TTFT of the arrivals, and how
long until every missed block was published (seconds from the first request).
Not a serving figure on its own (no gRPC, no router): it isolates what publishing on the model's
thread costs the requests beside it. Writes bench/results/publish_schedule.json and .png.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adaccel.v1 import common_pb2
from bench.common import (
    RESULTS_DIR,
    add_model_arguments,
    bench_parser,
    figure,
    load_model_and_workload,
    resolve_model_arguments,
    save_figure,
    spread,
    write_results,
)
from common.drafting.pools import PoolRegistry
from common.machine import device_name
from common.prompt_tokens import chat_frame
from services.decoder.batcher import Batcher, KvAdmission
from services.decoder.block_cache import BlockCache, LocalBlockMemory, ReuseSettings
from services.decoder.engine import DecodingEngine, EngineSettings
from services.decoder.intake import RequestIntake

POLICIES = {"idle": 0, "every 16 steps": 16, "every step": 1}
KIND = {"instruction": common_pb2.BLOCK_KIND_INSTRUCTION, "user_history": common_pb2.BLOCK_KIND_USER_HISTORY,
        "item": common_pb2.BLOCK_KIND_ITEM, "text": common_pb2.BLOCK_KIND_TEXT}


def as_request(prompt, max_new_tokens: int) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=prompt.prompt_id, pool_key=prompt.pool_key, task=prompt.task,
        blocks=[common_pb2.PromptBlock(id=b.id, kind=KIND[b.kind], text=b.text) for b in prompt.blocks],
        params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens))


class Timed:
    """One request read on its own thread: when it was sent, its first token, its last token."""

    def __init__(self, batcher: Batcher, intake: RequestIntake, request: common_pb2.GenerateRequest):
        self.sent = time.perf_counter()
        prepared = intake.prepare(request, request.request_id)
        self.ticket = batcher.admit(prepared.kv_tokens)
        batcher.submit(self.ticket, intake.with_blocks(prepared, request))
        self.first = self.last = None
        self.tokens = 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for step in self.ticket:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
                self.started.set()
            self.last = now
            self.tokens += len(step.token_ids)
        self.started.set()

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.last and self.last > self.first else 0.0


def run_once(loaded, engine, intake_of, running, arrivals, policy: int, max_new_tokens: int) -> dict:
    cache = BlockCache(loaded.model, loaded.tokenizer, loaded.blocks_model_id, ReuseSettings(mode="reuse"),
                       LocalBlockMemory(1 << 34, 1 << 34), None)
    admission = KvAdmission(budget_bytes=1 << 36, bytes_per_token=1, max_requests=64)
    batcher = Batcher(engine, admission, max_batch_size=16, block_cache=cache,
                      publish_every_steps=policy).start()
    intake = intake_of(cache)
    t0 = time.perf_counter()
    try:
        first = [Timed(batcher, intake, as_request(p, max_new_tokens)) for p in running]
        for timed in first:
            timed.started.wait()
        later = [Timed(batcher, intake, as_request(p, max_new_tokens)) for p in arrivals]
        for timed in [*first, *later]:
            timed.thread.join()
            batcher.close(timed.ticket)
        while cache.publisher.pending:  # the owner drains the rest while idle
            time.sleep(0.01)
        published_s = time.perf_counter() - t0
    finally:
        batcher.stop()
    return {
        "running_decode_tokens_per_s": statistics.fmean(t.decode_tokens_per_s for t in first),
        "arrival_ttft_s": statistics.fmean(t.first - t.sent for t in later),
        "all_published_s": published_s,
        "blocks_published": cache.publisher.published,
        "misses": cache.counters.misses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("bench.publish_schedule", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--running", type=int, default=2)
    parser.add_argument("--arrivals", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = resolve_model_arguments(parser.parse_args(argv))
    if not args.tasks:
        args.tasks = ["item_knowledge", "user_summary"]
    loaded, prompts, _ = load_model_and_workload(args)
    frame = chat_frame(loaded.tokenizer)
    engine = DecodingEngine(loaded.model, EngineSettings(decoding_length=16, branch_length=8))

    def intake_of(cache):
        return RequestIntake(loaded.tokenizer, PoolRegistry(), engine, max_prompt_tokens=8192, chat_frame=frame,
                             block_cache=cache)

    heldout = [p for p in prompts if p.split == "heldout"]
    per_repeat = args.running + args.arrivals
    runs: dict[str, list[dict]] = {name: [] for name in POLICIES}
    console = Console()
    for repeat in range(args.repeats):
        chosen = heldout[repeat * per_repeat:(repeat + 1) * per_repeat]
        order = list(POLICIES) if repeat % 2 == 0 else list(reversed(POLICIES))
        for name in order:
            console.print(f"repeat {repeat + 1}/{args.repeats}: {name} ...")
            runs[name].append(run_once(loaded, engine, intake_of, chosen[:args.running], chosen[args.running:],
                                       POLICIES[name], args.max_new_tokens))
    summary = {name: {key: spread([r[key] for r in rows]) for key in rows[0]} for name, rows in runs.items()}
    table = Table(title=f"publishing on the model's thread ({loaded.model_id}, {device_name()})")
    for column in ("policy", "running decode tok/s", "x idle", "arrival TTFT s", "all published s", "blocks"):
        table.add_column(column)
    base = summary["idle"]["running_decode_tokens_per_s"]["mean"]
    for name, s in summary.items():
        tps = s["running_decode_tokens_per_s"]
        table.add_row(name, f"{tps['mean']:.1f} ({tps['min']:.1f}-{tps['max']:.1f})", f"{tps['mean'] / base:.2f}",
                      f"{s['arrival_ttft_s']['mean']:.2f}", f"{s['all_published_s']['mean']:.1f}",
                      f"{s['blocks_published']['mean']:.0f}")
    console.print(table)
    results = {"model": loaded.model_id, "model_path": str(args.model_path), "device": device_name(),
               "running": args.running, "arrivals": args.arrivals, "max_new_tokens": args.max_new_tokens,
               "repeats": args.repeats, "policies": POLICIES, "summary": summary, "runs": runs}
    path = write_results("publish_schedule.json", results, args.results_dir, model_path=args.model_path)
    fig, axes = figure(1, 3, size=(12, 3.6))
    names = list(summary)
    for ax, key, label in zip(axes, ("running_decode_tokens_per_s", "arrival_ttft_s", "all_published_s"),
                              ("running requests' decode tokens/s", "arrivals' TTFT (s)", "all blocks published (s)")):
        ax.bar(names, [summary[n][key]["mean"] for n in names],
               yerr=[[summary[n][key]["mean"] - summary[n][key]["min"] for n in names],
                     [summary[n][key]["max"] - summary[n][key]["mean"] for n in names]], capsize=4)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"Block publishing policies on the model's thread ({loaded.model_id})")
    save_figure(fig, args.results_dir / "publish_schedule.png")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
