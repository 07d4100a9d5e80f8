"""Ads checks on a generated answer, against what its prompt shows: which candidate items a
recommendation names. Pure text functions; benches compare a method's answer with full prefill's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# An item block starts "Item <id>: <title>. Brand ..." (common/workload/blocks.py renders it).
_ITEM_HEAD = re.compile(r"Item (?P<id>\S+): (?P<title>[^.]+)\.")


@dataclass(frozen=True, slots=True)
class Candidate:
    item_id: str
    title: str


def candidate_from_block(text: str) -> Candidate | None:
    """The item an item block describes, None for a block that is not one.

    >>> candidate_from_block("Item I015114: Zensol Ridge Lite Roast. Brand Zensol. Price premium.")
    Candidate(item_id='I015114', title='Zensol Ridge Lite Roast')
    """
    match = _ITEM_HEAD.match(text)
    return Candidate(match["id"], match["title"].strip()) if match else None


def recommended_items(answer: str, candidates: Sequence[Candidate]) -> list[str]:
    """Ids of the candidates the answer names (by id or by title), in order of first mention.

    >>> cands = [Candidate("I1", "Zensol Roast"), Candidate("I2", "Lumita Quill"), Candidate("I3", "Koal Glide")]
    >>> recommended_items("1. Lumita Quill - fits. 2. Item I1 (Zensol Roast). Again Lumita Quill.", cands)
    ['I2', 'I1']
    """
    first_seen: dict[str, int] = {}
    for cand in candidates:
        spots = [answer.find(needle) for needle in (cand.item_id, cand.title) if needle]
        spots = [s for s in spots if s >= 0]
        if spots:
            first_seen[cand.item_id] = min(spots)
    return sorted(first_seen, key=first_seen.__getitem__)
