"""Kernel tests run the Triton kernels on the GPU when there is one, else in Triton's interpreter
on CPU tensors. TRITON_INTERPRET must be set before a kernel is built; the kernels build lazily on
first call, so setting it here (collection time, before any test runs) is early enough."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(one_torch_thread):
    yield
