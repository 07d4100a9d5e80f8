"""The serving dtype: what a `dtype` setting means on a device.

`auto` is bfloat16 on a CUDA device and float32 elsewhere. On a GPU bfloat16 halves the bytes of
the weights, of every KV cache and of every block sent to or from the kv-store, and runs the
matrix units at their full rate; its 8-bit mantissa is why it is not the CPU default (CPU matrix
kernels gain little from it, and the CPU figures are measured in float32). Explicit values are
taken as they are, on any device.

>>> serving_dtype("auto", "cuda:0"), serving_dtype("auto", "cpu")
(torch.bfloat16, torch.float32)
>>> serving_dtype("float16", "cpu")
torch.float16
>>> serving_dtype("fp8", "cuda")
Traceback (most recent call last):
...
ValueError: dtype: 'fp8' is not one of auto, float32, bfloat16, float16
"""

from __future__ import annotations

import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_EXPLICIT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(setting: str, device: str) -> torch.dtype:
    """The torch dtype a model is loaded and served in, for a `dtype` setting on `device`."""
    if setting == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if setting not in _EXPLICIT:
        raise ValueError(f"dtype: {setting!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return _EXPLICIT[setting]
