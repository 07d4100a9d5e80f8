"""Re-rotating RoPE keys by a position delta: moves a cached block's keys to a new offset.

RoPE rotates each (x[j], x[j + D/2]) pair of a key at position p by the angle p * inv_freq[j]
(the "rotate_half" layout used by Llama and Qwen2). Rotations compose, so a key already rotated
at position i becomes the key at position i + delta when rotated once more by delta * inv_freq.
Only the pure rotation is applied here: any attention scaling the model folds into cos/sin (YaRN's
mscale) is already inside the cached key and must not be applied twice.

`reference_rerotate` is the torch definition; `triton_rerotate` must match it (tests check both).
"""

from __future__ import annotations

import functools

import torch

try:  # optional: only the triton_* functions need it
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BACKENDS = ("torch", "triton")


def reference_rerotate(
    keys: torch.Tensor, delta_positions: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """keys [B, H, T, D] rotated by delta_positions [T] (int, may be negative); inv_freq [D/2]."""
    assert keys.dim() == 4, f"keys must be [B, H, T, D], got {tuple(keys.shape)}"
    _, _, seq_len, head_dim = keys.shape
    assert head_dim % 2 == 0 and inv_freq.shape == (head_dim // 2,), (head_dim, tuple(inv_freq.shape))
    assert delta_positions.shape == (seq_len,), (tuple(delta_positions.shape), seq_len)
    # fp32 angles whatever the key dtype: fp16 angles lose whole radians at positions in the thousands.
    angles_rad = delta_positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [T, D/2]
    cos = torch.cos(angles_rad)  # [T, D/2]
    sin = torch.sin(angles_rad)
    x = keys.to(torch.float32)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]  # [B, H, T, D/2] each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [B, H, T, D]
    return out.to(keys.dtype)


def _rerotate_kernel(keys_ptr, out_ptr, delta_ptr, inv_freq_ptr, seq_len, half_dim, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)  # one (batch, head, token) row of D values per program
    token = row % seq_len
    offs = tl.arange(0, BLOCK_HALF)
    in_range = offs < half_dim
    base = row * (2 * half_dim)
    x1 = tl.load(keys_ptr + base + offs, mask=in_range, other=0.0).to(tl.float32)
    x2 = tl.load(keys_ptr + base + half_dim + offs, mask=in_range, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + token).to(tl.float32)
    freq = tl.load(inv_freq_ptr + offs, mask=in_range, other=0.0)
    angle = delta * freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    tl.store(out_ptr + base + offs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=in_range)
    tl.store(
        out_ptr + base + half_dim + offs, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=in_range
    )


@functools.cache
def _kernel():
    """JIT-wraps the kernel on first use: Triton decides at wrap time whether to interpret
    (TRITON_INTERPRET=1), and importing this module must not fix that choice."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the torch backend")
    return triton.jit(_rerotate_kernel)


def triton_rerotate(
    keys: torch.Tensor, delta_positions: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Same contract as `reference_rerotate`; one program per (batch, head, token) row."""
    assert keys.dim() == 4, f"keys must be [B, H, T, D], got {tuple(keys.shape)}"
    batch, heads, seq_len, head_dim = keys.shape
    assert head_dim % 2 == 0 and inv_freq.shape == (head_dim // 2,), (head_dim, tuple(inv_freq.shape))
    assert delta_positions.shape == (seq_len,), (tuple(delta_positions.shape), seq_len)
    keys_c = keys.contiguous()
    out = torch.empty_like(keys_c)
    if keys_c.numel() == 0:
        return out
    delta = delta_positions.to(device=keys.device, dtype=torch.int64).contiguous()
    freq = inv_freq.to(device=keys.device, dtype=torch.float32).contiguous()
    half = head_dim // 2
    _kernel()[(batch * heads * seq_len,)](
        keys_c, out, delta, freq, seq_len, half, BLOCK_HALF=triton.next_power_of_2(half)
    )
    return out


def rerotate(
    keys: torch.Tensor, delta_positions: torch.Tensor, inv_freq: torch.Tensor, *, backend: str = "torch"
) -> torch.Tensor:
    assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
    fn = reference_rerotate if backend == "torch" else triton_rerotate
    return fn(keys, delta_positions, inv_freq)
