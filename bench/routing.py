"""Affinity scheduling against round robin and least loaded, on the real stack (CPU, small model).

    python -m bench.routing [--decoders 2] [--requests 240]     (BENCH_QUICK=1: a short run)

Each policy gets a fresh stack (broker, pool, kv-store, N decoders with one torch thread each,
and a router with ADACCEL_SCHEDULING_POLICY set): cold block caches and empty pools for every
policy, so none inherits another's warm caches. Decoders run with local block memory only (no
kv-store lookups): a block is a hit only on the replica that computed it, which is the locality
the router's choice decides (with the shared kv-store, a miss on one replica is often a remote
hit, and the difference shows in latency instead).

The request stream is the same for every policy (seeded): generative-recommendation prompts
[instruction][user history][item]*k[question] built from the workload's blocks, the user drawn
from a Zipf law over users and each candidate item from a Zipf law over items, so popular users
and items come back often, as in production traffic. Requests are sent closed-loop by
`concurrency` clients through the router, or with `--rate R` open-loop: Poisson arrivals at R
requests/s (the same seeded arrival times for every policy), each request sent at its time
whatever is in flight, and its TTFT counted from that time. Open loop is how traffic arrives in
production; in a closed loop a client sends only when one finished, so the router always chooses
just after a replica freed up and load decides more than locality.

Figures per policy: block hit rate (prompt tokens whose KV came from a block cache / prompt
tokens), history held (share of requests whose user history's KV was in the chosen replica's
memory on arrival: the local-memory hit rate of user blocks, whose ceiling is the user-history
locality ceiling), TTFT p50/p99 seen by the client through the router, requests/s, and locality by block
kind: the share of a request's user-history (item) blocks that the replica it was sent to had
already served in an earlier request. Locality is what the routing decides, whatever the replica's
memory and publishing lag then make of it; the hit rate is what the caches made of it. The
stream's locality ceiling (every request on one replica) bounds what any routing can reach.
`--affinity-weights` runs the affinity policy once per block weight (how many tokens of prefill a
held prompt token saves in its cost model; 1 is what it costs, more favours locality over load) and plots locality and TTFT against it. The CPU's speed drifts:
policies run one after the other, so with --rounds 2 the order is reversed in the second round
and the results give each round's figures; timings are comparable within this run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoTokenizer

from adaccel.v1 import common_pb2, router_pb2, router_pb2_grpc
from bench.common import RESULTS_DIR, figure, quick_run, save_figure, write_results
from common.machine import device_name
from common.rpc.channels import open_channel
from services.main_job.job import percentile
from services.router.scheduling import POLICIES
from services.stack import Stack, resolve_model

KIND = {"instruction": common_pb2.BLOCK_KIND_INSTRUCTION, "user_history": common_pb2.BLOCK_KIND_USER_HISTORY,
        "item": common_pb2.BLOCK_KIND_ITEM, "text": common_pb2.BLOCK_KIND_TEXT}


def block(obj: dict) -> common_pb2.PromptBlock:
    return common_pb2.PromptBlock(id=obj["id"], kind=KIND[obj["kind"]], text=obj["text"])


def request_stream(workload: Path, *, count: int, users: int, items: int, items_per_request: int,
                   zipf_s: float, max_new_tokens: int, user_zipf_s: float | None = None,
                   seed: int = 0) -> list[common_pb2.GenerateRequest]:
    """Generative-rec requests from the workload's blocks with Zipf-skewed users and items
    (users skewed by `user_zipf_s`, default `zipf_s`; 0 = every user equally likely)."""
    user_blocks, item_blocks, frame = {}, {}, None
    for line in workload.read_text().splitlines():
        obj = json.loads(line)
        if obj.get("type") != "prompt" or obj["task"] != "generative_rec":
            continue
        blocks = obj["blocks"]
        frame = frame or (blocks[0], blocks[-1], obj["pool_key"])  # instruction, question
        for b in blocks:
            if b["kind"] == "user_history":
                user_blocks.setdefault(b["id"], (b, obj["pool_key"]))
            elif b["kind"] == "item":
                item_blocks.setdefault(b["id"], b)
    if frame is None:
        raise SystemExit(f"{workload} has no generative_rec prompts; run `make model` first")
    rng = np.random.default_rng(seed)
    user_ids = rng.permutation(sorted(user_blocks))[:users]
    item_ids = rng.permutation(sorted(item_blocks))[:items]

    def zipf(n: int, s: float) -> np.ndarray:
        weights = 1.0 / np.arange(1, n + 1) ** s
        return weights / weights.sum()

    user_p = zipf(len(user_ids), zipf_s if user_zipf_s is None else user_zipf_s)
    item_p = zipf(len(item_ids), zipf_s)
    instruction, question, _ = frame
    requests = []
    for i in range(count):
        user_block, pool_key = user_blocks[user_ids[rng.choice(len(user_ids), p=user_p)]]
        picks = rng.choice(len(item_ids), size=items_per_request, replace=False, p=item_p)
        blocks = [block(instruction), block(user_block), *(block(item_blocks[item_ids[j]]) for j in picks),
                  block(question)]
        requests.append(common_pb2.GenerateRequest(
            request_id=f"route-{i:05d}", pool_key=pool_key, blocks=blocks,
            params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens)))
    return requests


def locality(requests, served_by: dict[str, str]) -> dict[str, float]:
    """Per block kind: share of the blocks of served requests (in sending order) that their
    replica had served before."""
    seen: dict[str, set[str]] = {}
    hits = {"user_history": [0, 0], "item": [0, 0]}
    kinds = {common_pb2.BLOCK_KIND_USER_HISTORY: "user_history", common_pb2.BLOCK_KIND_ITEM: "item"}
    for request in requests:
        replica = served_by.get(request.request_id)
        if replica is None:
            continue
        held = seen.setdefault(replica, set())
        for b in request.blocks:
            kind = kinds.get(b.kind)
            if kind is not None:
                hits[kind][0] += b.id in held
                hits[kind][1] += 1
                held.add(b.id)
    return {kind: h / n if n else 0.0 for kind, (h, n) in hits.items()}


def prefix_hit_ceiling(requests, count_tokens) -> float:
    """Share of the stream's prompt tokens an exact-prefix cache could serve at best (every request
    on one replica, unbounded memory): the instruction after the first request and a returning
    user's history. The hit rate's bound where block reuse is off and only prefixes are reusable
    (items follow the history in a different set each time). count_tokens: text -> token count.

    >>> from adaccel.v1 import common_pb2 as pb
    >>> def req(user):
    ...     return pb.GenerateRequest(blocks=[pb.PromptBlock(id="i", text="ab"), pb.PromptBlock(id=user, text="cdef"),
    ...                                       pb.PromptBlock(id="x", text="gh")])
    >>> prefix_hit_ceiling([req("u1"), req("u1"), req("u2")], len)   # (2 + 4 + 2) / 24
    0.3333333333333333
    """
    seen: set[str] = set()
    total = cached = 0
    for index, request in enumerate(requests):
        lengths = [count_tokens(b.text) for b in request.blocks]
        total += sum(lengths)
        cached += lengths[0] if index else 0
        cached += lengths[1] if request.blocks[1].id in seen else 0
        seen.add(request.blocks[1].id)
    return cached / total if total else 0.0


def history_hit_rate(cached_by_request: dict[str, int], prefix_tokens: dict[str, tuple[int, int]]) -> float:
    """Share of served requests whose user history's KV was in the replica's memory when they
    arrived: the prompt tokens served from cache cover the instruction and at least half of the
    history (the decoder's own tokenization differs from this estimate by a few template tokens).
    prefix_tokens: request id -> (instruction tokens, user-history tokens).

    >>> history_hit_rate({"r0": 35, "r1": 250, "r2": 0}, {"r0": (35, 212), "r1": (35, 212), "r2": (35, 212)})
    0.3333333333333333
    """
    hits = [cached >= prefix_tokens[rid][0] + prefix_tokens[rid][1] / 2 for rid, cached in cached_by_request.items()]
    return sum(hits) / len(hits) if hits else 0.0


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of `count` requests arrives, Poisson at `rate` per s.

    >>> arrivals = poisson_arrivals(2000, 4.0)
    >>> arrivals == sorted(arrivals) and round(len(arrivals) / arrivals[-1], 1)
    4.0
    """
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=count)).tolist()


def run_policy(policy: str, requests, *, model_path: Path, decoders: int, concurrency: int, work_dir: Path,
               gate_store: Path, block_weight: float | None = None, arrivals: list[float] | None = None,
               replicated_memory_mb: float | None = None,
               prefix_tokens: dict[str, tuple[int, int]] | None = None) -> dict:
    """One policy on a fresh stack: closed loop with `concurrency` clients, or open loop at the
    `arrivals` times (seconds from the start; then TTFT counts from a request's arrival)."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"routing-{policy}-", dir=work_dir))
    decoder_env = {"TORCH_THREADS": "1", "KVSTORE_ADDRS": "", "REUSE_GATE_STORE": str(gate_store)}
    if replicated_memory_mb is not None:
        decoder_env["REPLICATED_MEMORY_MB"] = str(replicated_memory_mb)
    router_env = {"SCHEDULING_POLICY": policy}
    if block_weight is not None:
        router_env["AFFINITY_BLOCK_WEIGHT"] = str(block_weight)
    stack = Stack(data_dir=data_dir, model_path=model_path, decoders=decoders,
                  extra_env={"decoder": decoder_env, "router": router_env})
    with stack:
        router = router_pb2_grpc.RouterStub(open_channel(stack.address("router")))
        info = router.Info(router_pb2.RouterInfoRequest(), timeout=5)
        assert info.policy == policy, (info.policy, policy)
        lock = threading.Lock()
        outcomes: list[tuple[float, common_pb2.GenerationSummary]] = []
        failures: list[str] = []
        bar = tqdm(total=len(requests), desc=policy, unit="req", leave=False)

        def send(request, arrival: float | None = None):
            started = time.perf_counter() if arrival is None else arrival
            first, summary = None, None
            try:
                for chunk in router.Generate(request, timeout=120):
                    if chunk.HasField("summary"):
                        summary = chunk.summary
                    elif first is None:
                        first = time.perf_counter() - started
            except grpc.RpcError as exc:
                with lock:
                    failures.append(f"{exc.code().name}: {exc.details()}")
            else:
                with lock:
                    outcomes.append((first, summary))
            bar.update(1)

        t0 = time.perf_counter()
        if arrivals is None:
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(send, requests))
        else:  # one thread a request in flight: an arrival never waits for a client
            with ThreadPoolExecutor(min(len(requests), 256)) as pool:
                for request, at in zip(requests, arrivals):
                    time.sleep(max(0.0, t0 + at - time.perf_counter()))
                    pool.submit(send, request, t0 + at)
        wall_s = time.perf_counter() - t0
        bar.close()
        held = {r.address: r.held_blocks for r in router.Info(router_pb2.RouterInfoRequest(), timeout=5).replicas}
    prompt = sum(s.stats.prompt_tokens for _, s in outcomes)
    cached = sum(s.stats.cached_prompt_tokens for _, s in outcomes)
    ttfts = [t for t, _ in outcomes]
    per_decoder: dict[str, int] = {}
    for _, s in outcomes:
        per_decoder[s.decoder_id] = per_decoder.get(s.decoder_id, 0) + 1
    return {
        "block_hit_rate": cached / prompt if prompt else 0.0,
        "history_hit_rate": history_hit_rate({s.request_id: s.stats.cached_prompt_tokens for _, s in outcomes},
                                             prefix_tokens) if prefix_tokens else None,
        "locality": locality(requests, {s.request_id: s.decoder_id for _, s in outcomes}),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "requests_per_s": len(outcomes) / wall_s,
        "requests": len(outcomes),
        "failed": len(failures),
        "failures": failures[:5],
        "requests_per_decoder": dict(sorted(per_decoder.items())),
        "blocks_held_at_end": held,
        "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    quick = quick_run()
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ADACCEL_DATA_DIR", "data")))
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--decoders", type=int, default=2 if quick else 3, choices=[2, 3, 4])
    parser.add_argument("--requests", type=int, default=60 if quick else 240)
    parser.add_argument("--users", type=int, default=40 if quick else 150)
    parser.add_argument("--items", type=int, default=120 if quick else 600)
    parser.add_argument("--items-per-request", type=int, default=6)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity skew exponent of items (and users)")
    parser.add_argument("--user-zipf", type=float, default=None,
                        help="popularity skew exponent of users (default --zipf; 0: every user equally likely)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=None, help="clients in flight (default 2 per decoder)")
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: Poisson arrivals at this many requests/s (default: closed loop)")
    parser.add_argument("--rounds", type=int, default=1 if quick else 2)
    parser.add_argument("--replicated-memory-mb", type=float, default=None,
                        help="each decoder's local memory for user histories and instructions (and their prefixes), "
                             "MiB (default: the decoder's); below the stream's working set, where a user's "
                             "prefix is kept decides whether it is still there when the user comes back")
    parser.add_argument("--output", default="routing.json", help="results file name under bench/results/")
    parser.add_argument("--affinity-weights", default="" if quick else "0.5,2,4",
                        help="block weights for a sweep of the affinity policy after the rounds ('' = none)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    workload = data_dir / "workload" / "prompts.jsonl"
    if not workload.is_file():
        raise SystemExit(f"no workload at {workload}; run `make model` first")
    model_path = resolve_model(data_dir, args.model_path)
    concurrency = args.concurrency or 2 * args.decoders
    requests = request_stream(workload, count=args.requests, users=args.users, items=args.items,
                              items_per_request=args.items_per_request, zipf_s=args.zipf,
                              user_zipf_s=args.user_zipf, max_new_tokens=args.max_new_tokens)
    arrivals = poisson_arrivals(len(requests), args.rate) if args.rate else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    prefix_tokens = {r.request_id: (count_tokens(r.blocks[0].text), count_tokens(r.blocks[1].text)) for r in requests}
    load = f"open loop, {args.rate:g} requests/s" if arrivals else f"{concurrency} clients"
    work_dir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    gate_store = work_dir / "block_reuse_gate.json"  # the accuracy gate runs once, not per stack
    rounds: list[dict[str, dict]] = []
    for round_index in range(args.rounds):
        order = list(POLICIES) if round_index % 2 == 0 else list(reversed(POLICIES))
        results = {}
        for policy in order:
            print(f"round {round_index + 1}/{args.rounds}: {policy} ({args.decoders} decoders, "
                  f"{len(requests)} requests, {load}) ...", flush=True)
            results[policy] = run_policy(policy, requests, model_path=model_path, decoders=args.decoders,
                                         concurrency=concurrency, work_dir=work_dir, gate_store=gate_store,
                                         arrivals=arrivals, replicated_memory_mb=args.replicated_memory_mb,
                                         prefix_tokens=prefix_tokens)
        rounds.append(results)
    policies = {policy: merge_rounds([r[policy] for r in rounds]) for policy in POLICIES}
    print_table(policies)
    # Every request on one replica: the locality no routing can exceed on this stream (a block's
    # first request is a miss wherever it goes).
    ceiling = locality(requests, {r.request_id: "all" for r in requests})
    hit_ceiling = prefix_hit_ceiling(requests, count_tokens)
    print(f"locality ceiling of this stream: user history {ceiling['user_history']:.3f}, "
          f"item {ceiling['item']:.3f}; exact-prefix hit-rate ceiling {hit_ceiling:.3f}")
    sweep = {}
    for weight in [float(w) for w in args.affinity_weights.split(",") if w.strip()]:
        print(f"affinity with block weight {weight:g} ...", flush=True)
        sweep[f"{weight:g}"] = run_policy("affinity", requests, model_path=model_path, decoders=args.decoders,
                                          concurrency=concurrency, work_dir=work_dir, gate_store=gate_store,
                                          block_weight=weight, arrivals=arrivals,
                                          replicated_memory_mb=args.replicated_memory_mb, prefix_tokens=prefix_tokens)
    if sweep:
        print_sweep(sweep, policies["round_robin"])
        plot_sweep(sweep, policies["round_robin"], ceiling, Path(args.output).stem)
    path = write_results(args.output, {
        "device": device_name(),
        "machine_note": "shared 2-core CPU; decoders run one torch thread each; timings compare within this run only",
        "model": str(model_path),
        "decoders": args.decoders,
        "replicated_memory_mb": args.replicated_memory_mb,
        "concurrency": None if arrivals else concurrency,
        "open_loop_rate": args.rate,
        "stream": {"requests": len(requests), "users": args.users, "items": args.items,
                   "items_per_request": args.items_per_request, "zipf_s": args.zipf,
                   "user_zipf_s": args.zipf if args.user_zipf is None else args.user_zipf,
                   "max_new_tokens": args.max_new_tokens, "task": "generative_rec"},
        "fairness": "fresh stack per policy (cold block caches, empty pools); local block memory only",
        "rounds": rounds,
        "policies": policies,
        "affinity_block_weight_sweep": sweep,
        "locality_ceiling": ceiling,
        "prefix_hit_rate_ceiling": hit_ceiling,
    })
    print(f"wrote {path}")


def merge_rounds(results: list[dict]) -> dict:
    """The schema's figures averaged over rounds, plus their spread."""
    merged = {key: statistics.fmean(r[key] for r in results)
              for key in ("block_hit_rate", "ttft_p50_s", "ttft_p99_s", "requests_per_s")}
    merged["failed"] = sum(r["failed"] for r in results)
    if all(r.get("history_hit_rate") is not None for r in results):
        merged["history_hit_rate"] = statistics.fmean(r["history_hit_rate"] for r in results)
    merged["locality"] = {kind: statistics.fmean(r["locality"][kind] for r in results)
                          for kind in results[0]["locality"]}
    merged["spread"] = {key: [r[key] for r in results] for key in ("ttft_p50_s", "requests_per_s")}
    return merged


def print_table(policies: dict[str, dict]) -> None:
    table = Table(title="bench-routing: policies on the same request stream")
    for column in ("policy", "block hit rate", "history held", "user locality", "item locality", "TTFT p50 (s)",
                   "TTFT p99 (s)", "requests/s", "p50 vs round robin"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    base = policies["round_robin"]["ttft_p50_s"]
    for policy, r in policies.items():
        table.add_row(policy, *row_figures(r, base))
    Console(width=160).print(table)


def row_figures(r: dict, base_p50: float) -> list[str]:
    held = r.get("history_hit_rate")
    return [f"{r['block_hit_rate']:.3f}", "-" if held is None else f"{held:.3f}", f"{r['locality']['user_history']:.3f}",
            f"{r['locality']['item']:.3f}", f"{r['ttft_p50_s']:.4f}", f"{r['ttft_p99_s']:.4f}", f"{r['requests_per_s']:.2f}",
            f"{r['ttft_p50_s'] / base_p50:.2f}x" if base_p50 else "-"]


def print_sweep(sweep: dict[str, dict], round_robin: dict) -> None:
    table = Table(title="bench-routing: affinity by block weight (one run each)")
    for column in ("block weight", "block hit rate", "history held", "user locality", "item locality", "TTFT p50 (s)",
                   "TTFT p99 (s)", "requests/s", "p50 vs round robin"):
        table.add_column(column, justify="right")
    for weight, r in sweep.items():
        table.add_row(weight, *row_figures(r, round_robin["ttft_p50_s"]))
    Console(width=160).print(table)


def plot_sweep(sweep: dict[str, dict], round_robin: dict, ceiling: dict[str, float], name: str) -> None:
    weights = [float(w) for w in sweep]
    fig, (left, right) = figure(1, 2, size=(10, 4))
    for kind, style, colour in (("user_history", "o-", "tab:blue"), ("item", "s-", "tab:orange")):
        left.plot(weights, [r["locality"][kind] for r in sweep.values()], style, color=colour,
                  label=f"{kind} locality")
        left.axhline(round_robin["locality"][kind], linestyle=":", color=colour)
        left.axhline(ceiling[kind], linestyle="--", color=colour, linewidth=0.8)
    left.plot(weights, [r["block_hit_rate"] for r in sweep.values()], "^-", color="tab:green", label="block hit rate")
    left.set_xscale("log")
    left.set_xlabel("affinity block weight (prefill tokens a held prompt token saves)")
    left.set_ylabel("share")
    left.legend()
    right.plot(weights, [r["ttft_p50_s"] * 1000 for r in sweep.values()], "o-", label="p50")
    right.plot(weights, [r["ttft_p99_s"] * 1000 for r in sweep.values()], "s-", label="p99")
    right.axhline(round_robin["ttft_p50_s"] * 1000, linestyle=":", color="grey", label="round robin p50")
    right.set_xscale("log")
    right.set_xlabel("affinity block weight")
    right.set_ylabel("TTFT (ms)")
    right.legend()
    fig.suptitle("Affinity routing by block weight (dotted: round robin; dashed: the stream's locality ceiling)")
    path = RESULTS_DIR / f"{name}_affinity_weight.png"
    save_figure(fig, path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
