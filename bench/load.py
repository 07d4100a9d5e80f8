"""make bench-load: open-loop load against the router with every service up, then a long hold.

1. Start the stack (broker, pool, kv-store, decoder(s), router as processes; the default model
   when built, else the tiny random stand-in, which the output says).
2. Step the offered rate (Poisson arrivals, asyncio gRPC client) up from --start-rate by
   --step-factor until p99 time-to-first-token passes --target-p99-ttft-s or more than 0.1% of
   requests fail; the throughput found is the last rate that kept both.
3. Hold that rate for --hold-s (5 minutes; BENCH_QUICK=1: 30 s), sampling the services' resident
   memory, and report requests/s, TTFT p50/p99, error rate and memory growth.

Writes bench/results/load.json:
  {"requests_per_s", "ttft_p50_s", "ttft_p99_s", "error_rate", "duration_s", "rss_growth_mb", ...}
TTFT is measured by the client (request sent -> first streamed token), so it includes the router
hop and any queueing. Absolute figures hold for the named machine only; a shared machine (other
jobs on the same cores) moves them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from adaccel.v1 import common_pb2, router_pb2_grpc
from bench.common import quick_run, write_results
from common.machine import device_name
from common.rpc.security import bearer_metadata

MAX_ERROR_RATE = 0.001
# A service keeping up answers (nearly) every request sent up to a grace before a window's end
# by that end; one falling behind leaves a growing backlog unanswered.
KEEP_UP = 0.95


@dataclass(slots=True)
class Sample:
    sent_s: float  # since the window started
    ttft_s: float | None
    total_s: float
    code: str
    request_id: str = ""
    prompt_chars: int = 0

    @property
    def done_s(self) -> float:
        return self.sent_s + self.total_s

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(slots=True)
class WindowFigures:
    offered_rate: float
    duration_s: float
    requests: int
    ok: int
    requests_per_s: float
    in_window_per_s: float  # successes completed inside the window
    kept_up: float  # of the requests sent up to `grace` before the window's end, the share answered by its end
    ttft_p50_s: float
    ttft_p99_s: float
    error_rate: float
    errors: dict[str, int]

    @classmethod
    def of(cls, offered_rate: float, samples: list[Sample], elapsed_s: float, window_s: float,
           grace_s: float) -> WindowFigures:
        ttfts = [s.ttft_s for s in samples if s.ok and s.ttft_s is not None]
        errors: dict[str, int] = {}
        for s in samples:
            if not s.ok:
                errors[s.code] = errors.get(s.code, 0) + 1
        ok = sum(s.ok for s in samples)
        in_window = sum(s.ok and s.done_s <= window_s for s in samples) / window_s
        early = [s for s in samples if s.sent_s <= window_s - grace_s]
        kept_up = sum(s.done_s <= window_s for s in early) / len(early) if early else 1.0
        return cls(offered_rate, elapsed_s, len(samples), ok, ok / elapsed_s if elapsed_s else 0.0, in_window, kept_up,
                   percentile(ttfts, 50), percentile(ttfts, 99),
                   (len(samples) - ok) / len(samples) if samples else 1.0, errors)

    def keeps(self, target_p99_s: float) -> bool:
        """p99 TTFT and errors within bounds, and the service keeps up (no backlog building)."""
        return (self.requests > 0 and self.ttft_p99_s <= target_p99_s and self.error_rate <= MAX_ERROR_RATE
                and self.kept_up >= KEEP_UP)


def grace_s(args) -> float:
    """Time a request may take and still count as answered in its window."""
    return max(2.0, 2 * args.target_p99_ttft_s)


# ---------------------------------------------------------------- requests
def load_requests(data_dir: Path, max_new_tokens: int, limit: int = 400) -> tuple[list[common_pb2.GenerateRequest], str]:
    """Held-out workload prompts when `make model` wrote them, else a few synthetic ones."""
    params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    path = data_dir / "workload" / "prompts.jsonl"
    if path.is_file():
        from common.workload.export import iter_prompts, to_generate_request

        requests = []
        for prompt in iter_prompts(path, split="heldout"):
            requests.append(to_generate_request(prompt, params=params, publish=True))
            if len(requests) >= limit:
                break
        if requests:
            return requests, f"{len(requests)} held-out prompts of {path}"
    synthetic = [common_pb2.GenerateRequest(
        pool_key=f"shop/{i % 4}", publish=True, params=params,
        blocks=[common_pb2.PromptBlock(id="instr-1", kind=common_pb2.BLOCK_KIND_INSTRUCTION,
                                       text="Write the selling points of this item.\n"),
                common_pb2.PromptBlock(id=f"item-{i}", kind=common_pb2.BLOCK_KIND_ITEM,
                                       text=f"Item {i}: wireless headphones, {10 + i} h battery, foldable.\n")])
        for i in range(32)]
    return synthetic, "32 synthetic prompts (no workload under the data dir)"


async def one_request(stub, request: common_pb2.GenerateRequest, deadline_s: float, metadata, t0: float) -> Sample:
    sent = time.perf_counter()
    ttft = None
    try:
        call = stub.Generate(request, timeout=deadline_s, metadata=metadata)
        async for chunk in call:
            if ttft is None and chunk.HasField("delta") and chunk.delta.token_ids:
                ttft = time.perf_counter() - sent
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return Sample(sent - t0, ttft, time.perf_counter() - sent, code, request.request_id,
                  sum(len(b.text) for b in request.blocks))


async def offer(stub, requests, rate: float, duration_s: float, deadline_s: float, metadata, rng: random.Random,
                bar: tqdm | None = None, on_sample=None) -> tuple[list[Sample], float]:
    """Poisson arrivals at `rate` for `duration_s`; waits for the stragglers. Returns samples, elapsed."""
    t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []
    next_at = 0.0
    i = 0

    def done(task: asyncio.Task) -> None:
        if bar is not None:
            bar.update(1)
        if on_sample is not None:
            on_sample(task.result())

    while next_at < duration_s:
        delay = next_at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        request = common_pb2.GenerateRequest()
        request.CopyFrom(requests[i % len(requests)])
        request.request_id = f"load-{rate:g}-{i}"
        task = asyncio.create_task(one_request(stub, request, deadline_s, metadata, t0))
        task.add_done_callback(done)
        tasks.append(task)
        i += 1
        next_at += rng.expovariate(rate)
    samples = list(await asyncio.gather(*tasks))
    return samples, time.perf_counter() - t0


# ---------------------------------------------------------------- memory
def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc (Linux), in MiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def services_rss(stack) -> dict[str, float]:
    return {p.name: rss_mb(p.process.pid) for p in stack.processes}


# ---------------------------------------------------------------- the run
async def find_and_hold(args, router_address: str, requests, stack, console: Console) -> dict:
    metadata = bearer_metadata(args.token_file.read_text().strip() if args.token_file else None)
    rng = random.Random(args.seed)
    async with grpc.aio.insecure_channel(router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        # Warm-up: the first requests load pools, fill caches and compile nothing; not measured.
        await offer(stub, requests, args.start_rate, min(5.0, args.step_s), args.deadline_s, metadata, rng)
        steps: list[WindowFigures] = []
        rate, best = args.start_rate, None
        while rate <= args.max_rate:
            with tqdm(total=None, desc=f"step {rate:.2f} req/s", unit="req", leave=False) as bar:
                samples, elapsed = await offer(stub, requests, rate, args.step_s, args.deadline_s, metadata, rng, bar)
            figures = WindowFigures.of(rate, samples, elapsed, args.step_s, grace_s(args))
            steps.append(figures)
            console.print(f"  offered {rate:6.2f} req/s: served {figures.requests_per_s:6.2f} req/s, TTFT p50 "
                          f"{figures.ttft_p50_s * 1000:7.1f} ms p99 {figures.ttft_p99_s * 1000:7.1f} ms, errors "
                          f"{figures.error_rate:.2%} -> {'keeps' if figures.keeps(args.target_p99_ttft_s) else 'misses'}"
                          " the target")
            if not figures.keeps(args.target_p99_ttft_s):
                break
            best = rate
            rate *= args.step_factor
        # Headroom: a search step is short, a hold is long, and a shared CPU's speed drifts.
        hold_rate = best * args.hold_fraction if best is not None else args.start_rate
        console.print(f"holding {hold_rate:.2f} req/s for {args.hold_s:.0f} s ("
                      + (f"{args.hold_fraction:.0%} of {best:.2f}, the highest rate that kept the target)" if best
                         else "the target was missed even at the start rate)"))
        rss_start = services_rss(stack)
        rss_samples: list[tuple[float, float]] = []
        live: list[Sample] = []
        t_hold = time.perf_counter()

        def on_sample(sample: Sample) -> None:
            live.append(sample)

        async def sample_memory() -> None:
            while True:
                rss_samples.append((time.perf_counter() - t_hold, sum(services_rss(stack).values())))
                await asyncio.sleep(5.0)

        sampler = asyncio.create_task(sample_memory())
        with tqdm(total=round(hold_rate * args.hold_s), desc=f"hold {hold_rate:.2f} req/s", unit="req") as bar:
            async def show() -> None:
                while True:
                    await asyncio.sleep(2.0)
                    ttfts = [s.ttft_s for s in live if s.ok and s.ttft_s is not None]
                    bar.set_postfix(p99_ms=f"{percentile(ttfts, 99) * 1000:.0f}",
                                    errors=sum(not s.ok for s in live))

            shower = asyncio.create_task(show())
            samples, elapsed = await offer(stub, requests, hold_rate, args.hold_s, args.deadline_s, metadata, rng, bar,
                                           on_sample)
            shower.cancel()
        sampler.cancel()
        rss_end = services_rss(stack)
        hold = WindowFigures.of(hold_rate, samples, elapsed, args.hold_s, grace_s(args))
    slowest = sorted(samples, key=lambda s: s.ttft_s if s.ok and s.ttft_s is not None else s.total_s)[-20:]
    return {"steps": steps, "hold": hold, "slowest": slowest, "rss_start": rss_start, "rss_end": rss_end, "rss_samples": rss_samples}


def main(argv: list[str] | None = None) -> None:
    quick = quick_run()
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ADACCEL_DATA_DIR", "data")))
    parser.add_argument("--model-path", type=Path, default=None, help="default: the built default model, else tiny")
    parser.add_argument("--decoders", type=int, default=1)
    parser.add_argument("--router", default="", help="an already running router host:port (no stack started)")
    parser.add_argument("--token-file", type=Path, default=None, help="bearer token for a router that wants one")
    parser.add_argument("--target-p99-ttft-s", type=float, default=1.0, help="p99 TTFT the found rate must keep")
    parser.add_argument("--start-rate", type=float, default=0.5, help="first offered rate, requests/s")
    parser.add_argument("--step-factor", type=float, default=1.5)
    parser.add_argument("--max-rate", type=float, default=200.0)
    parser.add_argument("--step-s", type=float, default=10.0 if quick else 30.0, help="seconds per search step")
    parser.add_argument("--hold-s", type=float, default=30.0 if quick else 300.0)
    parser.add_argument("--hold-fraction", type=float, default=0.75,
                        help="hold this share of the highest rate that kept the target")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--deadline-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/load.json")
    args = parser.parse_args(argv)
    console = Console()
    data_dir = args.data_dir.resolve()
    requests, source = load_requests(data_dir, args.max_new_tokens)

    from services.stack import Stack, resolve_model

    stack = None
    model = "(external router)"
    if not args.router:
        model_path = resolve_model(data_dir, args.model_path)
        model = str(model_path)
        # One torch thread per process: the services share the machine with the load client.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import shutil

        shutil.rmtree(data_dir / "load", ignore_errors=True)  # fresh stores: runs comparable
        stack = Stack(data_dir=data_dir / "load", model_path=model_path, decoders=args.decoders,
                      extra_env={"decoder": {"TORCH_THREADS": "1"}})
        console.print(f"starting the stack ({args.decoders} decoder(s), model {model_path}) ...")
        stack.start()
    try:
        router = args.router or stack.address("router")
        console.print(f"load from {source}; target p99 TTFT {args.target_p99_ttft_s:.2f} s")
        run = asyncio.run(find_and_hold(args, router, requests, stack, console))
    finally:
        if stack is not None:
            stack.stop()
    hold: WindowFigures = run["hold"]
    growth = {name: run["rss_end"].get(name, 0.0) - mb for name, mb in run["rss_start"].items()}
    results = {
        "requests_per_s": hold.requests_per_s, "ttft_p50_s": hold.ttft_p50_s, "ttft_p99_s": hold.ttft_p99_s,
        "error_rate": hold.error_rate, "duration_s": hold.duration_s, "rss_growth_mb": sum(growth.values()),
        "device": device_name(), "model": model, "decoders": args.decoders, "prompts": source,
        "max_new_tokens": args.max_new_tokens, "target_p99_ttft_s": args.target_p99_ttft_s,
        "offered_rate": hold.offered_rate, "requests": hold.requests, "errors": hold.errors,
        "rss_start_mb": run["rss_start"], "rss_end_mb": run["rss_end"], "rss_growth_by_service_mb": growth,
        # Caches (decoder block KV, kv-store memory tier) fill up to their budgets early in a hold;
        # growth over its second half is what a leak would show.
        "rss_growth_second_half_mb": second_half_growth(run["rss_samples"], args.hold_s),
        "rss_total_mb_over_time": [[round(t, 1), round(mb, 1)] for t, mb in run["rss_samples"]],
        # The hold's slowest requests (by TTFT, or total time when they failed): when and what.
        "slowest_requests": [dataclasses.asdict(s) for s in run["slowest"]],
        "steps": [dataclasses.asdict(s) for s in run["steps"]],
        "quick": quick_run(),
        "note": "machine shared with other jobs during the run; absolute figures are for this machine only",
    }
    path = write_results("load.json", results) if args.out is None else _write(args.out, results)
    table = Table(title=f"load against the router ({device_name()})")
    for column in ("window", "offered/s", "served/s", "kept up", "TTFT p50 ms", "TTFT p99 ms", "errors",
                   "requests", "keeps"):
        table.add_column(column, justify="right")
    for s in [*run["steps"], hold]:
        table.add_row("step" if s is not hold else f"hold {args.hold_s:.0f} s", f"{s.offered_rate:.2f}",
                      f"{s.requests_per_s:.2f}", f"{s.kept_up:.0%}", f"{s.ttft_p50_s * 1000:.1f}",
                      f"{s.ttft_p99_s * 1000:.1f}", f"{s.error_rate:.2%}", str(s.requests),
                      "yes" if s.keeps(args.target_p99_ttft_s) else "no")
    console.print(table)
    console.print(f"memory growth over the hold: {sum(growth.values()):+.1f} MiB in all, "
                  f"{results['rss_growth_second_half_mb']:+.1f} MiB over its second half "
                  f"({', '.join(f'{k} {v:+.1f}' for k, v in growth.items())}); written to {path}")


def second_half_growth(samples: list[tuple[float, float]], hold_s: float) -> float:
    """Total RSS at the end minus at the hold's midpoint (nearest samples), MiB."""
    if len(samples) < 2:
        return 0.0
    middle = min(samples, key=lambda s: abs(s[0] - hold_s / 2))
    return samples[-1][1] - middle[1]


def _write(path: Path, results: dict) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


if __name__ == "__main__":
    main()
