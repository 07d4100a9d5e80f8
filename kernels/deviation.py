"""KV deviation per token (CacheBlend's HKVD score) and the pick of the most deviating tokens.

The score of a token is the squared L2 distance, over all KV heads and head dims of one layer,
between its freshly computed K or V and the reused (cached, re-rotated) one. CacheBlend ranks
tokens by this on an early layer and recomputes the top share through the rest of the model.

`reference_token_deviation` is the torch definition; `triton_token_deviation` must match it.
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


def reference_token_deviation(fresh: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """fresh, reused [B, H, T, D] -> [B, T] float32 sum of squared differences over H and D."""
    assert fresh.dim() == 4 and fresh.shape == reused.shape, (tuple(fresh.shape), tuple(reused.shape))
    diff = fresh.to(torch.float32) - reused.to(torch.float32)  # [B, H, T, D]
    return diff.square().sum(dim=(1, 3))  # [B, T]


def _add(a, b):
    return a + b


# Only builtins (tl.full, tl.reduce) inside the kernel, not tl.zeros / tl.sum: those are jit
# functions, fixed as compiled or interpreted when triton is first imported, which in a test run
# happens (via transformers) before TRITON_INTERPRET is set. Our own combine function is called
# through `.fn` by the interpreter and inlined by the compiler, so it works either way.
_add_combine = triton.jit(_add) if triton is not None else None


def _deviation_kernel(fresh_ptr, reused_ptr, out_ptr, heads, seq_len, head_dim, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, token) per program; loops over heads
    batch = pid // seq_len
    token = pid % seq_len
    offs = tl.arange(0, BLOCK_D)
    in_range = offs < head_dim
    acc = tl.full([BLOCK_D], 0.0, tl.float32)  # not tl.zeros: a jit function, see _add_combine
    for head in range(heads):
        base = ((batch * heads + head) * seq_len + token) * head_dim
        a = tl.load(fresh_ptr + base + offs, mask=in_range, other=0.0).to(tl.float32)
        b = tl.load(reused_ptr + base + offs, mask=in_range, other=0.0).to(tl.float32)
        acc += (a - b) * (a - b)
    tl.store(out_ptr + pid, tl.reduce(acc, 0, _add_combine))


@functools.cache
def _kernel():
    """JIT-wraps the kernel on first use: Triton decides at wrap time whether to interpret
    (TRITON_INTERPRET=1), and importing this module must not fix that choice."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the torch backend")
    return triton.jit(_deviation_kernel)


def triton_token_deviation(fresh: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference_token_deviation`."""
    assert fresh.dim() == 4 and fresh.shape == reused.shape, (tuple(fresh.shape), tuple(reused.shape))
    batch, heads, seq_len, head_dim = fresh.shape
    out = torch.empty((batch, seq_len), dtype=torch.float32, device=fresh.device)
    if out.numel() == 0:
        return out
    _kernel()[(batch * seq_len,)](
        fresh.contiguous(),
        reused.contiguous(),
        out,
        heads,
        seq_len,
        head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


def token_deviation(fresh: torch.Tensor, reused: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
    fn = reference_token_deviation if backend == "torch" else triton_token_deviation
    return fn(fresh, reused)


def select_top_tokens(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the `count` highest-scoring candidate tokens.

    scores [T] float, candidates [T] bool. Ties go to the earlier token (stable sort), so the
    pick is deterministic. Top-k over one row is cheap and not worth a custom kernel.
    """
    assert scores.dim() == 1 and candidates.shape == scores.shape, (
        tuple(scores.shape),
        tuple(candidates.shape),
    )
    n_candidates = int(candidates.sum())
    assert 0 <= count <= n_candidates, (count, n_candidates)
    masked = torch.where(
        candidates, scores.to(torch.float32), torch.full_like(scores, -torch.inf, dtype=torch.float32)
    )
    order = torch.sort(masked, descending=True, stable=True).indices  # [T]
    return torch.sort(order[:count]).values  # [count]
