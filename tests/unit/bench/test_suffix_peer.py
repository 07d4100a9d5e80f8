"""SuffixDecoding as a draft source in our engine's strict loop: greedy's tokens, fewer steps once
its global tree holds the answer. arctic-inference has no CPU wheel on the registry, so this runs
only where `make suffix-peer` built it; CI leaves it out (and bench-decode says so)."""

from __future__ import annotations

import pytest

from bench import suffix_peer
from bench.decode import engine_generate
from common.modeling.loading import load_model
from services.decoder.engine import DecodingEngine, GenerationConfig


def test_the_peer_reports_why_it_is_missing_or_drafts_losslessly(tiny_llama_path, one_torch_thread):
    missing = suffix_peer.available()
    if missing is not None:
        assert missing and "make suffix-peer" in suffix_peer.INSTALL_HINT
        pytest.skip(f"arctic-inference not installed: {missing}")
    loaded = load_model(tiny_llama_path)
    engine = DecodingEngine(loaded.model)
    prompt = [5, 9, 14, 3, 22, 7, 5, 9, 14]
    config = GenerationConfig(max_new_tokens=24, drafting=False)
    greedy = engine_generate(engine, prompt, config)
    peer = suffix_peer.SuffixDecodingPolicy([greedy.tokens], max_tokens=16)  # it has seen this answer
    drafting = GenerationConfig(max_new_tokens=24, branch_length=16)
    source = suffix_peer.SuffixDecodingSource(peer, prompt)
    try:
        with_peer = engine_generate(engine, prompt, drafting, draft_source=source)
    finally:
        source.close()
    assert with_peer.tokens == greedy.tokens
    assert with_peer.steps < greedy.steps
