"""The one pool-key fallback rule, and the three places that ask it agree."""

from __future__ import annotations

import doctest

import pytest

from common.drafting import pool_keys
from common.drafting.pool_keys import GLOBAL_POOL, fallback_chain, resolve_pool_key
from common.drafting.pools import PoolRegistry
from services.router.scheduling import ReplicaView, holds_pool

EXISTING = {"ads", "ads/shoes", "travel/hotels", GLOBAL_POOL}


def test_doctests() -> None:
    assert doctest.testmod(pool_keys).failed == 0


@pytest.mark.parametrize("pool_key, chain", [
    ("ads/shoes/running", ["ads/shoes/running", "ads/shoes", "ads"]),
    ("ads", ["ads"]),
    ("", []),
    (None, []),
    ("a//b", ["a//b", "a/", "a"]),  # the service's key pattern allows this; each step drops one segment
])
def test_the_chain_is_the_key_then_its_parents(pool_key, chain) -> None:
    assert list(fallback_chain(pool_key)) == chain


@pytest.mark.parametrize("pool_key, resolved", [
    ("ads/shoes/running", "ads/shoes"),  # most specific existing parent
    ("ads/books", "ads"),
    ("ads/shoes", "ads/shoes"),
    ("travel", GLOBAL_POOL),  # a child existing does not make the parent exist
    ("books", GLOBAL_POOL),
    ("", GLOBAL_POOL),
    (None, GLOBAL_POOL),
    (GLOBAL_POOL, GLOBAL_POOL),
])
def test_a_key_resolves_to_itself_its_nearest_parent_or_the_global_pool(pool_key, resolved) -> None:
    assert resolve_pool_key(pool_key, EXISTING) == resolved

    registry = PoolRegistry()  # the decoder's registry follows the rule
    tries = {key: registry.get_or_create(key) for key in EXISTING}
    assert registry.resolve(pool_key) is tries[resolved]

    # the router counts affinity for the same pool, except the global fallback, which every replica has
    replica = ReplicaView("r", True, 0, 0, pool_keys=frozenset(EXISTING - {GLOBAL_POOL}))
    assert holds_pool(replica, pool_key or "") == (resolved != GLOBAL_POOL)


def test_another_global_key_is_the_last_fallback() -> None:
    assert resolve_pool_key("x/y", {"root"}, global_key="root") == "root"
