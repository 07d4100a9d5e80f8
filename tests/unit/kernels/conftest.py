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
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
