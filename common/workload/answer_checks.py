"""Ads checks on a generated answer, against what its prompt shows: which candidate items a
recommendation names, and whether the facts an item's answer states belong to that item. Pure
text functions; benches compare a method's answers with greedy's or full prefill's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.workload.catalog import Item
from common.workload.lexicon import CATEGORIES, PRICE_BANDS

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


# -- item facts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FactVocabulary:
    """Every checkable fact value of a catalog (brands, categories, verticals, attribute values,
    price bands, audiences): `facts` maps each way of writing one, lowercased, to the fact it
    states (a category's key and display name, "fragrance" and "fragrances", are one fact);
    `pattern` finds them in text, longest first and whole words only (so "eau de parfum" is one
    fact, and "mid-range" never reads as "range"). Values without a letter are not facts it can
    check."""

    facts: dict[str, str]
    pattern: re.Pattern[str]

    def find(self, text: str) -> set[str]:
        """The distinct facts `text` states."""
        return {self.facts[match.group(1)] for match in self.pattern.finditer(text.lower())}


def fact_vocabulary(items: Iterable[Item]) -> FactVocabulary:
    """The fact values of `items` and of the lexicon's categories and price bands.

    >>> item = Item("I1", "fashion", "sneakers", "Norvik Zen Sneakers", "Norvik", (("upper", "soft suede"),),
    ...             "budget", "students", 0.5)
    >>> vocabulary = fact_vocabulary([item])
    >>> sorted(vocabulary.find("Norvik sneakers in soft suede, a budget pick for students; not mid-range."))
    ['brand Norvik', 'category fashion/sneakers', 'for students', 'price budget', 'price mid-range', 'soft suede']
    """
    facts: dict[str, str] = {}
    for spec in CATEGORIES:
        for written in (spec.name, spec.display):
            facts.setdefault(written.lower(), f"category {spec.vertical}/{spec.name}")
        facts.setdefault(spec.vertical.lower(), f"vertical {spec.vertical}")
    for band in PRICE_BANDS:
        facts[band.lower()] = f"price {band}"
    for item in items:
        facts.setdefault(item.brand.lower(), f"brand {item.brand}")
        facts.setdefault(item.audience.lower(), f"for {item.audience}")
        for _, value in item.attributes:
            facts.setdefault(value.lower(), value.lower())
    # A bare number ("3" capsules) cannot be told from an answer's own list numbering: left out.
    terms = sorted((t for t in facts if any(c.isalpha() for c in t)), key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(t) for t in terms) + r")(?![\w-])")
    return FactVocabulary({t: facts[t] for t in terms}, pattern)


@dataclass(frozen=True, slots=True)
class FactCheck:
    """The distinct fact values an answer states, and those its item block does not hold."""

    stated: int
    wrong: tuple[str, ...]

    @property
    def correct(self) -> int:
        return self.stated - len(self.wrong)


def check_item_facts(answer: str, item_block_text: str, vocabulary: FactVocabulary) -> FactCheck:
    """Which fact values `answer` states that the item's own block does not (precision against
    the block: a brand, category, price band or attribute value of another item is wrong).

    >>> item = Item("I1", "fashion", "sneakers", "Norvik Zen Sneakers", "Norvik", (("upper", "soft suede"),),
    ...             "budget", "students", 0.5)
    >>> other = Item("I2", "fashion", "sneakers", "Kalo Run", "Kalo", (("upper", "mesh"),), "premium", "runners", 0.5)
    >>> vocabulary = fact_vocabulary([item, other])
    >>> block = "Item I1: Norvik Zen Sneakers. Brand Norvik. Specs: upper: soft suede. Price budget. For students."
    >>> check_item_facts("Norvik's soft suede sneakers, premium mesh.", block, vocabulary)
    FactCheck(stated=5, wrong=('mesh', 'price premium'))
    """
    own = vocabulary.find(item_block_text)
    stated = vocabulary.find(answer)
    return FactCheck(len(stated), tuple(sorted(stated - own)))


def fact_precision(checks: Sequence[FactCheck]) -> dict:
    """Pooled over answers: facts stated that belong to their item, per fact stated (None when
    no answer stated one), the share of answers with no wrong fact, and facts stated per answer."""
    stated = sum(c.stated for c in checks)
    return {"precision": sum(c.correct for c in checks) / stated if stated else None,
            "answers_all_correct": sum(not c.wrong for c in checks) / len(checks) if checks else None,
            "facts_per_answer": stated / len(checks) if checks else None,
            "answers": len(checks)}
