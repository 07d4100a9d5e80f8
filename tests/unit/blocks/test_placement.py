"""Placement: deterministic, similar items on one shard, few items move when a shard is added,
replicated kinds on every shard."""

from __future__ import annotations

import numpy as np
import pytest

from common.blocks.hashing import BlockKind
from common.blocks.item_embedding import category_features
from common.blocks.placement import AnchorBuckets, HashRing, Placement

SHARDS = [f"kv-{i}:50051" for i in range(4)]


def clustered_embeddings(clusters: int, per_cluster: int, dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    points = centers[:, None, :] + 0.05 * rng.standard_normal((clusters, per_cluster, dim))
    return points.reshape(-1, dim), np.repeat(np.arange(clusters), per_cluster)


def test_ring_is_deterministic_and_adding_a_shard_moves_about_one_in_n_plus_one():
    keys = [b"item-%d" % i for i in range(2000)]
    before = HashRing(SHARDS)
    assert [before.shard_for(k) for k in keys] == [HashRing(list(SHARDS)).shard_for(k) for k in keys]
    after = HashRing([*SHARDS, "kv-4:50051"])
    moved = [k for k in keys if before.shard_for(k) != after.shard_for(k)]
    assert all(after.shard_for(k) == "kv-4:50051" for k in moved)  # only onto the new shard
    assert 0.12 < len(moved) / len(keys) < 0.28  # ~1/5; `hash mod n` would move ~4/5
    counts = np.unique([before.shard_for(k) for k in keys], return_counts=True)[1]
    assert counts.min() > 0.6 * len(keys) / len(SHARDS)  # virtual nodes balance the shards


def test_similar_items_share_a_shard_and_replicated_kinds_go_everywhere():
    points, labels = clustered_embeddings(clusters=12, per_cluster=20)
    buckets = AnchorBuckets.from_sample(points, count=12, seed=0)
    placement = Placement(SHARDS, buckets)
    shards = np.array([placement.item_shard(b"h%d" % i, p) for i, p in enumerate(points)])
    for cluster in range(12):
        assert len(set(shards[labels == cluster])) == 1  # a cluster lands on one shard
    assert len(set(shards)) > 1
    # Without an embedding an item still gets exactly one shard (by its hash).
    assert len(placement.shards_for(BlockKind.ITEM, b"x" * 32)) == 1
    replicated = placement.shards_for(BlockKind.USER_HISTORY, b"u" * 32)
    assert sorted(replicated) == sorted(SHARDS)
    assert placement.shards_for(BlockKind.FREE_TEXT, b"t" * 32) == []


def test_adding_a_shard_moves_few_items_by_bucket():
    points, _ = clustered_embeddings(clusters=40, per_cluster=10, seed=1)
    buckets = AnchorBuckets.from_sample(points, count=40, seed=0)
    before = Placement(SHARDS, buckets)
    after = Placement([*SHARDS, "kv-4:50051"], buckets)
    moved = sum(before.item_shard(b"", p) != after.item_shard(b"", p) for p in points)
    assert moved / len(points) < 0.45  # buckets move whole; still far from ~4/5


def test_category_features_group_items_of_one_category():
    a = category_features("Item I1: Norvik Zen Sneakers. Brand Norvik. Category sneakers (fashion). Specs: x.")
    b = category_features("Item I2: Acme Run. Brand Acme. Category sneakers (fashion). Specs: y.")
    c = category_features("Item I3: Kora Knife. Brand Kora. Category kitchen knives (home). Specs: z.")
    assert np.allclose(a, b) and float(a @ c) < 0.9


def test_learned_anchors_round_trip_and_refuse_another_embedders_vectors(tmp_path):
    rng = np.random.default_rng(4)
    buckets = AnchorBuckets.from_sample(rng.standard_normal((50, 8)), 5, seed=1)
    path = tmp_path / "anchors.npy"
    buckets.save(path)
    again = AnchorBuckets.load(path, dim=8)
    assert np.array_equal(again.anchors, buckets.anchors)
    probe = rng.standard_normal(8)
    assert again.bucket(probe) == buckets.bucket(probe)
    with pytest.raises(ValueError, match="dims"):
        AnchorBuckets.load(path, dim=384)


def test_decoders_use_the_anchors_beside_the_model_else_random_ones(tmp_path):
    from services.decoder.anchors import anchors_path, placement_buckets
    from services.decoder.settings import DecoderSettings

    settings = DecoderSettings(data_dir=tmp_path, model_path=tmp_path, placement_anchors=7)
    buckets, note = placement_buckets(settings, "category", 16)
    assert len(buckets.anchors) == 7 and "random" in note
    learned = AnchorBuckets.from_sample(np.random.default_rng(0).standard_normal((40, 16)), 4)
    learned.save(anchors_path(tmp_path, "category"))
    buckets, note = placement_buckets(settings, "category", 16)
    assert np.array_equal(buckets.anchors, learned.anchors) and "learned" in note
    # A configured file must exist: decoders that fell back to other anchors would place apart.
    missing = DecoderSettings(data_dir=tmp_path, model_path=tmp_path, placement_anchors_file=tmp_path / "none.npy")
    with pytest.raises(FileNotFoundError):
        placement_buckets(missing, "category", 16)


def test_bench_placement_shard_memory():
    """bench-placement's shard sizing: replicated blocks on every shard, each item on its own."""
    import doctest

    import bench.placement

    result = doctest.testmod(bench.placement)
    assert result.attempted >= 1 and result.failed == 0
    from bench.placement import shard_memory

    figures = shard_memory(["a", "b"], [100, 300], replicated_tokens=50, shard_count=2, bytes_per_token=4)
    assert figures == {"replicated_bytes": 200, "item_bytes_max": 1200, "item_bytes_mean": 800.0, "bytes_max": 1400}
