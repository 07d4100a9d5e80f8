"""Gather and scatter of selected token rows along the sequence axis of [B, H, T, D] tensors.

Selective recomputation reads the rows of the tokens it recomputes (hidden states, reshaped to
[B, 1, T, hidden]) and writes their fresh K/V over the reused ones in the assembled cache.
Scatter works in place (trailing underscore, as in torch) because the cache buffers are large
and written once per layer.

`reference_*` are the torch definitions; `triton_*` must match them.
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


def _check(x: torch.Tensor, index: torch.Tensor) -> None:
    assert x.dim() == 4, f"expected [B, H, T, D], got {tuple(x.shape)}"
    assert index.dim() == 1 and not index.dtype.is_floating_point, (tuple(index.shape), index.dtype)


def reference_gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], index [R] -> [B, H, R, D] (rows x[:, :, index[r]])."""
    _check(x, index)
    return x.index_select(2, index.to(device=x.device, dtype=torch.int64))


def reference_scatter_tokens_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[:, :, index[r]] = src[:, :, r] in place; dst [B, H, T, D], src [B, H, R, D]. Returns dst."""
    _check(dst, index)
    assert src.shape == (*dst.shape[:2], index.shape[0], dst.shape[3]), (tuple(src.shape), tuple(dst.shape))
    return dst.index_copy_(2, index.to(device=dst.device, dtype=torch.int64), src.to(dst.dtype))


def _copy_rows_kernel(
    src_ptr,
    dst_ptr,
    index_ptr,
    n_index,
    src_rows,
    dst_rows,
    head_dim,
    GATHER: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # one (batch*head plane, selected token) row per program
    plane = pid // n_index
    r = pid % n_index
    token = tl.load(index_ptr + r)
    offs = tl.arange(0, BLOCK_D)
    in_range = offs < head_dim
    if GATHER:  # src row `token` -> dst row r
        src_off = (plane * src_rows + token) * head_dim
        dst_off = (plane * dst_rows + r) * head_dim
    else:  # src row r -> dst row `token`
        src_off = (plane * src_rows + r) * head_dim
        dst_off = (plane * dst_rows + token) * head_dim
    row = tl.load(src_ptr + src_off + offs, mask=in_range, other=0.0)
    tl.store(dst_ptr + dst_off + offs, row.to(dst_ptr.dtype.element_ty), mask=in_range)


@functools.cache
def _kernel():
    """JIT-wraps the kernel on first use: Triton decides at wrap time whether to interpret
    (TRITON_INTERPRET=1), and importing this module must not fix that choice."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the torch backend")
    return triton.jit(_copy_rows_kernel)


def triton_gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference_gather_tokens`."""
    _check(x, index)
    batch, heads, seq_len, head_dim = x.shape
    x_c = x.contiguous()
    idx = index.to(device=x.device, dtype=torch.int64).contiguous()
    out = torch.empty((batch, heads, idx.shape[0], head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _kernel()[(batch * heads * idx.shape[0],)](
        x_c,
        out,
        idx,
        idx.shape[0],
        seq_len,
        idx.shape[0],
        head_dim,
        GATHER=True,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


def triton_scatter_tokens_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference_scatter_tokens_`; dst must be contiguous (written in place)."""
    _check(dst, index)
    assert dst.is_contiguous(), "in-place scatter needs a contiguous destination"
    batch, heads, seq_len, head_dim = dst.shape
    idx = index.to(device=dst.device, dtype=torch.int64).contiguous()
    assert src.shape == (batch, heads, idx.shape[0], head_dim), (tuple(src.shape), tuple(dst.shape))
    if src.numel() == 0:
        return dst
    _kernel()[(batch * heads * idx.shape[0],)](
        src.contiguous(),
        dst,
        idx,
        idx.shape[0],
        idx.shape[0],
        seq_len,
        head_dim,
        GATHER=False,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return dst


def gather_tokens(x: torch.Tensor, index: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
    return (reference_gather_tokens if backend == "torch" else triton_gather_tokens)(x, index)


def scatter_tokens_(
    dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, backend: str = "torch"
) -> torch.Tensor:
    assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
    return (reference_scatter_tokens_ if backend == "torch" else triton_scatter_tokens_)(dst, index, src)
