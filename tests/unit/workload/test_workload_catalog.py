"""Catalog generator: settings validation, determinism, shape, splits, inventory timeline."""

from __future__ import annotations

from collections import Counter

import pytest

from common.workload.catalog import generate_catalog
from common.workload.lexicon import CATEGORIES, VERTICALS
from common.workload.settings import WorkloadSettings

SMALL = dict(num_items=300, num_users=60, inventory_events=80)


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(WorkloadSettings(**SMALL))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_items": 0}, "num_items"),
        ({"num_items": -5}, "num_items"),
        ({"num_users": 0}, "num_users"),
        ({"heldout_item_fraction": 1.0}, "heldout_item_fraction"),
        ({"rec_candidates": (20, 10)}, "rec_candidates"),
        ({"item_knowledge_warm": -1}, "item_knowledge_warm"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(overrides, field):
    with pytest.raises(ValueError, match=field):
        WorkloadSettings(**overrides)


def test_default_and_quick_sizes():
    assert (WorkloadSettings().num_items, WorkloadSettings().num_users) == (20_000, 5_000)
    assert (WorkloadSettings.quick().num_items, WorkloadSettings.quick().num_users) == (2_000, 500)


def test_lexicon_has_at_least_six_verticals_of_five_categories():
    per_vertical = Counter(spec.vertical for spec in CATEGORIES)
    assert len(VERTICALS) >= 6
    assert all(count >= 5 for count in per_vertical.values())
    assert len({spec.key for spec in CATEGORIES}) == len(CATEGORIES)


def test_same_settings_give_the_same_catalog(catalog):
    again = generate_catalog(WorkloadSettings(**SMALL))
    assert again.items == catalog.items and again.users == catalog.users
    assert again.inventory == catalog.inventory


def test_another_seed_gives_another_catalog(catalog):
    other = generate_catalog(WorkloadSettings(**SMALL, seed=1))
    assert other.items != catalog.items


def test_items_are_complete_and_unique(catalog):
    assert len(catalog.items) == SMALL["num_items"]
    assert len({item.item_id for item in catalog.items}) == len(catalog.items)
    assert {item.category_key for item in catalog.items} == {spec.key for spec in CATEGORIES}
    for item in catalog.items[:50]:
        assert item.title.startswith(item.brand + " ")
        assert item.attributes and item.price_band and item.audience and item.popularity > 0


def test_popularity_is_zipf_like(catalog):
    popularity = sorted((item.popularity for item in catalog.items), reverse=True)
    # rank 1 vs rank 100 under 1/r^1.05: about 125x
    assert popularity[0] / popularity[99] > 50


def test_warm_users_click_only_warm_items(catalog):
    for user in catalog.users:
        assert len(user.clicks) == len(set(user.clicks))
        if user.user_id not in catalog.heldout_user_ids:
            assert not set(user.clicks) & catalog.heldout_item_ids


def test_clicks_follow_interests(catalog):
    # 90% of clicks follow interests: most users' top interest is their most clicked category.
    agree = 0
    for user in catalog.users:
        clicked = Counter(catalog.items_by_id[i].category_key for i in user.clicks)
        agree += user.interests[0][0] in {key for key, _ in clicked.most_common(2)}
    assert agree / len(catalog.users) > 0.8


def test_heldout_split_sizes(catalog):
    assert len(catalog.heldout_item_ids) == round(0.03 * SMALL["num_items"])
    assert len(catalog.heldout_user_ids) == round(0.05 * SMALL["num_users"])


def test_inventory_timeline(catalog):
    events = catalog.inventory
    assert len(events) == SMALL["inventory_events"]
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(a.time_s <= b.time_s for a, b in zip(events, events[1:]))
    assert {e.kind for e in events} == {"added", "changed", "removed"}
    removed: set[str] = set()
    known = {item.item_id for item in catalog.items}
    for event in events:
        assert event.item_id not in removed, "an item changed or removed after its removal"
        if event.kind == "added":
            assert event.item_id not in known and event.item is not None
            known.add(event.item_id)
        elif event.kind == "changed":
            assert event.item is not None and event.item.item_id == event.item_id
        else:
            assert event.item is None
            removed.add(event.item_id)
