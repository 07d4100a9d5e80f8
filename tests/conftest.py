"""Shared fixtures: tiny random checkpoints on disk, an embedded broker, in-process servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.broker import EmbeddedBroker
from common.modeling.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and two spinning threads on two shared cores crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Fault and fuzz figures (fixture `reliability_report`, option --faults-json); see the module.
pytest_plugins = ["tests.reliability_report"]
