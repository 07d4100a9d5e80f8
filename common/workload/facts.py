"""Facts a reference answer states, computed from exactly what its prompt shows.

A user summary describes the clicks in the user's history block (not hidden interests), and a
recommendation ranks the candidates in the prompt by evidence in that same block, so every
claim in a reference is checkable against the prompt: a model can learn it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from common.workload.catalog import Item


@dataclass(slots=True, frozen=True)
class HistoryProfile:
    num_clicks: int
    top_category: str  # category key
    top_category_clicks: int
    # Second most clicked category key, "" when the history has one category only.
    second_category: str
    top_brand: str
    top_brand_clicks: int
    top_band: str
    brand_clicks: tuple[tuple[str, int], ...]
    category_clicks: tuple[tuple[str, int], ...]
    # Title of the newest shown click.
    newest_title: str

    @property
    def top_vertical(self) -> str:
        return self.top_category.split("/", 1)[0]


@dataclass(slots=True, frozen=True)
class RankedPick:
    item: Item
    # Why it ranks where it does: "brand" (brand clicked before), "price" (preferred band),
    # "category" (the history's top category) or "popular" (no personal signal).
    reason: str
    brand_clicks: int


def profile_history(clicked: list[Item] | tuple[Item, ...]) -> HistoryProfile:
    """Counts over the shown clicks; ties go to the newest click (first in `clicked`).

    >>> from common.workload.catalog import Item
    >>> def item(brand, cat, band):
    ...     return Item("I1", "home", cat, "T", brand, (), band, "x", 1.0)
    >>> p = profile_history(
    ...     [item("A", "lamps", "budget"), item("B", "sofas", "budget"), item("A", "lamps", "premium")])
    >>> p.top_category, p.top_category_clicks, p.second_category, p.top_brand, p.top_band
    ('home/lamps', 2, 'home/sofas', 'A', 'budget')
    """
    if not clicked:
        raise ValueError("profile_history needs at least one click")
    categories = _ordered_counts(item.category_key for item in clicked)
    brands = _ordered_counts(item.brand for item in clicked)
    bands = _ordered_counts(item.price_band for item in clicked)
    return HistoryProfile(
        num_clicks=len(clicked),
        top_category=categories[0][0],
        top_category_clicks=categories[0][1],
        second_category=categories[1][0] if len(categories) > 1 else "",
        top_brand=brands[0][0],
        top_brand_clicks=brands[0][1],
        top_band=bands[0][0],
        brand_clicks=tuple(brands),
        category_clicks=tuple(categories),
        newest_title=clicked[0].title,
    )


def _ordered_counts(values) -> list[tuple[str, int]]:
    # Counter keeps first-seen order among equal counts; sorted() is stable.
    counts = Counter(values)
    return sorted(counts.items(), key=lambda pair: -pair[1])


def rank_candidates(
    profile: HistoryProfile, candidates: list[Item] | tuple[Item, ...], top_n: int
) -> tuple[RankedPick, ...]:
    """The `top_n` candidates by evidence in the history, strongest first.

    Score = 3 per click on the candidate's brand + 2 if its price band is the history's usual
    band + 1 if its category is the history's top one + a popularity term below 1 (breaks ties
    the way a CTR model would: popular items first).
    """
    brand_clicks = dict(profile.brand_clicks)
    max_log_pop = max(math.log(item.popularity) for item in candidates)
    min_log_pop = min(math.log(item.popularity) for item in candidates)
    span = max(max_log_pop - min_log_pop, 1e-9)
    scored = []
    for position, item in enumerate(candidates):
        n_brand = brand_clicks.get(item.brand, 0)
        band_match = item.price_band == profile.top_band
        category_match = item.category_key == profile.top_category
        popularity = 0.9 * (math.log(item.popularity) - min_log_pop) / span
        score = 3.0 * n_brand + 2.0 * band_match + 1.0 * category_match + popularity
        if n_brand:
            reason = "brand"
        elif band_match:
            reason = "price"
        elif category_match:
            reason = "category"
        else:
            reason = "popular"
        # -position: equal scores keep prompt order, so the ranking is deterministic.
        scored.append((score, -position, RankedPick(item=item, reason=reason, brand_clicks=n_brand)))
    scored.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
    return tuple(pick for _, _, pick in scored[:top_n])
