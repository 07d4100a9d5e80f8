"""Prompts of the three tasks, as typed blocks with a pool key and a reference answer.

  item_knowledge  [instruction][item][question]                      pool "<vertical>/<category>"
  user_summary    [instruction][user history][question]              pool "users/<vertical>"
  generative_rec  [instruction][user history][item]*n[question]      pool "<vertical>/<category>"

Pool keys: item prompts pool by the item's category (DARE groups items by category). Users
pool by the vertical of the top category in the history they show: a pool per category would
leave few users per pool, and summaries are written in a per-vertical voice. A rec prompt
pools by its candidates' category (all candidates share one category, like an ad slot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.prompt_tokens import leading_instructions
from common.workload.blocks import (
    RANKED_PICKS,
    Block,
    instruction_block,
    item_block,
    question_block,
    shown_clicks,
    user_history_block,
)
from common.workload.catalog import Catalog, Item, User
from common.workload.facts import profile_history, rank_candidates
from common.workload.lexicon import CATEGORIES, VERTICALS
from common.workload.writer import (
    Voice,
    item_voice,
    user_voice,
    write_generative_rec,
    write_item_knowledge,
    write_user_summary,
)


@dataclass(slots=True, frozen=True)
class Prompt:
    prompt_id: str
    task: str  # one of blocks.TASKS
    split: str  # "warm" | "heldout"
    pool_key: str
    # Items the prompt is about (the item; the candidates in prompt order), and its user.
    item_ids: tuple[str, ...]
    user_ids: tuple[str, ...]
    blocks: tuple[Block, ...]
    reference: str

    @property
    def text(self) -> str:
        """The prompt as the model reads it: block texts concatenated in order."""
        return "".join(block.text for block in self.blocks)

    @property
    def system_blocks(self) -> int:
        """Leading instruction blocks: the system message when rendered with a chat template."""
        return leading_instructions([block.kind == "instruction" for block in self.blocks])


def round_robin(groups: Sequence[Sequence], count: int) -> list:
    """Up to `count` items taken one from each group in turn (the groups' i-th items, then the
    (i+1)-th), so that every group is represented.

    >>> round_robin([[1, 2, 3], ["a"], [10, 20]], 5)
    [1, 'a', 10, 2, 20]
    """
    picked, i = [], 0
    while len(picked) < count and any(i < len(group) for group in groups):
        picked += [group[i] for group in groups if i < len(group)][: count - len(picked)]
        i += 1
    return picked


def build_voices(style_seed: int) -> dict[str, Voice]:
    """pool key -> voice, for every category pool and every user pool."""
    voices = {spec.key: item_voice(spec, style_seed) for spec in CATEGORIES}
    voices.update({f"users/{vertical}": user_voice(vertical, style_seed) for vertical in VERTICALS})
    return voices


def item_knowledge_prompt(
    prompt_id: str, item: Item, split: str, voices: Mapping[str, Voice], rng: np.random.Generator
) -> Prompt:
    return Prompt(
        prompt_id=prompt_id,
        task="item_knowledge",
        split=split,
        pool_key=item.category_key,
        item_ids=(item.item_id,),
        user_ids=(),
        blocks=(instruction_block("item_knowledge"), item_block(item), question_block("item_knowledge")),
        reference=write_item_knowledge(item, voices[item.category_key], rng),
    )


def user_summary_prompt(
    prompt_id: str,
    user: User,
    split: str,
    catalog: Catalog,
    history_shown: int,
    voices: Mapping[str, Voice],
    rng: np.random.Generator,
) -> Prompt:
    profile = profile_history([catalog.items_by_id[i] for i in shown_clicks(user, history_shown)])
    pool_key = f"users/{profile.top_vertical}"
    return Prompt(
        prompt_id=prompt_id,
        task="user_summary",
        split=split,
        pool_key=pool_key,
        item_ids=(),
        user_ids=(user.user_id,),
        blocks=(
            instruction_block("user_summary"),
            user_history_block(user, catalog.items_by_id, history_shown),
            question_block("user_summary"),
        ),
        reference=write_user_summary(profile, voices[pool_key], rng),
    )


def generative_rec_prompt(
    prompt_id: str,
    user: User,
    candidates: tuple[Item, ...],
    split: str,
    catalog: Catalog,
    history_shown: int,
    voices: Mapping[str, Voice],
    rng: np.random.Generator,
) -> Prompt:
    """Candidates must share one category: it names the pool."""
    pool_key = candidates[0].category_key
    assert all(item.category_key == pool_key for item in candidates), "candidates span categories"
    profile = profile_history([catalog.items_by_id[i] for i in shown_clicks(user, history_shown)])
    picks = rank_candidates(profile, candidates, RANKED_PICKS)
    return Prompt(
        prompt_id=prompt_id,
        task="generative_rec",
        split=split,
        pool_key=pool_key,
        item_ids=tuple(item.item_id for item in candidates),
        user_ids=(user.user_id,),
        blocks=(
            instruction_block("generative_rec"),
            user_history_block(user, catalog.items_by_id, history_shown),
            *(item_block(item) for item in candidates),
            question_block("generative_rec"),
        ),
        reference=write_generative_rec(picks, voices[pool_key], rng),
    )


def choose_candidates(
    user: User,
    catalog: Catalog,
    history_shown: int,
    count: int,
    allowed: Mapping[str, tuple[Item, ...]],
    rng: np.random.Generator,
) -> tuple[Item, ...]:
    """`count` items of one category, drawn by popularity, so popular item blocks recur.

    The category is the history's top one 70% of the time, else another clicked category:
    `allowed` maps category key -> items that may be candidates (warm items for warm prompts).
    """
    profile = profile_history([catalog.items_by_id[i] for i in shown_clicks(user, history_shown)])
    clicked_keys = [key for key, _ in profile.category_clicks if allowed.get(key)]
    if clicked_keys and (rng.random() < 0.7 or len(clicked_keys) == 1):
        key = clicked_keys[0]
    elif clicked_keys:
        key = clicked_keys[1 + int(rng.integers(len(clicked_keys) - 1))]
    else:
        non_empty = [k for k, items in allowed.items() if items]
        key = non_empty[int(rng.integers(len(non_empty)))]
    pool = allowed[key]
    weights = np.array([item.popularity for item in pool])
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False, p=weights / weights.sum())
    return tuple(pool[i] for i in picked)
