"""The main job: offline knowledge generation through the real router, with a results table.

Reads prompts from the workload file (`<data-dir>/workload/prompts.jsonl`, written by `make model`);
without one it falls back to a few built-in demo prompts, and says so.
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
    max_new_tokens = 16 if quick else 64
    requests = demo_requests(max_new_tokens)
    source = "built-in demo prompts (no workload file yet)"
    router = router_pb2_grpc.RouterStub(open_channel(stack.address("router")))
    pool = pool_pb2_grpc.PoolStub(open_channel(stack.address("pool")))
    out_dir = data_dir / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"job-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    ttfts, steps, tokens, failures = [], 0, 0, 0
    t0 = time.perf_counter()
    with open(out_path, "w") as out:
        for request in tqdm(requests, desc="generating", unit="req"):
            try:
                summary = None
                for chunk in router.Generate(request, timeout=120):
                    if chunk.HasField("summary"):
                        summary = chunk.summary
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
                "ttft_p50_s", "ttft_p99_s", "pool_records_ingested"):
        value = results[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    table.add_row("pools updated", str(len(results["pools"])))
    table.add_row("prompts", results["prompts_source"])
    table.add_row("model", results["model"])
    table.add_row("outputs", results["output"])
    Console().print(table)
