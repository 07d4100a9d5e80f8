"""Tiny models for the block-reuse tests, including Llama variants with scaled RoPE."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from common.modeling.tiny import build_tiny_model

SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    # original_max_position_embeddings small enough that head_dim 16 has low, medium and high bands
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    },
    # attention factor != 1: checks that re-rotation does not apply it twice
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    },
}


def llama_with_rope(rope_parameters: dict, *, layers: int = 2, seed: int = 0):
    base, _ = build_tiny_model("llama", seed=seed, layers=layers)
    config = copy.deepcopy(base.config)
    config.rope_parameters = dict(rope_parameters)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def build(name: str, *, layers: int = 2):
    """name: "llama", "qwen2", or "llama-<scaled rope type>"."""
    if name.startswith("llama-"):
        return llama_with_rope(SCALED_ROPE[name.removeprefix("llama-")], layers=layers)
    model, _ = build_tiny_model(name, layers=layers)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(one_torch_thread):
    yield
