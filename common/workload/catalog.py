"""A seeded synthetic ad catalog: items, users with click histories, and an inventory timeline.

Pure: `generate_catalog(settings)` reads nothing and writes nothing; equal settings give an
equal catalog. Each stage draws from its own generator, seeded from (settings.seed, stage), so
changing e.g. the number of inventory events does not reshuffle the items.

>>> from common.workload.settings import WorkloadSettings
>>> catalog = generate_catalog(WorkloadSettings(num_items=100, num_users=10, inventory_events=5))
>>> len(catalog.items), len(catalog.users), catalog.items[0].item_id
(100, 10, 'I000000')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from common.workload.lexicon import (
    AUDIENCES,
    BRAND_SYLLABLES,
    CATEGORIES,
    MODEL_SUFFIXES,
    MODEL_WORDS,
    PRICE_BANDS,
    VERTICALS,
    CategorySpec,
)
from common.workload.settings import WorkloadSettings

# Stage ids mixed into the seed: one independent random stream per stage.
_STAGE_BRANDS, _STAGE_ITEMS, _STAGE_SPLIT, _STAGE_USERS, _STAGE_INVENTORY = range(5)

# How much a user's favourite brand and price band raise an item's click odds.
_FAVOURITE_BRAND_BOOST = 4.0
_PREFERRED_BAND_BOOST = 3.0
# Share of clicks that ignore the user's interests (exploration, noise).
_RANDOM_CLICK_SHARE = 0.1
# How often each price band is a user's preferred one (budget .. luxury).
_BAND_PREFERENCE = np.array([0.3, 0.4, 0.2, 0.1])


@dataclass(slots=True, frozen=True)
class Item:
    item_id: str
    vertical: str
    category: str
    title: str
    brand: str
    # (label, value) pairs in the category's attribute order.
    attributes: tuple[tuple[str, str], ...]
    price_band: str
    audience: str
    # Zipf-like weight (1 / rank**s); only ratios matter.
    popularity: float

    @property
    def category_key(self) -> str:
        return f"{self.vertical}/{self.category}"


@dataclass(slots=True, frozen=True)
class User:
    user_id: str
    # The vertical most of the user's interest weight sits in.
    segment: str
    # (category key, weight) pairs, weights summing to 1, strongest first.
    interests: tuple[tuple[str, float], ...]
    preferred_band: str
    # Clicked item ids, oldest first.
    clicks: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class InventoryEvent:
    seq: int
    # Seconds since the start of the timeline.
    time_s: float
    kind: str  # "added" | "changed" | "removed"
    item_id: str
    # The item after the event; None for "removed".
    item: Item | None


@dataclass(slots=True, frozen=True)
class Catalog:
    items: tuple[Item, ...]
    users: tuple[User, ...]
    heldout_item_ids: frozenset[str]
    heldout_user_ids: frozenset[str]
    inventory: tuple[InventoryEvent, ...]
    items_by_id: Mapping[str, Item]

    def items_in(self, category_key: str) -> tuple[Item, ...]:
        return tuple(item for item in self.items if item.category_key == category_key)


def generate_catalog(settings: WorkloadSettings) -> Catalog:
    """The whole catalog for `settings`; see the module docstring."""
    brands = generate_brands(settings, _stage_rng(settings, _STAGE_BRANDS))
    items = generate_items(settings, brands, _stage_rng(settings, _STAGE_ITEMS))
    split_rng = _stage_rng(settings, _STAGE_SPLIT)
    heldout_items = choose_heldout_items(items, settings.heldout_item_fraction, split_rng)
    users, heldout_users = generate_users(settings, items, heldout_items, _stage_rng(settings, _STAGE_USERS))
    inventory = generate_inventory(settings, items, brands, _stage_rng(settings, _STAGE_INVENTORY))
    return Catalog(
        items=items,
        users=users,
        heldout_item_ids=heldout_items,
        heldout_user_ids=heldout_users,
        inventory=inventory,
        items_by_id={item.item_id: item for item in items},
    )


def _stage_rng(settings: WorkloadSettings, stage: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, stage])


def _weighted_index(rng: np.random.Generator, weights: np.ndarray) -> int:
    """An index drawn with probability weights[i] / sum(weights).

    Same law as `rng.choice(len(weights), p=...)` without its validation cost, which dominated
    catalog generation (about 100k draws).
    """
    cumulative = np.cumsum(weights)
    position = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(position, len(weights) - 1)


def generate_brands(settings: WorkloadSettings, rng: np.random.Generator) -> dict[str, tuple[str, ...]]:
    """category key -> its brands, drawn from a per-vertical pool (brands span categories)."""
    used: set[str] = set()
    brands: dict[str, tuple[str, ...]] = {}
    for vertical in VERTICALS:
        pool = [_new_brand_name(rng, used) for _ in range(2 * settings.brands_per_category)]
        for spec in CATEGORIES:
            if spec.vertical == vertical:
                picked = rng.choice(len(pool), size=settings.brands_per_category, replace=False)
                brands[spec.key] = tuple(pool[i] for i in picked)
    return brands


def _new_brand_name(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        n_syllables = 3 if rng.random() < 0.3 else 2
        name = "".join(BRAND_SYLLABLES[i] for i in rng.integers(len(BRAND_SYLLABLES), size=n_syllables))
        name = name.capitalize()
        if name not in used and len(name) >= 4:
            used.add(name)
            return name


def generate_items(
    settings: WorkloadSettings, brands: Mapping[str, tuple[str, ...]], rng: np.random.Generator
) -> tuple[Item, ...]:
    """`settings.num_items` items over all categories, ids in random order, Zipf popularity."""
    # Uneven category sizes, but at least one item each.
    shares = rng.dirichlet(np.full(len(CATEGORIES), 5.0))
    counts = 1 + rng.multinomial(settings.num_items - len(CATEGORIES), shares)
    drafts: list[tuple[CategorySpec, int]] = [
        (spec, n) for spec, count in zip(CATEGORIES, counts) for n in range(count)
    ]
    order = rng.permutation(len(drafts))
    # Popularity rank is independent of category; rank 1 is the most popular item.
    ranks = rng.permutation(len(drafts)) + 1
    popularity = ranks.astype(np.float64) ** -settings.popularity_exponent
    # A brand's typical price band, so band correlates with brand as in real catalogs.
    brand_band = {brand: int(rng.integers(len(PRICE_BANDS))) for names in brands.values() for brand in names}
    items = []
    for new_index, draft_index in enumerate(order):
        spec, _ = drafts[draft_index]
        items.append(
            _new_item(
                spec,
                f"I{new_index:06d}",
                brands[spec.key],
                brand_band,
                float(np.round(popularity[draft_index], 8)),
                rng,
            )
        )
    return tuple(items)


def _new_item(
    spec: CategorySpec,
    item_id: str,
    category_brands: tuple[str, ...],
    brand_band: Mapping[str, int],
    popularity: float,
    rng: np.random.Generator,
) -> Item:
    # A few brands dominate each category (weights 1, 1/2, 1/3, ...).
    brand = category_brands[_weighted_index(rng, 1.0 / np.arange(1, len(category_brands) + 1))]
    model = MODEL_WORDS[rng.integers(len(MODEL_WORDS))] + MODEL_SUFFIXES[rng.integers(len(MODEL_SUFFIXES))]
    title = f"{brand} {model} {spec.title_nouns[rng.integers(len(spec.title_nouns))]}"
    attributes = tuple((attr.label, attr.values[rng.integers(len(attr.values))]) for attr in spec.attributes)
    band = min(max(brand_band[brand] + (-1, 0, 0, 0, 1)[rng.integers(5)], 0), len(PRICE_BANDS) - 1)
    audiences = AUDIENCES[spec.vertical]
    return Item(
        item_id=item_id,
        vertical=spec.vertical,
        category=spec.name,
        title=title,
        brand=brand,
        attributes=attributes,
        price_band=PRICE_BANDS[band],
        audience=audiences[rng.integers(len(audiences))],
        popularity=popularity,
    )


def choose_heldout_items(
    items: tuple[Item, ...], fraction: float, rng: np.random.Generator
) -> frozenset[str]:
    """A random `fraction` of items, never the last warm item of a category."""
    target = int(round(fraction * len(items)))
    warm_left: dict[str, int] = {}
    for item in items:
        warm_left[item.category_key] = warm_left.get(item.category_key, 0) + 1
    heldout: set[str] = set()
    for index in rng.permutation(len(items)):
        if len(heldout) >= target:
            break
        item = items[index]
        if warm_left[item.category_key] > 1:
            warm_left[item.category_key] -= 1
            heldout.add(item.item_id)
    return frozenset(heldout)


def generate_users(
    settings: WorkloadSettings,
    items: tuple[Item, ...],
    heldout_items: frozenset[str],
    rng: np.random.Generator,
) -> tuple[tuple[User, ...], frozenset[str]]:
    """Users with interests and click histories; returns (users, held-out user ids).

    Warm users click warm items only, so no held-out item leaks into the training corpus
    through a history block; held-out users click anything.
    """
    index = _CategoryIndex(items, heldout_items)
    n_heldout = int(round(settings.heldout_user_fraction * settings.num_users))
    heldout_positions = set(rng.choice(settings.num_users, size=n_heldout, replace=False).tolist())
    vertical_weights = rng.dirichlet(np.full(len(VERTICALS), 4.0))
    users = []
    heldout_ids = set()
    for n in range(settings.num_users):
        user_id = f"U{n:06d}"
        is_heldout = n in heldout_positions
        if is_heldout:
            heldout_ids.add(user_id)
        users.append(_new_user(user_id, settings, index, vertical_weights, is_heldout, rng))
    return tuple(users), frozenset(heldout_ids)


class _CategoryIndex:
    """Per category: item ids, popularity, brand and band arrays (for vectorised click draws)."""

    def __init__(self, items: tuple[Item, ...], heldout_items: frozenset[str]) -> None:
        self.keys = [spec.key for spec in CATEGORIES]
        self.ids: dict[str, np.ndarray] = {}
        self.popularity: dict[str, np.ndarray] = {}
        self.warm_mask: dict[str, np.ndarray] = {}
        self.brands: dict[str, np.ndarray] = {}
        self.bands: dict[str, np.ndarray] = {}
        for key in self.keys:
            members = [item for item in items if item.category_key == key]
            self.ids[key] = np.array([item.item_id for item in members])
            self.popularity[key] = np.array([item.popularity for item in members])
            self.warm_mask[key] = np.array([item.item_id not in heldout_items for item in members])
            self.brands[key] = np.array([item.brand for item in members])
            self.bands[key] = np.array([item.price_band for item in members])
        sizes = np.array([len(self.ids[key]) for key in self.keys], dtype=np.float64)
        self.size_share = sizes / sizes.sum()


def _new_user(
    user_id: str,
    settings: WorkloadSettings,
    index: _CategoryIndex,
    vertical_weights: np.ndarray,
    is_heldout: bool,
    rng: np.random.Generator,
) -> User:
    segment = VERTICALS[_weighted_index(rng, vertical_weights)]
    interests = _draw_interests(segment, index, rng)
    preferred_band = PRICE_BANDS[_weighted_index(rng, _BAND_PREFERENCE)]
    # One favourite brand per interest category, drawn among its popular items' brands.
    favourite_brand = {}
    for key, _ in interests:
        favourite_brand[key] = index.brands[key][_weighted_index(rng, index.popularity[key])]
    low, high = settings.history_length
    n_clicks = int(rng.integers(low, high + 1))
    interest_keys = [key for key, _ in interests]
    interest_weights = np.array([weight for _, weight in interests])
    clicked: list[str] = []
    # Click weights per category, built on first use; a clicked item's weight drops to 0 so a
    # history never shows an item twice.
    weights_by_key: dict[str, np.ndarray] = {}
    for _ in range(n_clicks):
        if rng.random() < _RANDOM_CLICK_SHARE:
            key = index.keys[_weighted_index(rng, index.size_share)]
        else:
            key = interest_keys[_weighted_index(rng, interest_weights)]
        weights = weights_by_key.get(key)
        if weights is None:
            weights = index.popularity[key].copy()
            weights *= np.where(index.brands[key] == favourite_brand.get(key), _FAVOURITE_BRAND_BOOST, 1.0)
            weights *= np.where(index.bands[key] == preferred_band, _PREFERRED_BAND_BOOST, 1.0)
            if not is_heldout:
                weights *= index.warm_mask[key]
            weights_by_key[key] = weights
        if weights.sum() <= 0:
            continue
        position = _weighted_index(rng, weights)
        weights[position] = 0.0
        clicked.append(str(index.ids[key][position]))
    return User(
        user_id=user_id,
        segment=segment,
        interests=interests,
        preferred_band=preferred_band,
        clicks=tuple(clicked),
    )


def _draw_interests(
    segment: str, index: _CategoryIndex, rng: np.random.Generator
) -> tuple[tuple[str, float], ...]:
    """1-3 categories: the first in the user's segment, the rest mostly in the same vertical."""
    same_vertical = [key for key in index.keys if key.startswith(segment + "/")]
    keys = [same_vertical[rng.integers(len(same_vertical))]]
    for _ in range(int(rng.integers(0, 3))):
        pool = same_vertical if rng.random() < 0.6 else index.keys
        candidate = pool[rng.integers(len(pool))]
        if candidate not in keys:
            keys.append(candidate)
    weights = np.sort(rng.dirichlet(np.full(len(keys), 2.0)))[::-1]
    return tuple((key, round(float(weight), 4)) for key, weight in zip(keys, weights))


def generate_inventory(
    settings: WorkloadSettings,
    items: tuple[Item, ...],
    brands: Mapping[str, tuple[str, ...]],
    rng: np.random.Generator,
) -> tuple[InventoryEvent, ...]:
    """Items added (new ids after the catalog's), changed (price or one attribute) and removed.

    The events a Kafka inventory topic carries after the catalog snapshot; a removed item is
    never changed or removed again.
    """
    specs = {spec.key: spec for spec in CATEGORIES}
    brand_band = {item.brand: PRICE_BANDS.index(item.price_band) for item in items}
    alive: dict[str, Item] = {item.item_id: item for item in items}
    alive_ids: list[str] = list(alive)
    next_id = len(items)
    time_s = 0.0
    events = []
    for seq in range(settings.inventory_events):
        time_s += float(rng.exponential(30.0))
        roll = rng.random()
        if roll < 0.4 or len(alive_ids) < 2:
            spec = CATEGORIES[rng.integers(len(CATEGORIES))]
            popularity = float(np.round((1 + rng.integers(len(items))) ** -settings.popularity_exponent, 8))
            item = _new_item(
                spec, f"I{next_id:06d}", brands[spec.key], _default_bands(brands[spec.key], brand_band),
                popularity, rng,
            )
            next_id += 1
            alive[item.item_id] = item
            alive_ids.append(item.item_id)
            events.append(InventoryEvent(seq, round(time_s, 3), "added", item.item_id, item))
        elif roll < 0.8:
            item_id = alive_ids[rng.integers(len(alive_ids))]
            changed = _change_item(alive[item_id], specs[alive[item_id].category_key], rng)
            alive[item_id] = changed
            events.append(InventoryEvent(seq, round(time_s, 3), "changed", item_id, changed))
        else:
            position = int(rng.integers(len(alive_ids)))
            item_id = alive_ids[position]
            alive_ids[position] = alive_ids[-1]
            alive_ids.pop()
            del alive[item_id]
            events.append(InventoryEvent(seq, round(time_s, 3), "removed", item_id, None))
    return tuple(events)


def _default_bands(category_brands: tuple[str, ...], brand_band: Mapping[str, int]) -> dict[str, int]:
    # A brand that has no item yet gets the middle band.
    return {brand: brand_band.get(brand, 1) for brand in category_brands}


def _change_item(item: Item, spec: CategorySpec, rng: np.random.Generator) -> Item:
    """A price move (one band up or down) or a new value for one attribute."""
    if rng.random() < 0.5:
        band = PRICE_BANDS.index(item.price_band) + int(rng.choice([-1, 1]))
        band = min(max(band, 0), len(PRICE_BANDS) - 1)
        return replace(item, price_band=PRICE_BANDS[band])
    position = int(rng.integers(len(spec.attributes)))
    attr = spec.attributes[position]
    attributes = list(item.attributes)
    attributes[position] = (attr.label, attr.values[rng.integers(len(attr.values))])
    return replace(item, attributes=tuple(attributes))
