"""Where a block's KV lives across kv-store shards (RcLLM's stratified placement), as a pure function.

  replicated kinds (user history, instruction): small and needed by every request of a user or
      task, so every shard holds a copy (and every decoder keeps one locally); reads may go to
      any shard, writes go to all.
  items: many and large, so each lives on one shard, chosen by similarity: the item's embedding
      falls into the bucket of its nearest anchor (a fixed set of unit vectors), and the bucket,
      not the item, is hashed onto a consistent-hash ring of shards with virtual nodes. Similar
      items share a bucket and so a shard (requests with related candidates touch few shards),
      and adding a shard moves only the buckets the new shard's ring points take over: about
      1/(N+1) of them, so about 1/(N+1) of the items, instead of almost all with `hash mod N`.

Everything is deterministic from (shard names, anchors, virtual nodes): every decoder computes the
same map without talking to the others. Embeddings come from outside (see item_embedding.py); an
item without one (no embedder) is placed by its block hash on the same ring.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

import numpy as np

from common.blocks.hashing import BlockKind

REPLICATED_KINDS = frozenset({BlockKind.USER_HISTORY, BlockKind.INSTRUCTION})


def _ring_point(label: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(label, digest_size=8, person=b"adaccel-ring").digest(), "big")


class HashRing:
    """Consistent hashing: each shard owns `virtual_nodes` points of a 64-bit ring; a key belongs
    to the first point at or after its own hash (wrapping around)."""

    def __init__(self, shards: Sequence[str], virtual_nodes: int = 128):
        if not shards:
            raise ValueError("a ring needs at least one shard")
        if len(set(shards)) != len(shards):
            raise ValueError(f"shard names must be unique: {list(shards)}")
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.shards = tuple(shards)
        points = sorted(
            (_ring_point(f"{shard}#{v}".encode()), shard) for shard in shards for v in range(virtual_nodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [s for _, s in points]

    def shard_for(self, key: bytes) -> str:
        i = bisect.bisect_left(self._points, _ring_point(key))
        return self._owners[i % len(self._owners)]


class AnchorBuckets:
    """Similarity buckets: an embedding's bucket is its nearest anchor by cosine."""

    def __init__(self, anchors: np.ndarray):
        anchors = np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2 or anchors.shape[0] < 1:
            raise ValueError(f"anchors must be [K, dim] with K >= 1, got {anchors.shape}")
        self.anchors = anchors / np.maximum(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12)

    @property
    def dim(self) -> int:
        return self.anchors.shape[1]

    @classmethod
    def random(cls, dim: int, count: int, seed: int = 0) -> AnchorBuckets:
        """Seeded Gaussian directions: the same anchors on every decoder, no data needed."""
        return cls(np.random.default_rng(seed).standard_normal((count, dim)))

    @classmethod
    def from_sample(cls, embeddings: np.ndarray, count: int, seed: int = 0, iterations: int = 10) -> AnchorBuckets:
        """Spherical k-means over a sample of item embeddings (seeded, so reproducible): anchors
        that follow the data, which random directions do not when embeddings share a mean."""
        x = np.asarray(embeddings, dtype=np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        rng = np.random.default_rng(seed)
        count = min(count, len(x))
        # k-means++ seeding (by cosine distance): spread-out starts, so no cluster gets two anchors
        # while another gets none, which plain random starts often do.
        centers = [x[rng.integers(len(x))]]
        for _ in range(count - 1):
            distance = np.clip(1.0 - (x @ np.stack(centers).T).max(1), 0.0, None) ** 2
            total = distance.sum()
            pick = rng.choice(len(x), p=distance / total) if total > 0 else rng.integers(len(x))
            centers.append(x[pick])
        centers = np.stack(centers)
        for _ in range(iterations):
            assign = (x @ centers.T).argmax(1)
            for k in range(count):
                members = x[assign == k]
                if len(members):
                    centers[k] = members.sum(0)
            centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
        return cls(centers)

    def save(self, path) -> None:
        """As a .npy [K, dim] float32 array (what `load` and every decoder read)."""
        np.save(path, self.anchors)

    @classmethod
    def load(cls, path, dim: int | None = None) -> AnchorBuckets:
        """Anchors saved by `save`; `dim`, when given, must match (else ValueError): anchors
        learned on one embedder's vectors mean nothing for another's."""
        buckets = cls(np.load(path, allow_pickle=False))
        if dim is not None and buckets.dim != dim:
            raise ValueError(f"anchors in {path} have {buckets.dim} dims, the embedder gives {dim}")
        return buckets

    def bucket(self, embedding: np.ndarray) -> int:
        e = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if e.shape[0] != self.dim:
            raise ValueError(f"embedding has {e.shape[0]} dims, anchors have {self.dim}")
        return int((self.anchors @ e).argmax())


class Placement:
    """Shards of a block: all of them for replicated kinds, one by similarity bucket for items."""

    def __init__(self, shards: Sequence[str], buckets: AnchorBuckets | None = None, virtual_nodes: int = 128):
        self.ring = HashRing(shards, virtual_nodes)
        self.buckets = buckets

    @property
    def shards(self) -> tuple[str, ...]:
        return self.ring.shards

    def item_shard(self, block_hash: bytes, embedding: np.ndarray | None = None) -> str:
        if embedding is not None and self.buckets is not None:
            return self.ring.shard_for(b"bucket:%d" % self.buckets.bucket(embedding))
        return self.ring.shard_for(b"block:" + block_hash)

    def shards_for(self, kind: BlockKind, block_hash: bytes, embedding: np.ndarray | None = None) -> list[str]:
        """Shards to write to, in the order to read from (a replicated block is read from the
        shard its hash maps to first, so reads spread over the shards)."""
        if kind == BlockKind.FREE_TEXT:
            return []
        if kind in REPLICATED_KINDS:
            first = self.ring.shard_for(b"block:" + block_hash)
            return [first, *(s for s in self.shards if s != first)]
        return [self.item_shard(block_hash, embedding)]
