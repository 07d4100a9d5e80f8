"""Which implementation of the block-reuse tensor steps runs: the Triton kernels or their torch
references, for a `kernel_backend` setting on a device.

`auto` picks Triton on a CUDA device when triton imports, else torch (the references are what the
kernels are tested against, and the only choice on a CPU). `triton` asked for explicitly must be
runnable: on a CUDA device, or anywhere under TRITON_INTERPRET=1 (Triton's interpreter, used by
the tests on CPU tensors); otherwise it is a settings error at start-up, not a crash on the first
request.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKEND_CHOICES = ("auto", "torch", "triton")


class KernelBackendError(ValueError):
    """A kernel backend that cannot run here (named with the reason)."""


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def resolve_backend(setting: str, device: str) -> str:
    """"torch" or "triton" for `setting` on `device`; raises KernelBackendError when "triton" is
    asked for where it cannot run."""
    if setting not in BACKEND_CHOICES:
        raise KernelBackendError(f"kernel_backend: {setting!r} is not one of {', '.join(BACKEND_CHOICES)}")
    on_cuda = torch.device(device).type == "cuda"
    if setting == "auto":
        return "triton" if on_cuda and triton_installed() else "torch"
    if setting == "triton":
        if not triton_installed():
            raise KernelBackendError("kernel_backend: triton is not installed (pip install triton), "
                                     "use torch or auto")
        if not on_cuda and not triton_interpreted():
            raise KernelBackendError(f"kernel_backend: triton needs a CUDA device, got {device!r} "
                                     "(TRITON_INTERPRET=1 runs it on the CPU for tests)")
    return setting
