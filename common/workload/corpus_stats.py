"""How much a text's 4-grams are covered by texts of its own pool versus another pool.

This is the quantity a per-pool draft trie lives on: a 4-gram of the answer being generated
that already sits in the pool is a draft the trie can propose. For each sampled text t of pool
P, `within` is the fraction of t's word 4-grams found in `pool_size` other texts of P, and
`across` the fraction found in `pool_size` texts of a random other pool; both are averaged
over the sampled texts. Equal pool sizes keep the two numbers comparable.

>>> texts = {"a": ["x y z w v", "x y z w q", "x y z w r"], "b": ["m n o p q", "m n o p r", "m n o p s"]}
>>> within, across = four_gram_overlap(texts, np.random.default_rng(0), pool_size=2, texts_per_pool=3)
>>> round(within, 2), round(across, 2)
(0.5, 0.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NGRAM = 4


def word_ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def four_gram_overlap(
    texts_by_pool: Mapping[str, Sequence[str]],
    rng: np.random.Generator,
    *,
    pool_size: int = 50,
    texts_per_pool: int = 20,
) -> tuple[float, float]:
    """(within-pool, across-pool) mean 4-gram coverage; see the module docstring."""
    pools = [key for key, texts in texts_by_pool.items() if len(texts) >= 2]
    if len(pools) < 2:
        raise ValueError("four_gram_overlap needs at least two pools with two texts or more")
    grams = {key: [word_ngrams(text) for text in texts_by_pool[key]] for key in pools}
    within_scores, across_scores = [], []
    for key in pools:
        own = grams[key]
        for index in rng.permutation(len(own))[:texts_per_pool]:
            target = own[index]
            if not target:
                continue
            others = [i for i in rng.permutation(len(own)) if i != index][:pool_size]
            within_scores.append(_coverage(target, (own[i] for i in others)))
            other_key = pools[(pools.index(key) + 1 + int(rng.integers(len(pools) - 1))) % len(pools)]
            foreign = grams[other_key]
            picked = rng.permutation(len(foreign))[: min(pool_size, len(others))]
            across_scores.append(_coverage(target, (foreign[i] for i in picked)))
    return float(np.mean(within_scores)), float(np.mean(across_scores))


def _coverage(target: set, pool_grams) -> float:
    seen: set = set()
    for grams in pool_grams:
        seen |= grams
    return len(target & seen) / len(target)
