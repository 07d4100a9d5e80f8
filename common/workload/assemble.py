"""The whole workload from its settings: catalog, exported prompts, warm-up texts, training set.

  prompts           warm and held-out prompts of all three tasks (exported as JSONL);
  warmups           the warm prompts' reference answers, by pool (to warm draft pools);
  training_prompts  what the default model is trained on: warm item-knowledge and user-summary
                    prompts plus extra generative-rec prompts with fewer candidates (a
                    4k-token prompt costs too much CPU to train on; the answer format is the
                    same). Nothing in it mentions a held-out item or user.

>>> from common.workload.settings import WorkloadSettings
>>> w = build_workload(WorkloadSettings(num_items=200, num_users=40, inventory_events=0,
...     item_knowledge_warm=5, item_knowledge_heldout=2, user_summary_warm=3, user_summary_heldout=1,
...     generative_rec_warm=2, generative_rec_heldout=1, train_rec_prompts=2))
>>> sorted({(p.task, p.split) for p in w.prompts})[:2]
[('generative_rec', 'heldout'), ('generative_rec', 'warm')]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.workload.catalog import Catalog, Item, User, generate_catalog
from common.workload.prompts import (
    Prompt,
    build_voices,
    choose_candidates,
    generative_rec_prompt,
    item_knowledge_prompt,
    user_summary_prompt,
)
from common.workload.settings import WorkloadSettings

# Seed stages of prompt sampling (the catalog uses 0-4).
_STAGE_PROMPTS = 10


@dataclass(slots=True, frozen=True)
class Warmup:
    pool_key: str
    text: str


@dataclass(slots=True, frozen=True)
class Workload:
    settings: WorkloadSettings
    catalog: Catalog
    prompts: tuple[Prompt, ...]
    warmups: tuple[Warmup, ...]
    training_prompts: tuple[Prompt, ...]


def build_workload(settings: WorkloadSettings) -> Workload:
    catalog = generate_catalog(settings)
    rng = np.random.default_rng([settings.seed, _STAGE_PROMPTS])
    voices = build_voices(settings.seed)
    warm_items = tuple(item for item in catalog.items if item.item_id not in catalog.heldout_item_ids)
    heldout_items = tuple(item for item in catalog.items if item.item_id in catalog.heldout_item_ids)
    warm_users = tuple(u for u in catalog.users if u.user_id not in catalog.heldout_user_ids and u.clicks)
    heldout_users = tuple(u for u in catalog.users if u.user_id in catalog.heldout_user_ids and u.clicks)
    warm_by_category = _by_category(warm_items)
    all_by_category = _by_category(catalog.items)
    shown = settings.history_shown

    def item_prompts(split, pool, count):
        return [
            item_knowledge_prompt(f"item_knowledge/{split}/{n:05d}", item, split, voices, rng)
            for n, item in enumerate(_sample(pool, count, rng))
        ]

    def summary_prompts(split, pool, count):
        return [
            user_summary_prompt(f"user_summary/{split}/{n:05d}", user, split, catalog, shown, voices, rng)
            for n, user in enumerate(_sample(pool, count, rng))
        ]

    def rec_prompts(name, split, pool, count, candidate_range, allowed):
        prompts = []
        for n, user in enumerate(_sample(pool, count, rng)):
            n_candidates = int(rng.integers(candidate_range[0], candidate_range[1] + 1))
            candidates = choose_candidates(user, catalog, shown, n_candidates, allowed, rng)
            prompts.append(
                generative_rec_prompt(f"{name}/{n:05d}", user, candidates, split, catalog, shown, voices, rng)
            )
        return prompts

    warm = (
        item_prompts("warm", warm_items, settings.item_knowledge_warm)
        + summary_prompts("warm", warm_users, settings.user_summary_warm)
        + rec_prompts("generative_rec/warm", "warm", warm_users, settings.generative_rec_warm,
                      settings.rec_candidates, warm_by_category)
    )
    heldout = (
        item_prompts("heldout", heldout_items, settings.item_knowledge_heldout)
        + summary_prompts("heldout", heldout_users, settings.user_summary_heldout)
        + rec_prompts("generative_rec/heldout", "heldout", heldout_users, settings.generative_rec_heldout,
                      settings.rec_candidates, all_by_category)
    )
    train_rec = rec_prompts("generative_rec/train", "warm", warm_users, settings.train_rec_prompts,
                            settings.train_rec_candidates, warm_by_category)
    training = tuple(p for p in warm if p.task != "generative_rec") + tuple(train_rec)
    return Workload(
        settings=settings,
        catalog=catalog,
        prompts=tuple(warm + heldout),
        warmups=tuple(Warmup(pool_key=p.pool_key, text=p.reference) for p in warm),
        training_prompts=training,
    )


def _by_category(items: tuple[Item, ...]) -> dict[str, tuple[Item, ...]]:
    grouped: dict[str, list[Item]] = {}
    for item in items:
        grouped.setdefault(item.category_key, []).append(item)
    return {key: tuple(members) for key, members in grouped.items()}


def _sample(pool: tuple[Item, ...] | tuple[User, ...], count: int, rng: np.random.Generator) -> list:
    """`count` members of pool, without repeats until the pool runs out (then cycling)."""
    if not pool or count <= 0:
        return []
    picked: list = []
    while len(picked) < count:
        order = rng.permutation(len(pool))[: count - len(picked)]
        picked.extend(pool[i] for i in order)
    return picked
