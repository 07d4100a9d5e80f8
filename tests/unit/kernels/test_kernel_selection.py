"""The kernel-backend and dtype settings: what `auto` picks where, what is refused, and the
assembly run end to end on the Triton kernels (Triton's interpreter on CPU tensors when no GPU)
giving what the torch references give, in every reuse mode."""

from __future__ import annotations

import doctest

import pytest
import torch

from common.blocks.assembly import assemble, compute_block_kv
from common.modeling import dtypes
from common.modeling.dtypes import serving_dtype
from common.modeling.tiny import build_tiny_model
from kernels import backend as backend_module
from kernels.backend import KernelBackendError, resolve_backend


def test_dtype_doctests() -> None:
    assert doctest.testmod(dtypes).failed == 0


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cuda", torch.bfloat16), ("auto", "cuda:1", torch.bfloat16), ("auto", "cpu", torch.float32),
    ("float32", "cuda", torch.float32), ("bfloat16", "cpu", torch.bfloat16), ("float16", "cuda", torch.float16),
])
def test_serving_dtype(setting, device, expected) -> None:
    assert serving_dtype(setting, device) == expected


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda(monkeypatch) -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(backend_module, "triton_installed", lambda: True)
    assert resolve_backend("auto", "cuda:0") == "triton"
    monkeypatch.setattr(backend_module, "triton_installed", lambda: False)
    assert resolve_backend("auto", "cuda:0") == "torch"


def test_triton_where_it_cannot_run_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend_module, "triton_installed", lambda: True)
    with pytest.raises(KernelBackendError, match="needs a CUDA device"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setattr(backend_module, "triton_installed", lambda: False)
    with pytest.raises(KernelBackendError, match="not installed"):
        resolve_backend("triton", "cuda")
    with pytest.raises(KernelBackendError, match="not one of"):
        resolve_backend("cuda", "cuda")


def test_decoder_settings_carry_dtype_and_backend() -> None:
    from services.decoder.settings import DecoderSettings

    settings = DecoderSettings(device="cuda", dtype="auto", kernel_backend="auto")
    assert serving_dtype(settings.dtype, settings.device) == torch.bfloat16
    with pytest.raises(ValueError):
        DecoderSettings(dtype="fp8")


@pytest.mark.parametrize("mode", ["reuse", "cacheblend", "epic"])
def test_assembly_on_triton_kernels_matches_the_torch_references(device, mode) -> None:
    pytest.importorskip("triton")
    model, _ = build_tiny_model("llama", layers=2)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (6, 9, 7)]
    tail = torch.randint(3, 250, (4,), generator=g).tolist()
    cached = [(ids, compute_block_kv(model, ids) if i != 1 else None) for i, ids in enumerate(blocks)]
    kwargs = dict(mode=mode, recompute_ratio=0.3, check_layer=1, epic_tokens=2)
    reference = assemble(model, cached, tail, backend="torch", **kwargs)
    kernels = assemble(model, cached, tail, backend="triton", **kwargs)
    assert torch.equal(kernels.recomputed_positions, reference.recomputed_positions)
    torch.testing.assert_close(kernels.last_logits, reference.last_logits, atol=1e-4, rtol=0)
    for layer in range(2):
        torch.testing.assert_close(kernels.cache.layers[layer].keys, reference.cache.layers[layer].keys,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(kernels.cache.layers[layer].values, reference.cache.layers[layer].values,
                                   atol=1e-5, rtol=0)
