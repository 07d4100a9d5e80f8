"""Prompt blocks: the typed pieces a prompt is made of, and their texts.

A block's text is a pure function of what it describes (an item, a user's history, a task), so
the same item block is byte-identical in every prompt it appears in, at any position: the
reuse pattern beyond-prefix KV caching (RcLLM) exploits.

Every block text starts with a non-space character and ends with exactly one newline. With a
byte-level BPE tokenizer (GPT-2 split rules) a newline followed by a non-space character is
always a pre-token boundary, so tokenizing blocks one by one and concatenating the ids equals
tokenizing the whole prompt: what the decoder does and what the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.workload.catalog import Item, User
from common.workload.lexicon import category_by_key

BLOCK_KINDS = ("instruction", "user_history", "item", "text")

TASKS = ("item_knowledge", "user_summary", "generative_rec")

# How many candidates a generative-rec answer ranks.
RANKED_PICKS = 3

_INSTRUCTIONS = {
    "item_knowledge": (
        "You write ad copy for an online marketplace. Given one catalog item, write its selling "
        "points in a few sentences, using only the facts listed.\n"
    ),
    "user_summary": (
        "You profile shoppers for ad targeting. Given a user's recent clicks, summarise the "
        "user's interests, brands and budget in a few sentences.\n"
    ),
    "generative_rec": (
        "You choose which ads to show. Given a user's recent clicks and a list of candidate "
        f"items, rank the {RANKED_PICKS} best candidates for this user and give a reason.\n"
    ),
}

_QUESTIONS = {
    "item_knowledge": "Question: What are the selling points of this item?\nAnswer:\n",
    "user_summary": "Question: What is this user interested in?\nAnswer:\n",
    "generative_rec": f"Question: Which {RANKED_PICKS} candidates fit this user best, and why?\nAnswer:\n",
}


@dataclass(slots=True, frozen=True)
class Block:
    # Stable id of the block's content owner: item id, user id, or a task-level id.
    id: str
    kind: str  # one of BLOCK_KINDS
    text: str


def instruction_block(task: str) -> Block:
    return Block(id=f"instruction/{task}/v1", kind="instruction", text=_INSTRUCTIONS[task])


def question_block(task: str) -> Block:
    return Block(id=f"question/{task}/v1", kind="text", text=_QUESTIONS[task])


def item_block(item: Item) -> Block:
    """One item's facts on one line.

    >>> from common.workload.catalog import Item
    >>> item = Item("I000007", "fashion", "sneakers", "Norvik Zen Sneakers", "Norvik",
    ...             (("upper", "soft suede"),), "budget", "students", 0.5)
    >>> print(item_block(item).text.replace(". ", ".\\n"), end="")
    Item I000007: Norvik Zen Sneakers.
    Brand Norvik.
    Category sneakers (fashion).
    Specs: upper: soft suede.
    Price budget.
    For students.
    """
    spec = category_by_key(item.category_key)
    attributes = "; ".join(f"{label}: {value}" for label, value in item.attributes)
    text = (
        f"Item {item.item_id}: {item.title}. Brand {item.brand}. Category {spec.display} ({item.vertical}). "
        f"Specs: {attributes}. Price {item.price_band}. For {item.audience}.\n"
    )
    return Block(id=item.item_id, kind="item", text=text)


def shown_clicks(user: User, history_shown: int) -> tuple[str, ...]:
    """The item ids a history block shows: the newest `history_shown` clicks, newest first."""
    return tuple(reversed(user.clicks[-history_shown:]))


def user_history_block(user: User, items_by_id, history_shown: int) -> Block:
    """The user's newest clicks, newest first, one line each."""
    lines = [f"User {user.user_id} recent clicks, newest first:"]
    for item_id in shown_clicks(user, history_shown):
        item = items_by_id[item_id]
        spec = category_by_key(item.category_key)
        lines.append(f"- {item.title} ({spec.display}, {item.brand}, {item.price_band})")
    return Block(id=user.user_id, kind="user_history", text="\n".join(lines) + "\n")
