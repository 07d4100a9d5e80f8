"""make bench-load: open-loop load against the router with every service up, then a long hold.

1. Start the stack (broker, pool, kv-store, decoder(s), router as processes; the default model
   when built, else the tiny random stand-in, which the output says).
2. Step the offered rate (Poisson arrivals, asyncio gRPC client) up from --start-rate by
   --step-factor until p99 time-to-first-token passes --target-p99-ttft-s or more than 0.1% of
   requests fail; the throughput found is the last rate that kept both.
3. Hold --hold-fraction of that rate for --hold-s (5 minutes; BENCH_QUICK=1: 30 s), sampling the
   services' resident memory, and report requests/s, TTFT p50/p99 (whole hold and per 10-second
   window), error rate and memory growth; optionally kill -9 a decoder in the middle
   (--kill-decoder-at-s: every request must then complete or get a retryable status).

The target: --target-p99-ttft-s, or by default 3x the TTFT a request's prompt gets at low load,
measured first (requests one at a time, nothing queued, spread over each task's prompt lengths;
a line over prompt length, see TtftTarget), so the same criterion holds for a 2.7M model and a
real one and for prompts of 400 and 10,000 characters. A window keeps it when the p99 of
TTFT / target is at most 1. The hold is recorded as held only if it keeps the target with no
errors, keeps up and its memory does not grow more than 5% over its second half.

Where a slow request's time went: the decoder's summary splits its TTFT into prepare, block
lookup (kv-store reads), queue (waiting for the model thread), prefill and first step; the rest
of the client's TTFT is the router (its queue, replica choice, the hop). The slowest requests of
the hold are written with that split, and bench/results/<name>.png plots TTFT over the run.

Writes bench/results/load.json (or --out):
  {"held", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "target_p99_ttft_s", "windows", "slowest_requests", ...}
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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from adaccel.v1 import common_pb2, router_pb2_grpc
from bench.common import RESULTS_DIR, quick_run, write_results
from common.machine import device_name
from common.rpc.security import bearer_metadata

MAX_ERROR_RATE = 0.001
WINDOW_S = 10.0  # the hold's p99 is also reported per window of this many seconds
# Statuses a caller may retry (the router's and decoders' contract); anything else during a
# decoder kill, DEADLINE_EXCEEDED above all, counts as a request the failover lost.
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
WAIT_PARTS = ("prepare_s", "block_lookup_s", "queue_s", "prefill_s", "first_step_s")
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
    decoder_id: str = ""
    task: str = ""  # the workload task of its prompt
    # Where the TTFT went: the decoder's split (WAIT_PARTS) and "router_s", the client's TTFT less
    # the decoder's (router queue, replica choice, the hops).
    waits: dict[str, float] = dataclasses.field(default_factory=dict)

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
    ttft_p99_by_task_s: dict[str, float] = dataclasses.field(default_factory=dict)
    # p99 over requests of TTFT / that request's target (<= 1: the window keeps the target).
    over_target_p99: float = 0.0

    @classmethod
    def of(cls, offered_rate: float, samples: list[Sample], elapsed_s: float, window_s: float,
           grace_s: float, target: TtftTarget) -> WindowFigures:
        ttfts = [s.ttft_s for s in samples if s.ok and s.ttft_s is not None]
        errors: dict[str, int] = {}
        for s in samples:
            if not s.ok:
                errors[s.code] = errors.get(s.code, 0) + 1
        ok = sum(s.ok for s in samples)
        in_window = sum(s.ok and s.done_s <= window_s for s in samples) / window_s
        early = [s for s in samples if s.sent_s <= window_s - grace_s]
        kept_up = sum(s.done_s <= window_s for s in early) / len(early) if early else 1.0
        over = [s.ttft_s / target.limit_s(s.prompt_chars) for s in samples if s.ok and s.ttft_s is not None]
        return cls(offered_rate, elapsed_s, len(samples), ok, ok / elapsed_s if elapsed_s else 0.0, in_window, kept_up,
                   percentile(ttfts, 50), percentile(ttfts, 99),
                   (len(samples) - ok) / len(samples) if samples else 1.0, errors, p99_by_task(samples),
                   percentile(over, 99))

    def keeps(self) -> bool:
        """p99 of TTFT over target within 1 and the errors within bounds, and the service keeps up
        (no backlog building)."""
        return (self.requests > 0 and self.over_target_p99 <= 1.0 and self.error_rate <= MAX_ERROR_RATE
                and self.kept_up >= KEEP_UP)


@dataclass(frozen=True, slots=True)
class TtftTarget:
    """Each request's TTFT target: `fixed_s`, or `factor` x the TTFT its prompt gets at low load,
    predicted by a line over prompt length fitted to requests sent one at a time. Prompt lengths
    differ ~25x in this workload (a 2-3k-token recommendation prompt's prefill alone takes ~10x
    an item prompt's, and varies 4x within its task), so one p50 for the mix, or per task, would
    measure the mix, not the queueing the criterion is about.

    >>> t = TtftTarget.fit([(100, 0.3), (1000, 1.2), (3000, 3.2)])
    >>> round(t.low_load_s(2000), 2), round(t.limit_s(2000), 2)
    (2.2, 6.6)
    """

    factor: float = 3.0
    intercept_s: float = 0.0
    per_char_s: float = 0.0
    fixed_s: float | None = None

    @classmethod
    def fit(cls, pairs: list[tuple[int, float]], factor: float = 3.0) -> TtftTarget:
        """Least squares over (prompt chars, low-load TTFT); slope and intercept kept >= 0."""
        import numpy as np

        chars = np.array([c for c, _ in pairs], dtype=float)
        ttfts = np.array([t for _, t in pairs], dtype=float)
        if len(pairs) < 2 or np.ptp(chars) == 0:
            return cls(factor, float(np.median(ttfts)) if len(pairs) else 1.0, 0.0)
        slope, intercept = np.polyfit(chars, ttfts, 1)
        slope = max(0.0, float(slope))
        intercept = max(float(intercept), 0.25 * float(ttfts.min()))
        return cls(factor, intercept, slope)

    def low_load_s(self, chars: int) -> float:
        return self.intercept_s + self.per_char_s * chars

    def limit_s(self, chars: int) -> float:
        return self.fixed_s if self.fixed_s is not None else self.factor * self.low_load_s(chars)

    def describe(self) -> str:
        if self.fixed_s is not None:
            return f"p99 TTFT <= {self.fixed_s:.2f} s (given)"
        return (f"p99 of TTFT / ({self.factor:g} x low-load TTFT) <= 1, low-load TTFT = {self.intercept_s:.3f} s + "
                f"{self.per_char_s * 1000:.3f} ms per prompt character")


def p99_by_task(samples: list[Sample]) -> dict[str, float]:
    by_task: dict[str, list[float]] = {}
    for s in samples:
        if s.ok and s.ttft_s is not None:
            by_task.setdefault(s.task, []).append(s.ttft_s)
    return {task: percentile(ttfts, 99) for task, ttfts in sorted(by_task.items())}


def grace_s(target: TtftTarget, longest_chars: int) -> float:
    """Time a request may take and still count as answered in its window."""
    return max(2.0, 2 * target.limit_s(longest_chars))


# ---------------------------------------------------------------- requests
def load_requests(data_dir: Path, max_new_tokens: int, seed: int, limit: int = 400
                  ) -> tuple[list[common_pb2.GenerateRequest], list[str], str]:
    """Held-out workload prompts when `make model` wrote them, else a few synthetic ones; with
    each request's task. Shuffled (seeded): the file lists its tasks one after another, and sent
    in that order a hold met ~100 generative-recommendation prompts of 2-3k tokens back to back,
    a burst of the heaviest prefills no real mix sends."""
    params = common_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    path = data_dir / "workload" / "prompts.jsonl"
    if path.is_file():
        from common.workload.export import iter_prompts, to_generate_request

        pairs = []
        for prompt in iter_prompts(path, split="heldout"):
            pairs.append((to_generate_request(prompt, params=params, publish=True), prompt.task))
            if len(pairs) >= limit:
                break
        if pairs:
            random.Random(seed).shuffle(pairs)
            requests, tasks = (list(column) for column in zip(*pairs))
            counts = {task: tasks.count(task) for task in sorted(set(tasks))}
            return requests, tasks, f"{len(requests)} held-out prompts of {path}, shuffled ({counts})"
    synthetic = [common_pb2.GenerateRequest(
        pool_key=f"shop/{i % 4}", publish=True, params=params,
        blocks=[common_pb2.PromptBlock(id="instr-1", kind=common_pb2.BLOCK_KIND_INSTRUCTION,
                                       text="Write the selling points of this item.\n"),
                common_pb2.PromptBlock(id=f"item-{i}", kind=common_pb2.BLOCK_KIND_ITEM,
                                       text=f"Item {i}: wireless headphones, {10 + i} h battery, foldable.\n")])
        for i in range(32)]
    return synthetic, ["synthetic"] * len(synthetic), "32 synthetic prompts (no workload under the data dir)"


async def one_request(stub, request: common_pb2.GenerateRequest, deadline_s: float, metadata, t0: float,
                      task: str = "") -> Sample:
    sent = time.perf_counter()
    ttft = None
    summary = None
    try:
        call = stub.Generate(request, timeout=deadline_s, metadata=metadata)
        async for chunk in call:
            if ttft is None and chunk.HasField("delta") and chunk.delta.token_ids:
                ttft = time.perf_counter() - sent
            if chunk.HasField("summary"):
                summary = chunk.summary
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    sample = Sample(sent - t0, ttft, time.perf_counter() - sent, code, request.request_id,
                    sum(len(b.text) for b in request.blocks), task=task)
    if summary is not None:
        stats = summary.stats
        sample.decoder_id = summary.decoder_id
        sample.waits = {part: round(getattr(stats, part), 4) for part in WAIT_PARTS}
        if ttft is not None:
            sample.waits["router_s"] = round(max(0.0, ttft - stats.ttft_s), 4)
    return sample


def windows(samples: list[Sample], width_s: float = WINDOW_S) -> list[dict]:
    """Requests by the window they were sent in: count, errors, TTFT p50/p99 (a stall shows as
    one window's p99 far above the rest while the hold's p50 does not move)."""
    if not samples:
        return []
    out = []
    last = max(s.sent_s for s in samples)
    start = 0.0
    while start <= last:
        inside = [s for s in samples if start <= s.sent_s < start + width_s]
        ttfts = [s.ttft_s for s in inside if s.ok and s.ttft_s is not None]
        out.append({"start_s": start, "requests": len(inside), "errors": sum(not s.ok for s in inside),
                    "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99)})
        start += width_s
    return out


def blame(sample: Sample) -> str:
    """The part of a request's TTFT that took longest (for the slowest requests' table)."""
    if not sample.waits:
        return "-" if sample.ok else sample.code
    part, seconds = max(sample.waits.items(), key=lambda kv: kv[1])
    return f"{part.removesuffix('_s')} {seconds:.2f} s"


class Workload:
    """The requests to send, in one shuffled order that every window continues (a window used to
    restart at the first request, so each search step re-sent the same head of the list and the
    hold alone reached the long prompts at its end)."""

    def __init__(self, requests: list[common_pb2.GenerateRequest], tasks: list[str]):
        self.requests = requests
        self.tasks = tasks
        self.sent = 0

    def next(self, request_id: str) -> tuple[common_pb2.GenerateRequest, str]:
        i = self.sent % len(self.requests)
        self.sent += 1
        request = common_pb2.GenerateRequest()
        request.CopyFrom(self.requests[i])
        request.request_id = request_id
        return request, self.tasks[i]

    def of_task(self, task: str) -> list[common_pb2.GenerateRequest]:
        return [r for r, t in zip(self.requests, self.tasks) if t == task]


async def low_load_ttft(stub, workload: Workload, per_task: int, deadline_s: float, metadata
                        ) -> list[tuple[str, int, float]]:
    """(task, prompt chars, TTFT) of `per_task` requests of each task sent one at a time (nothing
    queued anywhere), spread over the task's prompt lengths: the low-load baseline."""
    out = []
    t0 = time.perf_counter()
    for task in sorted(set(workload.tasks)):
        prompts = sorted(workload.of_task(task), key=lambda r: sum(len(b.text) for b in r.blocks))
        for i in range(per_task):
            request = common_pb2.GenerateRequest()
            request.CopyFrom(prompts[round(i * (len(prompts) - 1) / max(per_task - 1, 1))])
            request.request_id = f"low-load-{task}-{i}"
            sample = await one_request(stub, request, deadline_s, metadata, t0, task)
            if sample.ok and sample.ttft_s is not None:
                out.append((task, sample.prompt_chars, sample.ttft_s))
    return out


async def offer(stub, workload: Workload, rate: float, duration_s: float, deadline_s: float, metadata,
                rng: random.Random, bar: tqdm | None = None, on_sample=None) -> tuple[list[Sample], float]:
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
        request, kind = workload.next(f"load-{rate:g}-{i}")
        task = asyncio.create_task(one_request(stub, request, deadline_s, metadata, t0, kind))
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
async def find_and_hold(args, router_address: str, workload: Workload, stack, console: Console) -> dict:
    metadata = bearer_metadata(args.token_file.read_text().strip() if args.token_file else None)
    rng = random.Random(args.seed)
    async with grpc.aio.insecure_channel(router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        # Warm-up: the first requests load pools, fill caches and compile nothing; not measured.
        await offer(stub, workload, args.start_rate, min(5.0, args.step_s), args.deadline_s, metadata, rng)
        baseline = await low_load_ttft(stub, workload, args.low_load_requests, args.deadline_s, metadata)
        target = TtftTarget.fit([(c, t) for _, c, t in baseline])
        if args.target_p99_ttft_s is not None:
            target = dataclasses.replace(target, fixed_s=args.target_p99_ttft_s)
        for task in sorted({t for t, _, _ in baseline}):
            ttfts = [t for k, _, t in baseline if k == task]
            console.print(f"low load, {task} ({len(ttfts)} requests one at a time): TTFT p50 "
                          f"{percentile(ttfts, 50) * 1000:.0f} ms (min {min(ttfts) * 1000:.0f}, "
                          f"max {max(ttfts) * 1000:.0f})")
        console.print(f"target: {target.describe()}")
        grace = grace_s(target, max(sum(len(b.text) for b in r.blocks) for r in workload.requests))
        steps: list[WindowFigures] = []
        rate, best = args.start_rate, None
        while args.hold_rate is None and rate <= args.max_rate:
            with tqdm(total=None, desc=f"step {rate:.2f} req/s", unit="req", leave=False) as bar:
                samples, elapsed = await offer(stub, workload, rate, args.step_s, args.deadline_s, metadata, rng, bar)
            figures = WindowFigures.of(rate, samples, elapsed, args.step_s, grace, target)
            steps.append(figures)
            console.print(f"  offered {rate:6.2f} req/s: served {figures.requests_per_s:6.2f} req/s, TTFT p50 "
                          f"{figures.ttft_p50_s * 1000:7.1f} ms p99 {figures.ttft_p99_s * 1000:7.1f} ms, errors "
                          f"{figures.error_rate:.2%}, p99 TTFT/target {figures.over_target_p99:.2f} -> "
                          f"{'keeps' if figures.keeps() else 'misses'} the target")
            if not figures.keeps():
                break
            best = rate
            rate *= args.step_factor
        # Headroom: a search step is short, a hold is long, and a shared CPU's speed drifts.
        hold_rate = best * args.hold_fraction if best is not None else args.start_rate
        if args.hold_rate is not None:
            hold_rate = args.hold_rate
        console.print(f"holding {hold_rate:.2f} req/s for {args.hold_s:.0f} s ("
                      + ("given, no ramp)" if args.hold_rate is not None else
                         f"{args.hold_fraction:.0%} of {best:.2f}, the highest rate that kept the target)" if best
                         else "the target was missed even at the start rate)"))
        rss_start = services_rss(stack)
        rss_samples: list[tuple[float, float]] = []
        live: list[Sample] = []
        t_hold = time.perf_counter()
        killed: dict = {}

        def on_sample(sample: Sample) -> None:
            live.append(sample)

        async def sample_memory() -> None:
            while True:
                rss_samples.append((time.perf_counter() - t_hold, sum(services_rss(stack).values())))
                await asyncio.sleep(5.0)

        async def kill_a_decoder() -> None:
            await asyncio.sleep(args.kill_decoder_at_s)
            victim = f"decoder-{args.decoders - 1}"
            await asyncio.to_thread(stack.kill, victim, signal.SIGKILL)
            killed.update(name=victim, at_s=round(time.perf_counter() - t_hold, 2))
            console.print(f"  killed {victim} with SIGKILL at {killed['at_s']:.1f} s into the hold")

        background = [asyncio.create_task(sample_memory())]
        if args.kill_decoder_at_s is not None and stack is not None:
            background.append(asyncio.create_task(kill_a_decoder()))
        with tqdm(total=round(hold_rate * args.hold_s), desc=f"hold {hold_rate:.2f} req/s", unit="req") as bar:
            async def show() -> None:
                while True:
                    await asyncio.sleep(2.0)
                    ttfts = [s.ttft_s for s in live if s.ok and s.ttft_s is not None]
                    bar.set_postfix(p99_ms=f"{percentile(ttfts, 99) * 1000:.0f}",
                                    errors=sum(not s.ok for s in live))

            shower = asyncio.create_task(show())
            samples, elapsed = await offer(stub, workload, hold_rate, args.hold_s, args.deadline_s, metadata, rng, bar,
                                           on_sample)
            shower.cancel()
        for task in background:
            task.cancel()
        rss_end = services_rss(stack)
        hold = WindowFigures.of(hold_rate, samples, elapsed, args.hold_s, grace, target)
    slowest = sorted(samples, key=lambda s: s.ttft_s if s.ok and s.ttft_s is not None else s.total_s)[-20:]
    return {"steps": steps, "hold": hold, "samples": samples, "slowest": slowest, "rss_start": rss_start,
            "rss_end": rss_end, "rss_samples": rss_samples, "low_load_ttft_s": baseline, "killed": killed,
            "target": target}


def main(argv: list[str] | None = None) -> None:
    quick = quick_run()
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ADACCEL_DATA_DIR", "data")))
    parser.add_argument("--model-path", type=Path, default=None, help="default: the built default model, else tiny")
    parser.add_argument("--decoders", type=int, default=1)
    parser.add_argument("--policy", default="affinity", choices=("affinity", "least_loaded", "round_robin"),
                        help="the router's scheduling policy")
    parser.add_argument("--router", default="", help="an already running router host:port (no stack started)")
    parser.add_argument("--token-file", type=Path, default=None, help="bearer token for a router that wants one")
    parser.add_argument("--target-p99-ttft-s", type=float, default=None,
                        help="p99 TTFT the found rate must keep (default: 3x the low-load p50)")
    parser.add_argument("--low-load-requests", type=int, default=6 if quick else 12,
                        help="requests sent one at a time for the low-load TTFT baseline")
    parser.add_argument("--start-rate", type=float, default=0.5, help="first offered rate, requests/s")
    parser.add_argument("--step-factor", type=float, default=1.5)
    parser.add_argument("--max-rate", type=float, default=200.0)
    parser.add_argument("--step-s", type=float, default=10.0 if quick else 30.0, help="seconds per search step")
    parser.add_argument("--hold-s", type=float, default=30.0 if quick else 300.0)
    parser.add_argument("--hold-fraction", type=float, default=0.8,
                        help="hold this share of the highest rate that kept the target")
    parser.add_argument("--hold-rate", type=float, default=None,
                        help="hold this rate without a ramp (another run's hold, for before/after)")
    parser.add_argument("--kill-decoder-at-s", type=float, default=None,
                        help="kill -9 the last decoder this many seconds into the hold (failover under load)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="the decoders' prefill_chunk_tokens (0: whole prompts at once, the old behaviour)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--deadline-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/load.json")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    data_dir = args.data_dir.resolve()
    requests, tasks, source = load_requests(data_dir, args.max_new_tokens, args.seed)

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
        decoder_env = {"TORCH_THREADS": "1"}
        if args.prefill_chunk_tokens is not None:
            decoder_env["PREFILL_CHUNK_TOKENS"] = str(args.prefill_chunk_tokens)
        stack = Stack(data_dir=data_dir / "load", model_path=model_path, decoders=args.decoders,
                      extra_env={"decoder": decoder_env, "router": {"SCHEDULING_POLICY": args.policy}})
        console.print(f"starting the stack ({args.decoders} decoder(s), {args.policy} routing, model {model_path}) ...")
        stack.start()
    try:
        router = args.router or stack.address("router")
        console.print(f"load from {source}")
        given_target = args.target_p99_ttft_s
        run = asyncio.run(find_and_hold(args, router, Workload(requests, tasks), stack, console))
    finally:
        if stack is not None:
            stack.stop()
    target: TtftTarget = run["target"]
    hold: WindowFigures = run["hold"]
    samples: list[Sample] = run["samples"]
    growth = {name: run["rss_end"].get(name, 0.0) - mb for name, mb in run["rss_start"].items()}
    second_half_mb = second_half_growth(run["rss_samples"], args.hold_s)
    middle_mb = midpoint_rss(run["rss_samples"], args.hold_s)
    hold_windows = windows(samples)
    lost = {code: n for code, n in hold.errors.items() if code not in RETRYABLE}
    criteria = {
        f"p99 of TTFT / target <= 1 ({hold.over_target_p99:.2f})": hold.over_target_p99 <= 1.0,
        "no errors": not hold.errors if args.kill_decoder_at_s is None else not lost,
        "keeps up": hold.kept_up >= KEEP_UP,
        "memory growth over the second half < 5%": middle_mb > 0 and second_half_mb < 0.05 * middle_mb,
    }
    if args.kill_decoder_at_s is not None:
        # With a replica killed mid-hold the capacity halves: the criterion is failover (every
        # request completes or gets a retryable status; none hangs to its deadline), not p99.
        criteria = {"every request completed or got a retryable status": not lost,
                    "memory growth over the second half < 5%":
                        criteria["memory growth over the second half < 5%"]}
    held = all(criteria.values())
    out_name = args.out.name if args.out is not None else "load.json"
    results = {
        "held": held, "criteria": criteria,
        "requests_per_s": hold.requests_per_s, "ttft_p50_s": hold.ttft_p50_s, "ttft_p99_s": hold.ttft_p99_s,
        "ttft_p99_by_task_s": hold.ttft_p99_by_task_s, "ttft_over_target_p99": hold.over_target_p99,
        "target": dataclasses.asdict(target), "target_rule": target.describe(),
        "target_from": "given" if given_target is not None else "3x the low-load TTFT of the prompt's length",
        "low_load_ttft_p50_s": percentile([t for _, _, t in run["low_load_ttft_s"]], 50),
        "low_load_requests": [{"task": k, "prompt_chars": c, "ttft_s": t} for k, c, t in run["low_load_ttft_s"]],
        "error_rate": hold.error_rate, "duration_s": hold.duration_s, "rss_growth_mb": sum(growth.values()),
        "device": device_name(), "model": model, "decoders": args.decoders, "policy": args.policy,
        "prompts": source, "max_new_tokens": args.max_new_tokens, "hold_fraction": args.hold_fraction,
        "prefill_chunk_tokens": args.prefill_chunk_tokens if args.prefill_chunk_tokens is not None else "default",
        "offered_rate": hold.offered_rate, "requests": hold.requests, "errors": hold.errors,
        "errors_not_retryable": lost, "killed": run["killed"],
        "rss_start_mb": run["rss_start"], "rss_end_mb": run["rss_end"], "rss_growth_by_service_mb": growth,
        # Caches (decoder block KV, kv-store memory tier) fill up to their budgets early in a hold;
        # growth over its second half is what a leak would show.
        "rss_growth_second_half_mb": second_half_mb,
        "rss_growth_second_half_pct": 100 * second_half_mb / middle_mb if middle_mb else None,
        "rss_total_mb_over_time": [[round(t, 1), round(mb, 1)] for t, mb in run["rss_samples"]],
        "windows": hold_windows,
        # The hold's slowest requests (by TTFT, or total time when they failed): when, where and what waited.
        "slowest_requests": [dataclasses.asdict(s) for s in run["slowest"]],
        "steps": [dataclasses.asdict(s) for s in run["steps"]],
        "quick": quick_run(),
        "note": "absolute figures are for this machine only; other jobs sharing its cores move them",
    }
    path = write_results(out_name, results) if args.out is None or args.out.parent == RESULTS_DIR else _write(
        args.out, results)
    plot_path = plot_ttft(samples, hold_windows, target, run["killed"], path.with_suffix(".png"),
                          title=f"{Path(model).name}, {args.decoders} decoder(s), {hold.offered_rate:.2f} req/s")
    table = Table(title=f"load against the router ({device_name()})")
    for column in ("window", "offered/s", "served/s", "kept up", "TTFT p50 ms", "TTFT p99 ms", "errors",
                   "requests", "keeps"):
        table.add_column(column, justify="right")
    for s in [*run["steps"], hold]:
        table.add_row("step" if s is not hold else f"hold {args.hold_s:.0f} s", f"{s.offered_rate:.2f}",
                      f"{s.requests_per_s:.2f}", f"{s.kept_up:.0%}", f"{s.ttft_p50_s * 1000:.1f}",
                      f"{s.ttft_p99_s * 1000:.1f}", f"{s.error_rate:.2%}", str(s.requests),
                      "yes" if s.keeps() else "no")
    console.print(table)
    per_window = Table(title=f"the hold per {WINDOW_S:.0f} s window (sent in)")
    for column in ("from s", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms"):
        per_window.add_column(column, justify="right")
    for w in hold_windows:
        per_window.add_row(f"{w['start_s']:.0f}", str(w["requests"]), str(w["errors"]), f"{w['ttft_p50_s'] * 1000:.0f}",
                           f"{w['ttft_p99_s'] * 1000:.0f}")
    console.print(per_window)
    slow = Table(title="the hold's slowest requests: where the TTFT went (s)")
    for column in ("sent at s", "task", "chars", "TTFT", "target", "code", "decoder", *[p.removesuffix("_s") for p in WAIT_PARTS], "router",
                   "longest"):
        slow.add_column(column, justify="right")
    for sample in run["slowest"][-8:]:
        slow.add_row(f"{sample.sent_s:.1f}", sample.task, str(sample.prompt_chars),
                     f"{sample.ttft_s:.2f}" if sample.ttft_s is not None else "-",
                     f"{target.limit_s(sample.prompt_chars):.2f}", sample.code,
                     sample.decoder_id or "-", *[f"{sample.waits[p]:.2f}" if p in sample.waits else "-"
                                                 for p in (*WAIT_PARTS, "router_s")], blame(sample))
    console.print(slow)
    for name, ok in criteria.items():
        console.print(f"  [{'green' if ok else 'red'}]{'met' if ok else 'NOT MET'}[/]: {name}")
    console.print(f"hold {'HELD' if held else 'NOT HELD'}; memory growth over the hold: {sum(growth.values()):+.1f} "
                  f"MiB in all, {second_half_mb:+.1f} MiB over its second half "
                  f"({', '.join(f'{k} {v:+.1f}' for k, v in growth.items())}); written to {path}, plot {plot_path}")


def plot_ttft(samples: list[Sample], hold_windows: list[dict], target: TtftTarget, killed: dict, path: Path,
              *, title: str) -> Path:
    """Each request's TTFT against when it was sent (by task) with its target (a short tick), and
    the per-window p99."""
    from bench.common import figure, save_figure

    fig, ax = figure(size=(8.0, 4.0))
    for task in sorted({s.task for s in samples}):
        ok = [s for s in samples if s.ok and s.ttft_s is not None and s.task == task]
        ax.scatter([s.sent_s for s in ok], [s.ttft_s for s in ok], s=6, alpha=0.5, label=f"{task} TTFT")
    failed = [s for s in samples if not s.ok]
    if failed:
        ax.scatter([s.sent_s for s in failed], [s.total_s for s in failed], s=12, marker="x", color="red",
                   label="failed (time to status)")
    if hold_windows:
        ax.step([w["start_s"] for w in hold_windows], [w["ttft_p99_s"] for w in hold_windows], where="post",
                color="black", label=f"p99 per {WINDOW_S:.0f} s")
    ok = [s for s in samples if s.ok and s.ttft_s is not None]
    ax.scatter([s.sent_s for s in ok], [target.limit_s(s.prompt_chars) for s in ok], s=14, marker="_",
               color="orange", label="each request's target")
    if killed:
        ax.axvline(killed["at_s"], color="red", linestyle=":", label=f"kill -9 {killed['name']}")
    ax.set_xlabel("sent at (s into the hold)")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return path


def midpoint_rss(samples: list[tuple[float, float]], hold_s: float) -> float:
    """Total RSS at the sample nearest the hold's middle, MiB (0 without samples)."""
    if not samples:
        return 0.0
    return min(samples, key=lambda s: abs(s[0] - hold_s / 2))[1]


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
