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

CATEGORY = re.compile(r"Category (.+?) \((.+?)\)")


def item_texts(workload: Path) -> list[str]:
    prompts, _ = load_prompts(workload)
    return sorted({b.text for p in prompts for b in p.blocks if b.kind == "item"})


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


def main(argv: list[str] | None = None) -> None:
    quick = quick_run()
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ADACCEL_DATA_DIR", "data")))
    parser.add_argument("--items", type=int, default=1500 if quick else 6000, help="items placed")
    parser.add_argument("--learn-items", type=int, default=1000 if quick else 4000, help="items anchors learn from")
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--embedders", default="category" if quick else "category,minilm")
    args = parser.parse_args(argv)
    workload = args.data_dir.resolve() / "workload" / "prompts.jsonl"
    if not workload.is_file():
        raise SystemExit(f"no workload at {workload}; run `make model` first")
    texts = item_texts(workload)
    order = np.random.default_rng(0).permutation(len(texts))
    learn = [texts[i] for i in order[:args.learn_items]]  # anchors never see the items they place
    placed = [texts[i] for i in order[args.learn_items:args.learn_items + args.items]]
    categories = [category_of(t) for t in placed]
    results = []
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
    path = write_results("placement.json", {
        "device": device_name(), "items": len(placed), "learn_items": len(learn), "anchors": args.anchors,
        "categories": len(set(categories)), "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
