"""The main job: offline knowledge generation through the real router, with a results table.

Generates item knowledge and user-interest summaries for the workload's prompts
(`<data-dir>/workload/prompts.jsonl`, written by `make model`; without one, a few built-in demo
prompts, and it says so). Before the run, the pools are warmed as a running deployment's are: the
model's own answers to warm-split prompts (`<data-dir>/warm_answers/<model>.jsonl`, decoded by
`make model`) are published to the generated-text topic and enter the pools through the pool
updater, as live generations do. Without such a file (a model `make model` did not warm, e.g. a
test's tiny model), the workload's warm-split reference texts are inserted with Pool.Insert, and
the job says which it did. Requests go through the router a few at a time, so decoders batch them. A
sample is also run with acceleration off (no drafting, no block KV reuse), each right after its
accelerated twin, so the table's speedup is measured in the same run; the table also gives the
cache hit rates (KV blocks, pools).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from adaccel.v1 import common_pb2, pool_pb2, pool_pb2_grpc, router_pb2_grpc
from common.generation_stats import accepted_drafts
from common.rpc.channels import open_channel

DEMO_ITEMS = [
    ("item-demo-1", "electronics/headphones", "Aurora wireless headphones, noise cancelling, 30 hour battery."),
    ("item-demo-2", "home/kitchen", "Harbor cast iron skillet, pre-seasoned, 10 inch, oven safe."),
    ("item-demo-3", "fashion/shoes", "Trailmark running shoes, breathable mesh, cushioned sole."),
]
# Previously generated texts that warm the demo pools (the workload's warm split plays this role).
DEMO_WARM = [
    ("electronics/headphones", "Aurora wireless headphones: noise cancelling for calm commutes and a 30 hour battery."),
    ("home/kitchen", "Harbor cast iron skillet: pre-seasoned, oven safe, ready for searing on day one."),
    ("fashion/shoes", "Trailmark running shoes: breathable mesh upper and a cushioned sole for long runs."),
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


def workload_requests(path: Path, count: int, max_new_tokens: int
                      ) -> tuple[list[common_pb2.GenerateRequest], list[tuple[str, str]]]:
    """Held-out prompts of the job's tasks (warm-split ones only if there are too few), and the
    warm-split texts (pool_key, text) that warm the pools before the run."""
    from common.workload.export import load_prompts, to_generate_request

    prompts, warmups = load_prompts(path)
    from common.workload.prompts import round_robin

    # Held-out first, the tasks taken in turn so that every task is in a short run.
    by_task = [[p for p in prompts if p.task == task and p.split == "heldout"]
               + [p for p in prompts if p.task == task and p.split != "heldout"] for task in JOB_TASKS]
    chosen = round_robin(by_task, count)
    params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    requests = [to_generate_request(p, params=params, publish=True) for p in chosen]
    return requests, [(w.pool_key, w.text) for w in warmups]


def publish_warm_answers(bootstrap: str, answers) -> int:
    """Publishes the model's stored warm answers as GeneratedRecords on the generated-text topic,
    keyed by pool key as decoders publish them (one pool's records stay in order on one
    partition), for the pool updater to insert; returns the records the broker acknowledged."""
    from common.kafka_io import ensure_topics, make_producer
    from common.settings import KafkaSettings

    settings = KafkaSettings(kafka_bootstrap=bootstrap)
    topic = settings.kafka_generated_topic
    ensure_topics(settings, [topic])
    producer = make_producer(settings)
    try:
        sends = [producer.send(topic, key=answer.pool_key.encode(), value=answer.record().SerializeToString())
                 for answer in tqdm(answers, desc="publishing warm answers", unit="record", leave=False)]
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)
    return sum(1 for send in sends if send.succeeded())


def warm_pools(pool_stub, texts: list[tuple[str, str]], *, per_call: int = 64) -> int:
    """Pool.Insert of previously generated texts, grouped by pool; returns texts inserted."""
    by_pool: dict[str, list[str]] = defaultdict(list)
    for pool_key, text in texts:
        by_pool[pool_key].append(text)
    inserted = 0
    with tqdm(total=len(texts), desc="warming pools", unit="text", leave=False) as bar:
        for pool_key, pool_texts in by_pool.items():
            for start in range(0, len(pool_texts), per_call):
                chunk = pool_texts[start:start + per_call]
                pool_stub.Insert(pool_pb2.InsertRequest(pool_key=pool_key, texts=chunk), timeout=30)
                inserted += len(chunk)
                bar.update(len(chunk))
    return inserted


@dataclass(slots=True)
class Outcome:
    summary: common_pb2.GenerationSummary
    client_ttft_s: float  # first token seen by the caller, through the router


def generate_one(router, request, timeout_s: float = 120) -> Outcome:
    started = time.perf_counter()
    summary, first = None, None
    for chunk in router.Generate(request, timeout=timeout_s):
        if chunk.HasField("summary"):
            summary = chunk.summary
        elif first is None:
            first = time.perf_counter() - started
    return Outcome(summary, first if first is not None else time.perf_counter() - started)


def without_acceleration(request: common_pb2.GenerateRequest) -> common_pb2.GenerateRequest:
    """The same request with drafting and block KV reuse off, not published (the in-run baseline)."""
    plain = common_pb2.GenerateRequest()
    plain.CopyFrom(request)
    plain.request_id = f"{request.request_id}-plain"
    plain.publish = False
    plain.params.advanced.disable_drafting = True
    plain.params.advanced.disable_block_reuse = True
    return plain


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for_ingest(pool_stub, expected: int, timeout_s: float) -> pool_pb2.PoolStats:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = pool_stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
        if stats.records_ingested >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


# Sized for SmolLM2-135M on 2 CPU cores (~8 tokens/s for one request): a few minutes of decoding.
JOB_REQUESTS = 24
JOB_NEW_TOKENS = 64


def run_job(stack, data_dir: Path, *, quick: bool, extra_args: list[str]) -> dict:
    from common.modeling.loading import read_model_card
    from common.warm_answers import answers_path, read_answers

    max_new_tokens = 24 if quick else JOB_NEW_TOKENS
    workload = data_dir / "workload" / "prompts.jsonl"
    if workload.is_file():
        requests, warm_texts = workload_requests(workload, 6 if quick else JOB_REQUESTS, max_new_tokens)
        source = f"{len(requests)} item-knowledge and user-summary prompts from {workload}"
        if quick:
            warm_texts = warm_texts[:200]
    else:
        requests, warm_texts = demo_requests(max_new_tokens), list(DEMO_WARM)
        source = "built-in demo prompts (no workload file)"
    baseline_every = 3  # every n-th request is also run with acceleration off
    concurrency = 2 if quick else 4  # requests in flight: the decoders batch them
    router = router_pb2_grpc.RouterStub(open_channel(stack.address("router")))
    pool = pool_pb2_grpc.PoolStub(open_channel(stack.address("pool")))
    model_id = read_model_card(stack.model_path).get("model_id", stack.model_path.name)
    warm_answers = read_answers(answers_path(data_dir, model_id))
    if warm_answers:
        warmed = publish_warm_answers(stack.broker.bootstrap, warm_answers)
        warm_source = f"{warmed} of the model's own answers to warm prompts, via the generated-text topic"
        wait_for_ingest(pool, warmed, timeout_s=60)
    else:
        warmed = warm_pools(pool, warm_texts)
        warm_source = f"{warmed} warm-split reference texts (Pool.Insert; no model answers stored)"
    ingested_before = pool.Stats(pool_pb2.PoolStatsRequest(), timeout=5).records_ingested
    out_dir = data_dir / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"job-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"

    def work(index: int, request: common_pb2.GenerateRequest) -> tuple[Outcome, Outcome | None]:
        outcome = generate_one(router, request)
        # The baseline runs right after its accelerated twin, under the same load: the ratio of
        # their decoder-side speeds is the in-run speedup. Its output is not published, so it
        # never feeds the pools the accelerated runs draft from.
        baseline = generate_one(router, without_acceleration(request)) if index % baseline_every == 0 else None
        return outcome, baseline

    ttfts, client_ttfts, failures = [], [], 0
    samples: dict[str, str] = {}  # task -> the first answer seen
    totals = {"steps": 0, "tokens": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
              "draft_steps": 0, "draft_hit_steps": 0, "drafted": 0, "accepted_drafts": 0}
    sample = {"accelerated": [0, 0.0], "plain": [0, 0.0]}  # tokens, decoder seconds
    t0 = time.perf_counter()
    with open(out_path, "w") as out, ThreadPoolExecutor(concurrency) as executor:
        futures = {executor.submit(work, i, r): r for i, r in enumerate(requests)}
        for future in tqdm(as_completed(futures), total=len(futures), desc="generating", unit="req"):
            request = futures[future]
            try:
                outcome, baseline = future.result()
            except grpc.RpcError as exc:
                failures += 1
                tqdm.write(f"{request.request_id}: {exc.code().name}: {exc.details()}")
                continue
            summary, stats = outcome.summary, outcome.summary.stats
            ttfts.append(stats.ttft_s)
            client_ttfts.append(outcome.client_ttft_s)
            add_stats(totals, stats)
            if baseline is not None:
                for key, s in (("accelerated", summary), ("plain", baseline.summary)):
                    sample[key][0] += s.stats.new_tokens
                    sample[key][1] += s.stats.total_s
            samples.setdefault(task_of(request), summary.text)
            out.write(json.dumps({"request_id": summary.request_id, "pool_key": request.pool_key,
                                  "text": summary.text, "tokens": stats.new_tokens,
                                  "decoder": summary.decoder_id, "model": summary.model_id}) + "\n")
    wall_s = time.perf_counter() - t0
    pool_stats = wait_for_ingest(pool, ingested_before + len(requests) - failures, timeout_s=30)
    tokens, steps = totals["tokens"], totals["steps"]
    results = {
        "prompts_source": source,
        "requests": len(requests),
        "failed": failures,
        "concurrency": concurrency,
        "warm_texts_inserted": warmed,
        "pool_warmup": warm_source,
        "new_tokens": tokens,
        "wall_s": wall_s,
        "items_per_s": (len(requests) - failures) / wall_s if wall_s else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "mean_accepted_per_step": tokens / steps if steps else 0.0,
        "ttft_p50_s": percentile(client_ttfts, 0.5),
        "ttft_p99_s": percentile(client_ttfts, 0.99),
        "ttft_decoder_p50_s": percentile(ttfts, 0.5),
        "ttft_decoder_p99_s": percentile(ttfts, 0.99),
        "ttft_mean_s": statistics.fmean(client_ttfts) if client_ttfts else 0.0,
        # KV: prompt tokens whose KV came from a block cache; pool: decode steps whose draft (pool
        # plus the prompt's own n-grams) had at least one token accepted, and drafts accepted.
        "kv_block_hit_rate": ratio(totals["cached_prompt_tokens"], totals["prompt_tokens"]),
        "pool_hit_rate": ratio(totals["draft_hit_steps"], totals["draft_steps"]),
        "draft_acceptance_rate": ratio(totals["accepted_drafts"], totals["drafted"]),
        "speedup_vs_no_acceleration": ((sample["accelerated"][0] / sample["accelerated"][1])
                                       / (sample["plain"][0] / sample["plain"][1])) if sample["plain"][1] else 0.0,
        "speedup_sample_requests": len(range(0, len(requests), baseline_every)),
        # This job's generations only (the warm-up's records came before).
        "pool_records_ingested": pool_stats.records_ingested - ingested_before,
        "pools": {p.pool_key: {"version": p.version, "nodes": p.nodes} for p in pool_stats.pools},
        "output": str(out_path),
        "model": model_id,
        "model_path": str(stack.model_path),
        "samples": samples,
    }
    print_table(results)
    (out_dir / "job_summary.json").write_text(json.dumps(results, indent=2))
    return results


def task_of(request: common_pb2.GenerateRequest) -> str:
    """The task a request is for, from its instruction block's id ("instruction/<task>/v1")."""
    for block in request.blocks:
        if block.kind == common_pb2.BLOCK_KIND_INSTRUCTION:
            parts = block.id.split("/")
            return parts[1] if len(parts) > 1 else block.id
    return "other"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def add_stats(totals: dict[str, int], stats: common_pb2.GenerationStats) -> None:
    totals["steps"] += stats.steps
    totals["tokens"] += stats.new_tokens
    totals["prompt_tokens"] += stats.prompt_tokens
    totals["cached_prompt_tokens"] += stats.cached_prompt_tokens
    for drafted, accepted in zip(stats.drafted_per_step, accepted_drafts(stats)):
        if drafted:
            totals["draft_steps"] += 1
            totals["draft_hit_steps"] += accepted > 0
            totals["drafted"] += drafted
            totals["accepted_drafts"] += accepted


def print_table(results: dict) -> None:
    table = Table(title="adaccel main job")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("requests", "failed", "concurrency", "new_tokens", "wall_s", "items_per_s", "tokens_per_s",
                "mean_accepted_per_step", "ttft_p50_s", "ttft_p99_s", "kv_block_hit_rate", "pool_hit_rate",
                "draft_acceptance_rate", "speedup_vs_no_acceleration", "warm_texts_inserted",
                "pool_records_ingested"):
        value = results[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    table.add_row("pools updated", str(len(results["pools"])))
    table.add_row("prompts", results["prompts_source"])
    table.add_row("pool warm-up", results["pool_warmup"])
    table.add_row("model", f"{results['model']} ({results['model_path']})")
    table.add_row("outputs", results["output"])
    console = Console()
    console.print(table)
    for task, text in sorted(results["samples"].items()):
        console.print(f"[bold]{task}[/bold]: {text.strip()}")
