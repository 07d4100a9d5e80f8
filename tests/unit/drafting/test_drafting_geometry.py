"""The one draft geometry: its defaults, what it derives, what a decoder loses against a pool,
and that every settings object takes its defaults from it."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

from common.drafting import geometry as geometry_module
from common.drafting.geometry import DEFAULT_GEOMETRY, DraftGeometry, pool_mismatches
from common.drafting.pools import DraftSettings
from common.drafting.trie import TokenTrie, TrieSettings
from services.decoder.engine.config import EngineSettings
from services.decoder.settings import DecoderSettings
from services.pool.settings import PoolSettings


def test_docstring_examples_hold():
    assert doctest.testmod(geometry_module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_defaults_are_the_measured_cpu_tree_and_pools_reach_its_depth():
    g = DEFAULT_GEOMETRY
    assert (g.key_length, g.decoding_length, g.branch_length) == (2, 16, 8)
    assert (g.adaptive_max_tokens, g.adaptive_max_depth) == (20, 12)
    assert g.ngram_length == g.key_length + g.branch_length  # just deep enough for the default tree
    assert g.pool_depth == g.branch_length
    assert pool_mismatches(g, g) == []


def test_geometry_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_GEOMETRY.branch_length = 4  # type: ignore[misc]


@pytest.mark.parametrize("field", ["key_length", "ngram_length", "decoding_length", "branch_length",
                                   "adaptive_max_tokens", "adaptive_max_depth"])
def test_sizes_below_one_are_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        DraftGeometry(**{field: 0})


def test_an_ngram_needs_a_key_token_and_a_draft_token():
    with pytest.raises(ValueError, match="ngram_length must be >= 2"):
        DraftGeometry(key_length=1, ngram_length=1)


@pytest.mark.parametrize(("key_length", "ngram_length", "depth"), [
    (2, 10, 8),
    (3, 10, 7),
    (1, 10, 9),
    (2, 4, 2),
    (2, 2, 1),  # the key is cut to one token: one draft token still fits
    (8, 4, 1),
])
def test_pool_depth_is_what_a_trie_of_those_ngrams_drafts(key_length, ngram_length, depth):
    assert DraftGeometry(key_length=key_length, ngram_length=ngram_length).pool_depth == depth
    # The trie agrees: after the longest key it matches (its first candidate; shorter fallback
    # keys may add deeper nodes), a chain longer than the n-grams drafts exactly that deep.
    trie = TokenTrie(TrieSettings(ngram_length=ngram_length))
    chain = list(range(100, 100 + ngram_length + key_length))
    trie.insert(chain)
    first = trie.candidates(chain[:key_length], decoding_length=64, branch_length=64,
                            key_length=key_length)[0]
    assert len(first.tokens) == depth


@pytest.mark.parametrize(("adaptive", "caps"), [(False, (16, 8)), (True, (20, 12))])
def test_tree_caps_are_the_default_tree_or_adaptive_caps(adaptive, caps):
    assert DEFAULT_GEOMETRY.tree_caps(adaptive) == caps


@pytest.mark.parametrize(("decoder", "pool", "expected"), [
    (DraftGeometry(), DraftGeometry(), []),
    (DraftGeometry(), DraftGeometry(ngram_length=14), []),  # a deeper pool loses nothing
    (DraftGeometry(adaptive_max_depth=16), DraftGeometry(), []),  # deeper only in the request's overlay
    (DraftGeometry(branch_length=16), DraftGeometry(), ["branch_length 16 is deeper"]),
    (DraftGeometry(), DraftGeometry(ngram_length=4), ["branch_length 8 is deeper"]),
    (DraftGeometry(key_length=3), DraftGeometry(), ["key_length 3 differs", "branch_length 8 is deeper"]),
    (DraftGeometry(key_length=1), DraftGeometry(), ["key_length 1 differs"]),  # shorter key: depth reached
])
def test_pool_mismatches_name_what_the_decoder_loses(decoder, pool, expected):
    problems = pool_mismatches(decoder, pool)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start)


def test_a_deeper_branch_names_the_ngram_length_that_would_reach_it():
    (problem,) = pool_mismatches(DraftGeometry(branch_length=16), DraftGeometry())
    assert "reach depth 8" in problem and "ngram_length >= 18" in problem


def test_every_settings_object_defaults_to_the_geometry():
    g = DEFAULT_GEOMETRY
    engine = EngineSettings()
    assert (engine.key_length, engine.decoding_length, engine.branch_length) == (
        g.key_length, g.decoding_length, g.branch_length)
    decoder = DecoderSettings()
    assert decoder.draft_geometry == g
    assert PoolSettings().ngram_length == g.ngram_length
    assert TrieSettings().ngram_length == g.ngram_length
    assert DraftSettings().key_length == g.key_length


def test_the_decoder_geometry_follows_its_settings():
    decoder = DecoderSettings(decoding_length=32, branch_length=4,
                              adaptive_max_tokens=24, adaptive_max_depth=6)
    g = decoder.draft_geometry
    assert (g.decoding_length, g.branch_length, g.adaptive_max_tokens, g.adaptive_max_depth) == (32, 4, 24, 6)
    assert g.key_length == DEFAULT_GEOMETRY.key_length and g.ngram_length == DEFAULT_GEOMETRY.ngram_length
    assert g.tree_caps(adaptive=True) == (24, 6)
