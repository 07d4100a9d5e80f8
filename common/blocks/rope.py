"""RoPE settings of a model, and moving cached keys to a new position by re-rotation.

A block's keys are stored as the model computed them standalone at positions [0, n): already
rotated. rotate(k, p + i) = rotate(rotate(k, i), p) because RoPE is a rotation per frequency
pair, so placing the block at offset p only needs one more rotation by p (CacheBlend's approach).
Values carry no position and are reused as they are.

The frequencies come from the model's own rotary-embedding module (built by transformers from
`config.rope_parameters`, i.e. its ROPE_INIT_FUNCTIONS for the scaled types), so every scaling
rule transformers implements is honoured without re-deriving it here. Composition only holds when
the frequencies do not depend on the sequence length and the layout is rotate_half, so only
what the tests verify is accepted (see VERIFIED_*); anything else raises UnsupportedRopeError
instead of silently producing wrong keys (LMCache #4666, KVLink #1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.rope_rerotate import rerotate

# rotate_half layout, q/k rotated before the cache update, no per-layer rope: checked by the tests.
VERIFIED_MODEL_TYPES = frozenset({"llama", "qwen2"})
# Fixed frequencies (no dependence on sequence length): "dynamic" and "longrope" change
# inv_freq with the prompt length, so a block cached at one length cannot be moved exactly.
# YaRN's attention factor multiplies cos/sin; it sits inside the cached key and is not reapplied.
VERIFIED_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


class UnsupportedRopeError(ValueError):
    """The model's rotary settings are not verified for re-rotation; use full prefill."""


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str
    head_dim: int
    inv_freq: torch.Tensor  # [head_dim / 2] float32, radians per position
    attention_scaling: float  # folded into cos/sin by the model; informational here


def check_rope_supported(config) -> None:
    """Raises UnsupportedRopeError (with the reason) unless re-rotation is verified for config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        raise UnsupportedRopeError(
            f"model_type {model_type!r} is not verified for KV re-rotation "
            f"(verified: {sorted(VERIFIED_MODEL_TYPES)})"
        )
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_type" not in params:
        raise UnsupportedRopeError(f"config has no single rope_parameters dict (per-layer rope?): {params!r}")
    rope_type = params["rope_type"]
    if rope_type not in VERIFIED_ROPE_TYPES:
        raise UnsupportedRopeError(
            f"rope_type {rope_type!r} is not verified for KV re-rotation "
            f"(verified: {sorted(VERIFIED_ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise UnsupportedRopeError(f"partial rotary embedding ({partial}) is not verified")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise UnsupportedRopeError(
            "sliding-window attention: reused blocks would see tokens outside the window"
        )


def rope_spec(model) -> RopeSpec:
    """The rotary settings `model` actually uses (its rotary_emb buffers), after checking support."""
    config = model.config
    check_rope_supported(config)
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float32)  # [D/2]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert inv_freq.shape == (head_dim // 2,), (tuple(inv_freq.shape), head_dim)
    return RopeSpec(
        rope_type=config.rope_parameters["rope_type"],
        head_dim=head_dim,
        inv_freq=inv_freq,
        attention_scaling=float(rotary.attention_scaling),
    )


def rotation_cos_sin(spec: RopeSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure rotation (no attention scaling) for positions [T]: cos, sin [T, D] in rotate_half layout."""
    assert positions.dim() == 1, tuple(positions.shape)
    angles_rad = (
        positions.to(torch.float32)[:, None] * spec.inv_freq.to(positions.device)[None, :]
    )  # [T, D/2]
    emb = torch.cat((angles_rad, angles_rad), dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def rerotate_keys(
    keys: torch.Tensor, delta_positions: int | torch.Tensor, spec: RopeSpec, *, backend: str = "torch"
) -> torch.Tensor:
    """Keys [B, H, T, D] rotated at positions i -> the same keys at positions i + delta.

    delta_positions: one int for the whole block, or [T] per token (may be negative).
    """
    assert keys.dim() == 4 and keys.shape[-1] == spec.head_dim, (tuple(keys.shape), spec.head_dim)
    seq_len = keys.shape[2]
    if isinstance(delta_positions, int):
        if delta_positions == 0:
            return keys  # the identity; also keeps prefix reuse bit-exact
        delta = torch.full((seq_len,), delta_positions, dtype=torch.int64, device=keys.device)
    else:
        delta = delta_positions.to(device=keys.device, dtype=torch.int64)
    return rerotate(keys, delta, spec.inv_freq.to(keys.device), backend=backend)
