"""The main job: offline knowledge generation through the real router, with a results table.

Generates item knowledge and user-interest summaries for the workload's prompts
(`<data-dir>/workload/prompts.jsonl`, written by `make model`; without one, a few built-in demo
prompts, and it says so). A sample is also run with acceleration off (no drafting), interleaved
with the accelerated run, so the table's speedup is measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from adaccel.v1 import common_pb2, pool_pb2, pool_pb2_grpc, router_pb2_grpc
from common.rpc.channels import open_channel

DEMO_ITEMS = [
    ("item-demo-1", "electronics/headphones", "Aurora wireless headphones, noise cancelling, 30 hour battery."),
    ("item-demo-2", "home/kitchen", "Harbor cast iron skillet, pre-seasoned, 10 inch, oven safe."),
    ("item-demo-3", "fashion/shoes", "Trailmark running shoes, breathable mesh, cushioned sole."),
]


def demo_requests(max_new_tokens: int) -> list[common_pb2.GenerateRequest]:
    requests = []
    for item_id, pool_key, text in DEMO_ITEMS:
        requests.append(common_pb2.GenerateRequest(
            request_id=f"demo-{item_id}", pool_key=pool_key, publish=True,
            blocks=[common_pb2.PromptBlock(id="instr-item-knowledge", kind=common_pb2.BLOCK_KIND_INSTRUCTION,
                                           text="Write the selling points of this item for an ad.\n"),
                    common_pb2.PromptBlock(id=item_id, kind=common_pb2.BLOCK_KIND_ITEM, text=text + "\n")],
            params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens),
        ))
    return requests


JOB_TASKS = ("item_knowledge", "user_summary")


def workload_requests(path: Path, count: int, max_new_tokens: int) -> list[common_pb2.GenerateRequest]:
    from common.workload.export import load_prompts, to_generate_request

    prompts, _ = load_prompts(path)
    chosen = [p for p in prompts if p.task in JOB_TASKS][:count]
    params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    return [to_generate_request(p, params=params, publish=True) for p in chosen]


def generate_one(router, request, timeout_s: float = 120):
    summary = None
    for chunk in router.Generate(request, timeout=timeout_s):
        if chunk.HasField("summary"):
            summary = chunk.summary
    return summary


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait_for_ingest(pool_stub, expected: int, timeout_s: float) -> pool_pb2.PoolStats:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = pool_stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
        if stats.records_ingested >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def run_job(stack, data_dir: Path, *, quick: bool, extra_args: list[str]) -> dict:
    max_new_tokens = 24 if quick else 96
    workload = data_dir / "workload" / "prompts.jsonl"
    if workload.is_file():
        requests = workload_requests(workload, 6 if quick else 200, max_new_tokens)
        source = f"{len(requests)} item-knowledge and user-summary prompts from {workload}"
    else:
        requests = demo_requests(max_new_tokens)
        source = "built-in demo prompts (no workload file)"
    baseline_every = 3 if quick else 10  # every n-th request is also run with drafting off
    router = router_pb2_grpc.RouterStub(open_channel(stack.address("router")))
    pool = pool_pb2_grpc.PoolStub(open_channel(stack.address("pool")))
    out_dir = data_dir / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"job-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    ttfts, steps, tokens, failures = [], 0, 0, 0
    sample = {"accelerated": [0, 0.0], "plain": [0, 0.0]}  # tokens, decoder seconds
    t0 = time.perf_counter()
    with open(out_path, "w") as out:
        for index, request in enumerate(tqdm(requests, desc="generating", unit="req")):
            try:
                summary = generate_one(router, request)
                if index % baseline_every == 0:
                    plain = common_pb2.GenerateRequest()
                    plain.CopyFrom(request)
                    plain.request_id = f"{request.request_id}-plain"
                    plain.publish = False
                    plain.params.disable_drafting = True
                    baseline = generate_one(router, plain)
                    for key, s in (("accelerated", summary), ("plain", baseline)):
                        sample[key][0] += s.stats.new_tokens
                        sample[key][1] += s.stats.total_s
            except grpc.RpcError as exc:
                failures += 1
                tqdm.write(f"{request.request_id}: {exc.code().name}: {exc.details()}")
                continue
            ttfts.append(summary.stats.ttft_s)
            steps += summary.stats.steps
            tokens += summary.stats.new_tokens
            out.write(json.dumps({"request_id": summary.request_id, "pool_key": request.pool_key,
                                  "text": summary.text, "tokens": summary.stats.new_tokens,
                                  "decoder": summary.decoder_id, "model": summary.model_id}) + "\n")
    wall_s = time.perf_counter() - t0
    pool_stats = wait_for_ingest(pool, len(requests) - failures, timeout_s=30)
    results = {
        "prompts_source": source,
        "requests": len(requests),
        "failed": failures,
        "new_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "mean_accepted_per_step": tokens / steps if steps else 0.0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else 0.0,
        "speedup_vs_no_drafting": ((sample["accelerated"][0] / sample["accelerated"][1])
                                   / (sample["plain"][0] / sample["plain"][1])) if sample["plain"][1] else 0.0,
        "speedup_sample_requests": len(range(0, len(requests), baseline_every)),
        "pool_records_ingested": pool_stats.records_ingested,
        "pools": {p.pool_key: {"version": p.version, "nodes": p.nodes} for p in pool_stats.pools},
        "output": str(out_path),
        "model": str(stack.model_path),
    }
    print_table(results)
    (out_dir / "job_summary.json").write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    table = Table(title="adaccel main job")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("requests", "failed", "new_tokens", "wall_s", "tokens_per_s", "mean_accepted_per_step",
                "ttft_p50_s", "ttft_p99_s", "speedup_vs_no_drafting", "pool_records_ingested"):
        value = results[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    table.add_row("pools updated", str(len(results["pools"])))
    table.add_row("prompts", results["prompts_source"])
    table.add_row("model", results["model"])
    table.add_row("outputs", results["output"])
    Console().print(table)
