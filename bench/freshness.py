"""python -m bench.freshness --data-dir DIR [--model-path P]: how fast new inventory reaches drafts.

One process runs the embedded broker, the pool service (in-process, real gRPC, real RocksDB
in a temporary directory, its Kafka updater) and the decoder side (PoolSnapshots over gRPC +
services.decoder.engine.DecodingEngine drafting from the snapshot it holds). Steps:

1. ingest: a backlog on adaccel.generated (the warm-up texts of the workload as generations,
   plus 100-token generations recombined from spans of those texts, in 8 other pools) is
   consumed from a standing start:
   records/s and tokens/s of the updater on this machine.
2. before: new items (held-out items: never in the warm pools) are decoded with the snapshot
   the decoder holds: tokens per step before their texts exist anywhere.
3. the stream: per new item, an inventory "added" event (its catalog text) and then the first
   generation about it are published, while a background stream keeps other pools busy (and the
   workload's inventory timeline, when present, is replayed onto adaccel.inventory). The lag is
   publish of the generation -> the pool version that contains it (GetVersions, polled).
4. after: the decoder refreshes its snapshots (only pools whose version moved are fetched) and
   decodes the same items again: tokens per step after.
5. removal: half of the new items are removed (inventory "removed"); after the next refresh,
   each removed item is checked for n-grams only its texts contain (5-grams, and their 4-gram
   tails, absent from every remaining text) still being drafted. The same check before the
   removal shows it would see them.

Workload: <data-dir>/workload/prompts.jsonl (+ inventory.jsonl), format in
common/workload/export.py; model: <data-dir>/models/smollm2-135m-instruct. Without them: synthetic item texts
and a tiny RANDOM-weight model, said in the output (figures then show the plumbing, not a model).
BENCH_QUICK=1: a small run (about a minute). Writes bench/results/freshness.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kafka import KafkaProducer

from adaccel.v1 import pool_pb2, pool_pb2_grpc, records_pb2
from bench.common import RESULTS_DIR, prompt_token_ids, quick_run, write_results
from common.broker import EmbeddedBroker
from common.machine import device_name
from common.modeling.default_model import default_model_path
from common.modeling.loading import load_model
from common.prompt_tokens import tokenize_chat
from common.rpc.channels import open_channel
from common.telemetry import null_telemetry
from services.decoder.engine import DecodingEngine, EngineSettings, GenerationConfig
from services.decoder.pool_snapshots import PoolSnapshots, wait_for_version
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings

QUICK = quick_run()
GENERATED, INVENTORY = "adaccel.generated", "adaccel.inventory"
ADDED, CHANGED, REMOVED = (records_pb2.INVENTORY_ACTION_ADDED, records_pb2.INVENTORY_ACTION_CHANGED,
                           records_pb2.INVENTORY_ACTION_REMOVED)
KEY, TAIL = 2, 3  # removal check: a 2-token key and the 3 tokens it must not draft any more


@dataclass
class Case:
    """A new item: its pool, catalog text, the prompt whose generation is published, the prompt measured."""

    item_id: str
    pool_key: str
    item_text: str
    first_prompt: list[int]
    eval_prompt: list[int]
    generated: list[int] = field(default_factory=list)


@dataclass
class Workload:
    source: str
    cases: list[Case]
    warm_texts: list[tuple[str, str]]  # (pool_key, text): what the pools know before the stream
    inventory: list[records_pb2.InventoryEvent]  # the background inventory timeline


# ---- inputs ------------------------------------------------------------------------------------


def resolve_model(data_dir: Path, model_path: Path | None) -> tuple[Path, str]:
    if model_path is not None:
        return model_path, str(model_path)
    default = default_model_path(data_dir)
    if (default / "config.json").is_file():
        return default, str(default)
    from common.modeling.tiny import save_tiny_model

    stand_in = Path(tempfile.mkdtemp(prefix="freshness-model-")) / "tiny-random-llama"
    save_tiny_model(stand_in, "llama")
    return stand_in, f"tiny RANDOM-weight llama (no model under {default})"


def workload_from_files(directory: Path, tokenizer, count: int) -> Workload | None:
    prompts_file = directory / "prompts.jsonl"
    if not prompts_file.is_file():
        return None
    from common.workload.export import load_prompts

    prompts, warmups = load_prompts(prompts_file)
    by_item: dict[str, list] = defaultdict(list)
    for prompt in prompts:
        if prompt.split == "heldout":
            for item_id in prompt.item_ids:
                by_item[item_id].append(prompt)
    cases = []
    for prompt in prompts:
        if prompt.split != "heldout" or prompt.task != "item_knowledge" or len(cases) >= count:
            continue
        item_id = prompt.item_ids[0]
        others = [p for p in by_item[item_id] if p is not prompt]
        item_text = next(b.text for b in prompt.blocks if b.kind == "item")
        first = prompt_token_ids(tokenizer, prompt)
        evaluated = prompt_token_ids(tokenizer, others[0]) if others else first
        cases.append(Case(item_id, prompt.pool_key, item_text, first, evaluated))
    new_items = {c.item_id for c in cases}
    inventory = [e for e in _inventory_events(directory / "inventory.jsonl") if e.item_id not in new_items]
    warm = [(w.pool_key, w.text) for w in warmups]
    return Workload(f"workload {directory} ({len(prompts)} prompts)", cases, warm, inventory)


def _inventory_events(path: Path) -> list[records_pb2.InventoryEvent]:
    if not path.is_file():
        return []
    from common.workload.blocks import item_block
    from common.workload.catalog import Item

    events = []
    actions = {"added": ADDED, "changed": CHANGED, "removed": REMOVED}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        event = records_pb2.InventoryEvent(item_id=obj["item_id"], action=actions[obj["kind"]])
        if obj.get("item"):
            fields = {k: v for k, v in obj["item"].items() if k in Item.__dataclass_fields__}
            fields["attributes"] = tuple(fields.get("attributes", {}).items())
            item = Item(**fields)
            event.pool_key, event.text = item.category_key, item_block(item).text
        events.append(event)
    return events


def synthetic_workload(tokenizer, count: int, rng: random.Random) -> Workload:
    """Ad-like texts from word lists: per-pool phrasing shared across items, brand and title per item."""
    pools = {"fashion/sneakers": ("sneakers", "cushioned sole", "breathable mesh"),
             "electronics/audio": ("headphones", "deep bass", "long battery life"),
             "home/kitchen": ("blender", "steel blades", "quiet motor")}
    syllables = ["ka", "ro", "vi", "lo", "mu", "ze", "ta", "ni", "so", "be"]

    def name() -> str:
        return "".join(rng.choice(syllables) for _ in range(3)).capitalize()

    def copy(pool: str, brand: str, title: str) -> str:
        noun, a, b = pools[pool]
        return (f"The {brand} {title} {noun} bring {a} and {b}. Made for every day, the {title} "
                f"is {brand}'s best {noun} yet.")

    warm = [(pool, copy(pool, name(), name())) for pool in pools for _ in range(20)]
    cases = []
    for i in range(count):
        pool = list(pools)[i % len(pools)]
        brand, title = name(), name()
        item_text = f"Item N{i:04d}: {brand} {title}. Brand {brand}. Category {pools[pool][0]}.\n"
        blocks = ["Write the selling points of this item.\n", item_text, "Answer:\n"]
        blocks_again = ["You write ad copy. Describe this item.\n", item_text, "Answer:\n"]
        cases.append(Case(f"N{i:04d}", pool, item_text, tokenize_chat(tokenizer, blocks, 1).token_ids,
                          tokenize_chat(tokenizer, blocks_again, 1).token_ids))
    return Workload("synthetic item texts (no workload file)", cases, warm, [])


# ---- measurements --------------------------------------------------------------------------


def decode(engine: DecodingEngine, prompt: list[int], pool, max_new_tokens: int, eos) -> tuple[list[int], int]:
    tokens, steps = [], 0
    for step in engine.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos), pool):
        tokens.extend(step.token_ids)
        steps += 1
    return tokens, steps


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def poll_until(condition, what: str, timeout_s: float, interval_s: float) -> float:
    """Seconds until `condition()` holds, polled every `interval_s`; TimeoutError naming `what`."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"never: {what}")
        time.sleep(interval_s)
    return time.perf_counter() - started


def wait_version(stub, pool_key: str, at_least: int, timeout_s: float = 30.0) -> float:
    """Seconds until `pool_key` reaches `at_least` (polled every 2 ms)."""
    def reached() -> bool:
        reply = stub.GetVersions(pool_pb2.VersionsRequest(pool_keys=[pool_key]), timeout=5).pools[0]
        return reply.resolved_key == pool_key and reply.version >= at_least

    return poll_until(reached, f"pool {pool_key} at version {at_least}", timeout_s, 0.002)


def wait_inventory_events(stub, at_least: int, timeout_s: float = 60.0) -> None:
    """Until the pool service has applied (or dead-lettered: the bench's own records never
    are) `at_least` inventory events."""
    def applied() -> bool:
        stats = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
        return stats.inventory_events + stats.records_dead_lettered >= at_least

    poll_until(applied, f"{at_least} inventory events applied", timeout_s, 0.05)


def version_of(stub, pool_key: str) -> int:
    reply = stub.GetVersions(pool_pb2.VersionsRequest(pool_keys=[pool_key]), timeout=5).pools[0]
    return reply.version if reply.resolved_key == pool_key else 0


def drafts_chain(trie, window: tuple[int, ...]) -> bool:
    """Whether drafts after the key window[:KEY] propose the chain window[KEY:]."""
    tree = trie.retrieve(list(window[:KEY]), decoding_length=64, branch_length=TAIL, key_length=KEY)
    parent = -1
    for token in window[KEY:]:
        nxt = next((i for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)) if t == token and p == parent), None)
        if nxt is None:
            return False
        parent = nxt
    return True


def grams(seq, n: int) -> set[tuple[int, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def fake_generation(rng: random.Random, corpus: list[list[int]], length: int = 100) -> list[int]:
    """A generation-like text: spans of 4-24 tokens of corpus texts, recombined (texts of one
    pool share most of their n-grams, as real generations about similar items do)."""
    out: list[int] = []
    while len(out) < length:
        text = rng.choice(corpus)
        start = rng.randrange(max(1, len(text) - 4))
        out += text[start:start + rng.randint(4, 24)]
    return out[:length]


class Background:
    """Generations for other pools at a steady rate while the measured stream runs."""

    def __init__(self, producer: KafkaProducer, rate_per_s: float, corpus: list[list[int]], inventory):
        self.producer, self.rate, self.corpus, self.inventory = producer, rate_per_s, corpus, list(inventory)
        self.sent = 0
        self.texts: list[list[int]] = []  # every generation sent
        self.events: list[records_pb2.InventoryEvent] = []  # every inventory event sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(1)
        while not self._stop.wait(1 / self.rate):
            record = records_pb2.GeneratedRecord(pool_key=f"bg/{rng.randrange(8)}",
                                                 token_ids=fake_generation(rng, self.corpus))
            self.producer.send(GENERATED, key=record.pool_key.encode(), value=record.SerializeToString())
            self.texts.append(list(record.token_ids))
            if self.inventory:  # the workload's inventory timeline, one event per tick
                event = self.inventory.pop(0)
                self.producer.send(INVENTORY, key=event.item_id.encode(), value=event.SerializeToString())
                self.events.append(event)
            self.sent += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cases_wanted = 8 if QUICK else 32
    backlog_records = 600 if QUICK else 3000
    max_new_tokens = 32 if QUICK else 64
    model_path, model_note = resolve_model(args.data_dir, args.model_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    workload = workload_from_files(args.data_dir / "workload", tokenizer, cases_wanted) or \
        synthetic_workload(tokenizer, cases_wanted, random.Random(0))
    print(f"model: {model_note}\ninputs: {workload.source}; {len(workload.cases)} new items", flush=True)
    eos = tokenizer.eos_token_id

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="freshness-pool-") as pool_dir:
        broker.create_topics(GENERATED, INVENTORY)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0,
                                 allow_auto_create_topics=False)
        # 1. the backlog: warm texts as generations, then synthetic ones in other pools
        rng = random.Random(2)
        corpus = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for _, text in workload.warm_texts]
        backlog = [records_pb2.GeneratedRecord(pool_key=pool, token_ids=ids)
                   for (pool, _), ids in zip(workload.warm_texts, corpus)][:600 if QUICK else 6000]
        while len(backlog) < backlog_records:
            backlog.append(records_pb2.GeneratedRecord(pool_key=f"bg/{rng.randrange(8)}",
                                                       token_ids=fake_generation(rng, corpus)))
        for record in backlog:
            producer.send(GENERATED, key=record.pool_key.encode(), value=record.SerializeToString())
        producer.flush(60)
        backlog_tokens = sum(len(r.token_ids) for r in backlog)
        settings = PoolSettings(data_dir=Path(pool_dir), kafka_bootstrap=broker.bootstrap, model_path=model_path,
                                ngram_length=KEY + args.branch_length)
        server = create_pool_server(settings, null_telemetry())
        channel = open_channel(server.address)
        try:
            stub = pool_pb2_grpc.PoolStub(channel)
            ingest = measure_ingest(stub, len(backlog), backlog_tokens)
            print(f"ingest: {ingest['records_per_s']:.0f} records/s, {ingest['tokens_per_s']:.0f} tokens/s", flush=True)

            loaded = load_model(model_path)
            engine = DecodingEngine(loaded.model, EngineSettings(decoding_length=args.decoding_length,
                                                                 branch_length=args.branch_length))
            snapshots = PoolSnapshots(stub, max_pools=64)
            for case in workload.cases:
                snapshots.note(case.pool_key)
            snapshots.refresh()

            # 2. before
            before_tokens = before_steps = 0
            for case in workload.cases:
                out, steps = decode(engine, case.eval_prompt, snapshots.registry.resolve(case.pool_key),
                                    max_new_tokens, eos)
                before_tokens, before_steps = before_tokens + len(out), before_steps + steps

            # 3. the stream
            lags = []
            with Background(producer, args.background_rate, corpus, workload.inventory) as background:
                for case in workload.cases:
                    version = version_of(stub, case.pool_key)
                    added = records_pb2.InventoryEvent(item_id=case.item_id, action=ADDED, pool_key=case.pool_key,
                                                       text=case.item_text)
                    producer.send(INVENTORY, key=case.item_id.encode(), value=added.SerializeToString()).get(10)
                    wait_version(stub, case.pool_key, version + 1)
                    pool = snapshots.registry.resolve(case.pool_key)
                    case.generated, _ = decode(engine, case.first_prompt, pool, max_new_tokens, eos)
                    record = records_pb2.GeneratedRecord(request_id=f"first-{case.item_id}", pool_key=case.pool_key,
                                                         item_ids=[case.item_id], token_ids=case.generated)
                    started = time.perf_counter()
                    producer.send(GENERATED, key=case.pool_key.encode(), value=record.SerializeToString())
                    producer.flush(10)
                    wait_version(stub, case.pool_key, version + 2)
                    lags.append(time.perf_counter() - started)

            # 4. after: the decoder's refresher sees the versions move and fetches those pools
            fetches_before = snapshots.fetches
            refresh_until_current(snapshots, stub, {c.pool_key for c in workload.cases})
            after_tokens = after_steps = 0
            for case in workload.cases:
                out, steps = decode(engine, case.eval_prompt, snapshots.registry.resolve(case.pool_key),
                                    max_new_tokens, eos)
                after_tokens, after_steps = after_tokens + len(out), after_steps + steps

            # 5. removal
            removed = workload.cases[::2]
            # Everything the pools hold that does not come from a removed item.
            kept_texts = corpus + [list(r.token_ids) for r in backlog] + background.texts
            kept_texts += [tokenizer(e.text, add_special_tokens=False)["input_ids"] for e in background.events if e.text]
            for case in workload.cases[1::2]:
                kept_texts += [case.generated, tokenizer(case.item_text, add_special_tokens=False)["input_ids"]]
            kept = set().union(*(grams(t, KEY + TAIL) | grams(t, KEY + TAIL - 1) for t in kept_texts))
            windows = {}
            for case in removed:
                texts = [case.generated, tokenizer(case.item_text, add_special_tokens=False)["input_ids"]]
                windows[case.item_id] = [w for t in texts for w in grams(t, KEY + TAIL)
                                         if w not in kept and w[1:] not in kept]
            checked = [c for c in removed if windows[c.item_id]]

            def items_in_drafts() -> int:
                return sum(any(drafts_chain(snapshots.registry.resolve(c.pool_key), w) for w in windows[c.item_id])
                           for c in checked)

            in_drafts_before = items_in_drafts()
            # Every inventory event sent so far applied first: a pool version moving is no proof
            # that a removal landed (several removed items share a pool; other events move it too).
            events_sent = len(workload.cases) + len(background.events)
            wait_inventory_events(stub, events_sent)
            for case in removed:
                event = records_pb2.InventoryEvent(item_id=case.item_id, action=REMOVED, pool_key=case.pool_key)
                producer.send(INVENTORY, key=case.item_id.encode(), value=event.SerializeToString())
            producer.flush(10)
            wait_inventory_events(stub, events_sent + len(removed))  # each removal applied
            refresh_until_current(snapshots, stub, {c.pool_key for c in removed})
            in_drafts_after = items_in_drafts()
            stats = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
        finally:
            producer.close(5)
            channel.close()
            server.stop(0)

    report = {
        "tokens_per_step_before": before_tokens / max(before_steps, 1),
        "tokens_per_step_after": after_tokens / max(after_steps, 1),
        "lag_p50_s": percentile(lags, 0.5),
        "lag_p99_s": percentile(lags, 0.99),
        "removed_items_in_drafts": in_drafts_after,
        "ingest_records_per_s": ingest["records_per_s"],
        "device": device_name(),
        "ingest_tokens_per_s": ingest["tokens_per_s"],
        "ingest_backlog_records": len(backlog),
        "removed_items": len(removed),
        "removed_items_checked": len(checked),
        "removed_items_in_drafts_before_removal": in_drafts_before,
        "new_items": len(workload.cases),
        # The measured prompt is another prompt about the item when the workload has one, else the
        # published one again (the same ad requested again).
        "new_items_measured_on_the_published_prompt": sum(c.eval_prompt == c.first_prompt for c in workload.cases),
        "lag_samples": len(lags),
        "background_records_during_stream": background.sent,
        "inventory_timeline_events_replayed": len(background.events),
        "snapshot_fetches_after_stream": snapshots.fetches - fetches_before,
        "pools": len(stats.pools),
        "pool_nodes": sum(p.nodes for p in stats.pools),
        "dead_lettered": stats.records_dead_lettered,
        "model": model_note,
        "random_weights": loaded.random_weights,
        "inputs": workload.source,
        "quick": QUICK,
        "max_new_tokens": max_new_tokens,
        "decoding_length": args.decoding_length,
        "branch_length": args.branch_length,
        "note": ("tokens per step: strict greedy verification of the same prompts, drafts from the pool "
                 "snapshot held by the decoder side + the request overlay; lag: publish of a generation -> "
                 "the pool version containing it, with a background stream running"),
    }
    path = write_results("freshness.json", report, args.results_dir)
    for key in ("tokens_per_step_before", "tokens_per_step_after", "lag_p50_s", "lag_p99_s",
                "removed_items_in_drafts", "removed_items_in_drafts_before_removal", "ingest_records_per_s",
                "ingest_tokens_per_s"):
        value = report[key]
        print(f"{key:40s} {value:.3f}" if isinstance(value, float) else f"{key:40s} {value}")
    print(f"wrote {path}")
    return report


def measure_ingest(stub, records: int, tokens: int) -> dict:
    """Rate of the updater on a backlog, from its first ingested record to the last."""
    deadline = time.monotonic() + 180
    first = None
    while True:
        stats = stub.Stats(pool_pb2.PoolStatsRequest(), timeout=5)
        now = time.perf_counter()
        if first is None and stats.records_ingested > 0:
            first = (now, stats.records_ingested, stats.tokens_ingested)
        if stats.records_ingested >= records:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"backlog not ingested: {stats.records_ingested}/{records}")
        time.sleep(0.02)
    elapsed = max(now - first[0], 1e-9)
    return {"records_per_s": (stats.records_ingested - first[1]) / elapsed,
            "tokens_per_s": (stats.tokens_ingested - first[2]) / elapsed}


def refresh_until_current(snapshots: PoolSnapshots, stub, pool_keys: set[str]) -> None:
    for key in pool_keys:
        if not wait_for_version(snapshots, key, version_of(stub, key), timeout_s=30):
            raise TimeoutError(f"decoder never fetched {key}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--decoding-length", type=int, default=16)
    parser.add_argument("--branch-length", type=int, default=8)
    parser.add_argument("--background-rate", type=float, default=50.0, help="background generations per second")
    parser.add_argument("--threads", type=int, default=2)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
