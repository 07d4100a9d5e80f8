"""Re-rotation: a block computed at position 0 and moved to offset p has exactly the keys the model
computes for the same tokens at positions p.., for each verified RoPE type; others are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from common.blocks.rope import UnsupportedRopeError, check_rope_supported, rerotate_keys, rope_spec
from tests.unit.blocks.conftest import build

MODELS = ("llama", "qwen2", "llama-linear", "llama-llama3", "llama-yarn")


def layer_kv(model, ids: torch.Tensor, first_position: int) -> DynamicCache:
    positions = torch.arange(first_position, first_position + ids.shape[1])[None]
    with torch.no_grad():
        return model(ids, position_ids=positions, use_cache=True).past_key_values


@pytest.mark.parametrize("name", MODELS)
def test_rerotated_keys_match_keys_computed_at_offset(name):
    model = build(name)
    spec = rope_spec(model)
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    at_zero = layer_kv(model, ids, 0)
    worst = 0.0
    for offset in (1, 29, 300):
        at_offset = layer_kv(model, ids, offset)
        # Layer 0: k_proj's input does not depend on position, so only RoPE differs.
        # Deeper layers: a standalone block's attention is shift-invariant under RoPE, so they match too.
        for layer in range(model.config.num_hidden_layers):
            moved = rerotate_keys(at_zero.layers[layer].keys, offset, spec)  # [1, Hkv, T, D]
            worst = max(worst, (moved - at_offset.layers[layer].keys).abs().max().item())
            torch.testing.assert_close(
                at_zero.layers[layer].values, at_offset.layers[layer].values, atol=1e-5, rtol=0
            )
    assert worst < 1e-5, worst


def test_rotation_by_zero_is_identity_and_rotations_compose():
    model = build("llama")
    spec = rope_spec(model)
    keys = torch.randn(1, 2, 5, spec.head_dim)
    assert rerotate_keys(keys, 0, spec) is keys
    there_and_back = rerotate_keys(rerotate_keys(keys, 57, spec), -57, spec)
    torch.testing.assert_close(there_and_back, keys, atol=1e-5, rtol=0)
    per_token = rerotate_keys(keys, torch.tensor([0, 1, 2, 3, 4]), spec)
    torch.testing.assert_close(per_token[:, :, 3], rerotate_keys(keys, 3, spec)[:, :, 3], atol=1e-6, rtol=0)


def config(**overrides):
    base = dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize(
    "bad, match",
    [
        (config(model_type="gemma"), "model_type"),
        (config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "dynamic"),
        (config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope"),
        (
            config(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "partial",
        ),
        (config(rope_parameters={"full_attention": {"rope_type": "default"}}), "per-layer"),
        (config(model_type="qwen2", sliding_window=4096, use_sliding_window=True), "sliding"),
    ],
)
def test_unverified_rope_settings_are_refused(bad, match):
    with pytest.raises(UnsupportedRopeError, match=match):
        check_rope_supported(bad)
    check_rope_supported(config())  # the baseline passes
