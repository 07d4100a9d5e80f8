"""Each Triton kernel against its torch reference (tiny sizes: the CPU interpreter is slow).
Skipped only when triton is not importable."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.deviation import (  # noqa: E402
    reference_token_deviation,
    select_top_tokens,
    triton_token_deviation,
)
from kernels.gather_scatter import (  # noqa: E402
    reference_gather_tokens,
    reference_scatter_tokens_,
    triton_gather_tokens,
    triton_scatter_tokens_,
)
from kernels.rope_rerotate import reference_rerotate, triton_rerotate  # noqa: E402


def randn(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def inv_freq(head_dim: int, device) -> torch.Tensor:
    return (1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)).to(device)


@pytest.mark.parametrize("head_dim", [16, 12])  # 12: half (6) is not a power of two, so lanes are masked
def test_rerotate_matches_reference(device, head_dim):
    keys = randn(2, 2, 5, head_dim, device=device)
    delta = torch.tensor([0, 3, -7, 250, 1], device=device)
    freq = inv_freq(head_dim, device)
    torch.testing.assert_close(
        triton_rerotate(keys, delta, freq), reference_rerotate(keys, delta, freq), atol=1e-5, rtol=0
    )


def test_rerotate_half_precision_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("fp16 path checked on the GPU only (interpreter runs fp32 tests)")
    keys = randn(1, 4, 64, 128, device=device, dtype=torch.float16)
    delta = torch.arange(64, device=device) * 37
    freq = inv_freq(128, device)
    torch.testing.assert_close(
        triton_rerotate(keys, delta, freq), reference_rerotate(keys, delta, freq), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("head_dim", [8, 6])
def test_token_deviation_matches_reference(device, head_dim):
    fresh = randn(2, 3, 7, head_dim, device=device, seed=1)
    reused = randn(2, 3, 7, head_dim, device=device, seed=2)
    torch.testing.assert_close(
        triton_token_deviation(fresh, reused), reference_token_deviation(fresh, reused), atol=1e-5, rtol=1e-5
    )


def test_select_top_tokens_respects_candidates_and_ties():
    scores = torch.tensor([9.0, 1.0, 5.0, 5.0, 7.0, 0.0])
    candidates = torch.tensor([False, True, True, True, True, True])
    assert select_top_tokens(scores, candidates, 2).tolist() == [
        2,
        4,
    ]  # 9.0 is not a candidate; 5/5 tie -> earlier
    assert select_top_tokens(scores, candidates, 0).tolist() == []


@pytest.mark.parametrize("head_dim", [8, 5])
def test_gather_and_scatter_match_reference(device, head_dim):
    x = randn(2, 3, 7, head_dim, device=device, seed=3)
    index = torch.tensor([6, 0, 3], device=device)
    torch.testing.assert_close(
        triton_gather_tokens(x, index), reference_gather_tokens(x, index), atol=0, rtol=0
    )
    src = randn(2, 3, 3, head_dim, device=device, seed=4)
    expected = reference_scatter_tokens_(x.clone(), index, src)
    got = x.clone()
    assert triton_scatter_tokens_(got, index, src) is got  # in place
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    empty = index[:0]
    assert triton_gather_tokens(x, empty).shape == (2, 3, 0, head_dim)
