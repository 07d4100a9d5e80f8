"""Assembly from cached blocks: full and exact-prefix reuse equal a plain forward; non-prefix reuse
is approximate and CacheBlend/EPIC correct it; selections and stats are what the modes promise."""

from __future__ import annotations

import math

import pytest
import torch

from common.blocks.assembly import assemble, compute_block_kv
from common.blocks.rope import UnsupportedRopeError
from tests.unit.blocks.conftest import build, llama_with_rope


def random_ids(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(3, 250, (n,), generator=generator).tolist()


def random_prompt(seed: int, sizes=(8, 12, 12), tail=5):
    g = torch.Generator().manual_seed(seed)
    return [random_ids(n, g) for n in sizes], random_ids(tail, g)


def plain_forward(model, ids: list[int]):
    with torch.no_grad():
        out = model(torch.tensor([ids]), position_ids=torch.arange(len(ids))[None], use_cache=True)
    return out.logits[:, -1].float(), out.past_key_values


def next_step_logits(model, cache, prompt_len: int, token: int = 42) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([[token]]), position_ids=torch.tensor([[prompt_len]]), past_key_values=cache)
    return out.logits[:, -1]


def kl_nats(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref, oth = reference.log_softmax(-1), other.log_softmax(-1)
    return float((ref.exp() * (ref - oth)).sum())


def assert_cache_close(cache, reference_cache, layers: int, atol: float) -> None:
    for layer in range(layers):
        torch.testing.assert_close(
            cache.layers[layer].keys, reference_cache.layers[layer].keys, atol=atol, rtol=0
        )
        torch.testing.assert_close(
            cache.layers[layer].values, reference_cache.layers[layer].values, atol=atol, rtol=0
        )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return build(request.param, layers=3)


def with_kv(model, blocks, cached=None):
    """(ids, kv) pairs; `cached` lists which block indices hit (default all)."""
    cached = range(len(blocks)) if cached is None else cached
    return [(ids, compute_block_kv(model, ids) if i in cached else None) for i, ids in enumerate(blocks)]


def test_full_mode_equals_plain_forward_and_continues_decoding(model):
    blocks, tail = random_prompt(0)
    prompt = sum(blocks, []) + tail
    ref_logits, ref_cache = plain_forward(model, prompt)
    out = assemble(model, with_kv(model, blocks), tail, mode="full")
    torch.testing.assert_close(out.last_logits, ref_logits, atol=1e-5, rtol=0)
    assert out.stats.computed_tokens == len(prompt) and out.stats.cached_tokens == 0
    assert out.cache.get_seq_length() == len(prompt)
    ref_next = next_step_logits(model, ref_cache, len(prompt))
    torch.testing.assert_close(next_step_logits(model, out.cache, len(prompt)), ref_next, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["reuse", "cacheblend", "epic"])
def test_reuse_of_an_exact_prefix_equals_full(model, mode):
    # Only the first block hits (prefix caching); the misses after it are computed in context.
    blocks, tail = random_prompt(1)
    prompt = sum(blocks, []) + tail
    ref_logits, ref_cache = plain_forward(model, prompt)
    out = assemble(model, with_kv(model, blocks, cached=[0]), tail, mode=mode)
    torch.testing.assert_close(out.last_logits, ref_logits, atol=1e-5, rtol=0)
    assert_cache_close(out.cache, ref_cache, model.config.num_hidden_layers, atol=1e-5)
    assert out.stats.cached_tokens == len(blocks[0]) and out.stats.recomputed_tokens == 0
    assert out.stats.computed_tokens == len(prompt) - len(blocks[0])


def test_non_prefix_reuse_differs_and_cacheblend_at_ratio_one_equals_full(model):
    blocks, tail = random_prompt(2)
    prompt = sum(blocks, []) + tail
    ref_logits, ref_cache = plain_forward(model, prompt)
    hits = with_kv(model, blocks)
    reused = assemble(model, hits, tail, mode="reuse")
    assert (reused.last_logits - ref_logits).abs().max().item() > 1e-4  # cross-block attention is missing
    assert reused.stats.computed_tokens == len(tail) and reused.stats.recomputed_tokens == 0
    blended = assemble(model, hits, tail, mode="cacheblend", recompute_ratio=1.0)
    torch.testing.assert_close(blended.last_logits, ref_logits, atol=1e-4, rtol=0)
    assert_cache_close(blended.cache, ref_cache, model.config.num_hidden_layers, atol=1e-4)
    torch.testing.assert_close(
        next_step_logits(model, blended.cache, len(prompt)),
        next_step_logits(model, ref_cache, len(prompt)),
        atol=1e-4,
        rtol=0,
    )
    assert blended.stats.recomputed_tokens == len(prompt) - len(tail) - len(blocks[0])


def test_a_block_computed_after_the_prompts_first_block_is_exact_right_after_it(model):
    # [instruction][history][item]: history computed after the instruction sits where it was
    # computed, so its KV is full prefill's; the item, computed after the instruction too, is
    # re-rotated from there to its real offset and is the only approximate part.
    blocks, tail = random_prompt(3)
    prompt = sum(blocks, []) + tail
    ref_logits, ref_cache = plain_forward(model, prompt)
    context = compute_block_kv(model, blocks[0])
    history = compute_block_kv(model, blocks[1], context=context)
    assert history.base_position == len(blocks[0]) and history.num_tokens == len(blocks[1])
    exact = assemble(model, [(blocks[0], context), (blocks[1], history), (blocks[2], None)], tail, mode="reuse")
    torch.testing.assert_close(exact.last_logits, ref_logits, atol=1e-5, rtol=0)
    assert_cache_close(exact.cache, ref_cache, model.config.num_hidden_layers, atol=1e-5)

    item = compute_block_kv(model, blocks[2], context=context)
    moved = assemble(model, [(blocks[0], context), (blocks[1], history), (blocks[2], item)], tail, mode="reuse")
    assert (moved.last_logits - ref_logits).abs().max().item() > 1e-4
    blended = assemble(model, [(blocks[0], context), (blocks[1], history), (blocks[2], item)], tail,
                       mode="cacheblend", recompute_ratio=1.0)
    torch.testing.assert_close(blended.last_logits, ref_logits, atol=1e-4, rtol=0)


def test_a_context_that_does_not_start_the_prompt_is_refused(model):
    blocks, _ = random_prompt(4)
    context = compute_block_kv(model, blocks[0])
    later = compute_block_kv(model, blocks[1], context=context)
    with pytest.raises(AssertionError, match="context must start the prompt"):
        compute_block_kv(model, blocks[2], context=later)


def test_cacheblend_is_closer_to_full_than_pure_reuse_on_average():
    model = build("llama", layers=4)
    kl_reuse, kl_blend = [], []
    for seed in range(4):
        blocks, tail = random_prompt(10 + seed, sizes=(8, 16, 16, 16), tail=6)
        hits = with_kv(model, blocks)
        full = assemble(model, hits, tail, mode="full").last_logits
        kl_reuse.append(kl_nats(full, assemble(model, hits, tail, mode="reuse").last_logits))
        kl_blend.append(kl_nats(full, assemble(model, hits, tail, mode="cacheblend").last_logits))
    assert sum(kl_blend) < sum(kl_reuse), (kl_blend, kl_reuse)


def test_cacheblend_picks_ratio_of_non_prefix_cached_tokens(model):
    blocks, tail = random_prompt(3)
    out = assemble(model, with_kv(model, blocks), tail, mode="cacheblend", recompute_ratio=0.15)
    candidates = len(blocks[1]) + len(blocks[2])  # block 0 sits at position 0 and is exact
    assert out.stats.recomputed_tokens == math.ceil(0.15 * candidates) == out.recomputed_positions.numel()
    assert out.recomputed_positions.min().item() >= len(blocks[0])
    assert out.recomputed_positions.max().item() < len(blocks[0]) + candidates
    n_prompt, n_layers = out.stats.prompt_tokens, model.config.num_hidden_layers
    # layers 0..1 for every token, the last layer for the tail and the picks
    assert out.stats.token_layers == 2 * n_prompt + (len(tail) + out.stats.recomputed_tokens) * (n_layers - 2)


def test_epic_recomputes_the_first_k_tokens_of_each_non_first_cached_block(model):
    blocks, tail = random_prompt(4, sizes=(6, 9, 3, 9))
    hits = with_kv(model, blocks, cached=[0, 1, 2])  # block 3 misses: computed whole, not "recomputed"
    out = assemble(model, hits, tail, mode="epic", epic_tokens=4)
    # blocks start at 0, 6, 15, 18; block 0 is an exact prefix, block 2 is shorter than k
    expected = list(range(6, 10)) + list(range(15, 18))
    assert out.recomputed_positions.tolist() == expected
    assert out.stats.recomputed_tokens == len(expected)
    assert out.stats.cached_tokens == 18 and out.stats.computed_tokens == len(blocks[3]) + len(tail)


def test_invalid_arguments_are_rejected(model):
    blocks, tail = random_prompt(5)
    hits = with_kv(model, blocks)
    with pytest.raises(ValueError, match="mode"):
        assemble(model, hits, tail, mode="blend")
    with pytest.raises(ValueError, match="check_layer"):
        assemble(model, hits, tail, mode="cacheblend", check_layer=0)
    with pytest.raises(ValueError, match="tail"):
        assemble(model, hits, [], mode="reuse")
    with pytest.raises(ValueError, match="recompute_ratio"):
        assemble(model, hits, tail, mode="cacheblend", recompute_ratio=1.5)
    with pytest.raises(AssertionError):
        assemble(model, [(blocks[0] + [7], hits[0][1])], tail, mode="reuse")


def test_unverified_rope_refuses_reuse_but_full_still_runs():
    model = llama_with_rope({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    blocks, tail = random_prompt(6)
    hits = with_kv(model, blocks)
    with pytest.raises(UnsupportedRopeError):
        assemble(model, hits, tail, mode="cacheblend")
    assert assemble(model, hits, tail, mode="full").last_logits.shape[0] == 1
