"""Similarity anchors for item placement over kv-store shards: learned from the workload's items
(spherical k-means over their embeddings, common/blocks/placement.py) and saved beside the model,
which every decoder mounts, so every decoder places items alike; seeded random anchors otherwise.
Random directions split embeddings poorly when they share a mean direction (sentence embeddings
do), so most items would fall into a few buckets and onto a few shards.

    python -m services.decoder.anchors --data-dir data      (`make model` runs it)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.blocks.item_embedding import item_embedder
from common.blocks.placement import AnchorBuckets
from common.modeling.default_model import default_model_path
from common.workload.export import load_prompts
from services.decoder.settings import DecoderSettings


def anchors_path(model_path: Path, embedder: str) -> Path:
    """Where learned anchors live by default: beside the model, which every decoder mounts."""
    return model_path / f"placement_anchors.{embedder}.npy"


def placement_buckets(settings: DecoderSettings, embedder: str, dim: int) -> tuple[AnchorBuckets, str]:
    """Learned anchors (the settings' file, else the one beside the model) or seeded random ones,
    and a line saying which. Every decoder must place alike: a configured file that cannot be
    used is an error, not a silent fallback to other anchors."""
    path = settings.placement_anchors_file or anchors_path(settings.model_path, embedder)
    if settings.placement_anchors_file is not None or path.is_file():
        buckets = AnchorBuckets.load(path, dim)
        return buckets, f"{len(buckets.anchors)} anchors learned from items ({path})"
    return (AnchorBuckets.random(dim, settings.placement_anchors, seed=0),
            f"{settings.placement_anchors} random anchors (no {path.name} beside the model)")


def learn_anchors(workload: Path, embed, count: int, sample: int = 4000, seed: int = 0) -> AnchorBuckets:
    """Anchors by spherical k-means over `embed`'s vectors of the workload's item blocks (a seeded
    sample of `sample` distinct items)."""
    prompts, _ = load_prompts(workload)
    texts = sorted({b.text for p in prompts for b in p.blocks if b.kind == "item"})
    if not texts:
        raise ValueError(f"{workload} has no item blocks")
    rng = np.random.default_rng(seed)
    picked = [texts[i] for i in rng.permutation(len(texts))[:sample]]
    vectors = np.stack([embed(t) for t in tqdm(picked, desc="embedding items", unit="item", leave=False)])
    return AnchorBuckets.from_sample(vectors, count, seed=seed)


def main(argv: list[str] | None = None) -> None:
    """Learns placement anchors from the workload's items and saves them beside the model."""
    parser = argparse.ArgumentParser(prog="python -m services.decoder.anchors", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--model-path", type=Path, default=None, help="default: <data-dir>/models/smollm2-135m-instruct")
    parser.add_argument("--embedder", default="auto", choices=["auto", "minilm", "category"])
    parser.add_argument("--anchors", type=int, default=DecoderSettings.model_fields["placement_anchors"].default)
    parser.add_argument("--force", action="store_true", help="learn again when the file exists")
    args = parser.parse_args(argv)
    model_path = args.model_path or default_model_path(args.data_dir)
    embed = item_embedder(args.embedder)
    path = anchors_path(model_path, embed.name)
    if path.is_file() and not args.force:
        print(f"{path} exists; --force learns it again")
        return
    buckets = learn_anchors(args.data_dir / "workload" / "prompts.jsonl", embed, args.anchors)
    buckets.save(path)
    print(f"wrote {path}: {len(buckets.anchors)} anchors over {embed.name} embeddings")


if __name__ == "__main__":
    main()
