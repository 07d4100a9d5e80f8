"""Pool registry resolution and the per-request overlay (no model)."""

from __future__ import annotations

import pytest

from common.drafting.pools import DraftSettings, PoolRegistry, RequestDrafter
from common.drafting.trie import TokenTrie, TrieSettings


def test_registry_resolves_most_specific_pool_then_global() -> None:
    registry = PoolRegistry(TrieSettings(ngram_length=4))
    shoes = registry.get_or_create("ads/shoes")
    assert registry.resolve("ads/shoes") is shoes
    assert registry.resolve("ads/shoes/running") is shoes
    assert registry.resolve("ads/books") is registry.global_pool
    assert registry.resolve(None) is registry.global_pool
    assert registry.resolve("") is registry.global_pool
    with pytest.raises(ValueError):
        registry.drop("global")
    registry.drop("ads/shoes")
    assert "ads/shoes" not in registry and len(registry) == 1


def test_registry_installs_snapshots() -> None:
    source = TokenTrie(TrieSettings(ngram_length=3))
    source.insert([1, 2, 3])
    registry = PoolRegistry()
    loaded = registry.load_snapshot("travel", source.to_bytes())
    assert registry.resolve("travel/hotels") is loaded
    assert loaded.count([1, 2, 3]) == 1


def test_overlay_holds_the_prompt_and_outputs_and_never_touches_the_pool() -> None:
    pool = TokenTrie(TrieSettings(ngram_length=4))
    pool.insert([1, 2, 8, 8])
    before = pool.to_bytes()
    drafter = RequestDrafter(pool, [5, 1, 2, 3, 4], DraftSettings(key_length=2))
    draft = drafter.draft([9, 1, 2], decoding_length=8, branch_length=2)
    # both sources answer the key (1, 2): the prompt's "3 4" and the pool's "8 8", merged
    assert sorted(draft.path_to(i)[0] for i in range(len(draft)) if draft.parents[i] == -1) == [3, 8]
    drafter.observe([6, 7])  # generated text is draftable at once
    assert drafter.draft([4, 6], decoding_length=4, branch_length=2).tokens == [7]
    assert pool.to_bytes() == before


def test_drafter_without_a_pool_uses_the_overlay_only() -> None:
    drafter = RequestDrafter(None, [1, 2, 3, 1, 2])
    assert drafter.draft([1, 2], decoding_length=4, branch_length=4).tokens[:1] == [3]
    assert len(drafter.draft([1, 2], decoding_length=0, branch_length=4)) == 0
