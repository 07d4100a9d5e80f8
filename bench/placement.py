"""Item placement over kv-store shards: random against learned similarity anchors.

    python -m bench.placement [--items 6000]      (BENCH_QUICK=1: 1,500 items, category features only)

Item blocks of the workload's catalog are placed as the decoders place them (common/blocks/
placement.py: nearest anchor -> bucket -> consistent-hash ring of shards), once with seeded random
anchors and once with anchors learned from a separate sample of items (services/decoder/anchors.py),
for each embedder (category features; MiniLM when installed) and 2-4 shards. Figures:

  imbalance     items on the fullest shard / items per shard on average (1.0 = even)
  co-location   share of same-category item pairs that share a shard: what similarity placement
                is for (a generative-rec request's candidates come from a few categories, so they
                touch few shards); a placement blind to similarity gives about 1/shards
  buckets used  anchors that own at least one item (of 64)
  moved +1      share of items whose shard changes when one shard is added (consistent hashing
                promises about 1/(shards+1))

With a model (the default one unless --model-path), also the KV memory each kv-store shard
holds for the whole catalog at that model's block sizes (RcLLM's layout: every user history and
instruction on every shard, each item on the one shard its placement names), per serving dtype:
the figure that sizes a shard.

All of it is deterministic (seeded); no timing, so the machine does not matter.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from bench.common import quick_run, write_results
from common.blocks.hashing import BlockKind
from common.blocks.item_embedding import item_embedder
from common.blocks.placement import AnchorBuckets, Placement
from common.machine import device_name
from common.workload.export import load_prompts
from services.stack import resolve_model

CATEGORY = re.compile(r"Category (.+?) \((.+?)\)")


def block_texts(workload: Path) -> dict[str, list[str]]:
    """The workload's distinct block texts by kind (instruction, user_history, item)."""
    prompts, _ = load_prompts(workload)
    return {kind: sorted({b.text for p in prompts for b in p.blocks if b.kind == kind})
            for kind in ("instruction", "user_history", "item")}


def category_of(text: str) -> str:
    match = CATEGORY.search(text)
    return f"{match.group(2)}/{match.group(1)}" if match else "?"


def co_location(shards: list[str], categories: list[str]) -> float:
    """Share of same-category item pairs placed on one shard."""
    same, pairs = 0, 0
    by_category: dict[str, Counter] = {}
    for shard, category in zip(shards, categories, strict=True):
        by_category.setdefault(category, Counter())[shard] += 1
    for counts in by_category.values():
        n = sum(counts.values())
        pairs += n * (n - 1) // 2
        same += sum(c * (c - 1) // 2 for c in counts.values())
    return same / pairs if pairs else 0.0


def place(buckets: AnchorBuckets, shard_count: int, vectors: np.ndarray) -> list[str]:
    placement = Placement([f"shard-{i}" for i in range(shard_count)], buckets)
    # The hash only matters for items without an embedding; every item here has one.
    return [placement.shards_for(BlockKind.ITEM, b"", v)[0] for v in vectors]


def figures(buckets: AnchorBuckets, shard_count: int, vectors: np.ndarray, categories: list[str]) -> dict:
    shards = place(buckets, shard_count, vectors)
    loads = Counter(shards)
    grown = place(buckets, shard_count + 1, vectors)
    return {
        "imbalance": max(loads.values()) / (len(shards) / shard_count),
        "co_location": co_location(shards, categories),
        "buckets_used": len({buckets.bucket(v) for v in vectors}),
        "moved_when_adding_a_shard": sum(a != b for a, b in zip(shards, grown, strict=True)) / len(shards),
    }


def shard_memory(item_shards: list[str], item_tokens: list[int], replicated_tokens: int, shard_count: int,
                 bytes_per_token: int) -> dict:
    """KV bytes per shard: the replicated blocks on every one, the items where they are placed.

    >>> shard_memory(["s0", "s1", "s0"], [10, 20, 30], 5, 2, 2)
    {'replicated_bytes': 10, 'item_bytes_max': 80, 'item_bytes_mean': 60.0, 'bytes_max': 90}
    """
    per_shard = Counter()
    for shard, tokens in zip(item_shards, item_tokens, strict=True):
        per_shard[shard] += tokens * bytes_per_token
    fullest = max(per_shard.values(), default=0)
    return {"replicated_bytes": replicated_tokens * bytes_per_token, "item_bytes_max": fullest,
            "item_bytes_mean": sum(per_shard.values()) / shard_count,
            "bytes_max": replicated_tokens * bytes_per_token + fullest}


def catalog_memory(texts: dict[str, list[str]], model_path: Path, buckets: AnchorBuckets, embed) -> dict:
    """Per shard count and serving dtype, the KV bytes a shard holds for the whole catalog
    (texts: `block_texts`)."""
    from transformers import AutoConfig, AutoTokenizer

    from services.decoder.batcher import kv_values_per_token

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokens = {kind: [len(tokenizer(t)["input_ids"]) for t in tqdm(group, desc=f"tokenizing {kind}", leave=False)]
              for kind, group in texts.items()}
    vectors = np.stack([embed(t) for t in tqdm(texts["item"], desc=f"{embed.name}: catalog items", leave=False)])
    values = kv_values_per_token(AutoConfig.from_pretrained(model_path))
    replicated = sum(tokens["instruction"]) + sum(tokens["user_history"])
    rows = []
    for shard_count in (1, 2, 3, 4):
        shards = place(buckets, shard_count, vectors)
        for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
            rows.append({"shards": shard_count, "dtype": dtype,
                         **shard_memory(shards, tokens["item"], replicated, shard_count, values * itemsize)})
    return {"model": model_path.name, "kv_values_per_token": values,
            "blocks": {kind: len(group) for kind, group in texts.items()},
            "tokens": {kind: sum(t) for kind, t in tokens.items()}, "per_shard": rows}


def main(argv: list[str] | None = None) -> None:
    quick = quick_run()
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ADACCEL_DATA_DIR", "data")))
    parser.add_argument("--items", type=int, default=1500 if quick else 6000, help="items placed")
    parser.add_argument("--learn-items", type=int, default=1000 if quick else 4000, help="items anchors learn from")
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--embedders", default="category" if quick else "category,minilm")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="model whose block sizes size the shards (default: the data dir's default model)")
    parser.add_argument("--no-memory", action="store_true", help="skip the shard memory figures")
    parser.add_argument("--output", default="placement.json", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    workload = args.data_dir.resolve() / "workload" / "prompts.jsonl"
    if not workload.is_file():
        raise SystemExit(f"no workload at {workload}; run `make model` first")
    kinds = block_texts(workload)
    texts = kinds["item"]
    order = np.random.default_rng(0).permutation(len(texts))
    learn = [texts[i] for i in order[:args.learn_items]]  # anchors never see the items they place
    placed = [texts[i] for i in order[args.learn_items:args.learn_items + args.items]]
    categories = [category_of(t) for t in placed]
    results = []
    category_buckets = None  # the category embedder's learned anchors, which size the shards below
    for kind in args.embedders.split(","):
        try:
            embed = item_embedder(kind)
        except RuntimeError as err:
            print(f"skipping {kind}: {err}")
            continue
        learn_vectors = np.stack([embed(t) for t in tqdm(learn, desc=f"{embed.name}: learning sample", leave=False)])
        vectors = np.stack([embed(t) for t in tqdm(placed, desc=f"{embed.name}: placed items", leave=False)])
        anchors = {"random": AnchorBuckets.random(embed.dim, args.anchors, seed=0),
                   "learned": AnchorBuckets.from_sample(learn_vectors, args.anchors, seed=0)}
        if kind == "category":
            category_buckets = anchors["learned"]
        for shard_count in (2, 3, 4):
            for name, buckets in anchors.items():
                results.append({"embedder": embed.name, "anchors": name, "shards": shard_count,
                                **figures(buckets, shard_count, vectors, categories)})
    table = Table(title=f"bench-placement: {len(placed)} catalog items, {args.anchors} anchors")
    for column in ("embedder", "shards", "anchors", "imbalance", "co-location", "1/shards", "buckets used",
                   "moved +1", "1/(shards+1)"):
        table.add_column(column, justify="left" if column in ("embedder", "anchors") else "right")
    for r in results:
        table.add_row(r["embedder"], str(r["shards"]), r["anchors"], f"{r['imbalance']:.2f}", f"{r['co_location']:.3f}",
                      f"{1 / r['shards']:.3f}", str(r["buckets_used"]), f"{r['moved_when_adding_a_shard']:.3f}",
                      f"{1 / (r['shards'] + 1):.3f}")
    Console(width=160).print(table)
    memory = None
    if not args.no_memory:
        embed = item_embedder("category")
        if category_buckets is None:
            category_buckets = AnchorBuckets.from_sample(np.stack([embed(t) for t in learn]), args.anchors, seed=0)
        memory = catalog_memory(kinds, resolve_model(args.data_dir.resolve(), args.model_path), category_buckets,
                                embed)
        print_memory(memory)
    path = write_results(args.output, {
        "device": device_name(), "items": len(placed), "learn_items": len(learn), "anchors": args.anchors,
        "categories": len(set(categories)), "results": results, "shard_memory": memory,
    })
    print(f"wrote {path}")


def print_memory(memory: dict) -> None:
    gib = 1 << 30
    table = Table(title=f"KV per kv-store shard, whole catalog, {memory['model']} ({memory['blocks']['item']} items "
                        f"{memory['tokens']['item']} tokens; {memory['blocks']['user_history']} users "
                        f"{memory['tokens']['user_history']} tokens, replicated)")
    for column in ("shards", "dtype", "replicated GiB", "items GiB (fullest)", "items GiB (mean)", "shard GiB (fullest)"):
        table.add_column(column, justify="right")
    for r in memory["per_shard"]:
        table.add_row(str(r["shards"]), r["dtype"], f"{r['replicated_bytes'] / gib:.2f}",
                      f"{r['item_bytes_max'] / gib:.2f}", f"{r['item_bytes_mean'] / gib:.2f}", f"{r['bytes_max'] / gib:.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
