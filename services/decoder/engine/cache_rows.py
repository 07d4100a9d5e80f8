"""Appending a request's rows to a running batch's DynamicCache (continuous batching).

The batch holds [B, kv_heads, S, head_dim] per layer and `key_valid` [B, S]; a newly prefilled
request holds [1, kv_heads, S1, head_dim] and its own key_valid [1, S1]. Rows are joined along
the batch dimension after padding both to max(S, S1) columns with zero, *invalid* columns at the
end: the engine masks every column whose key_valid is False, and position ids are explicit, so
where a row's holes sit does not change its logits. Padding is a whole-cache copy (once per
join); the holes it leaves are squeezed out by the engine's usual compaction.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    filler = tensor.new_zeros((tensor.shape[0], tensor.shape[1], missing, tensor.shape[3]))
    return torch.cat([tensor, filler], dim=2)


def append_rows(cache: DynamicCache, key_valid: torch.Tensor, new_cache: DynamicCache,
                new_valid: torch.Tensor) -> torch.Tensor:
    """Appends new_cache's rows to `cache` in place; returns the joined key_valid [B + B1, W]."""
    rows, length = key_valid.shape
    new_rows, new_length = new_valid.shape
    if len(cache.layers) != len(new_cache.layers):
        raise ValueError(f"caches of {len(cache.layers)} and {len(new_cache.layers)} layers cannot be joined")
    width = max(length, new_length)
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        assert layer.get_seq_length() == length and new_layer.get_seq_length() == new_length
        if width == 0:
            continue  # nothing cached on either side yet: the next forward initializes the layer
        reference = layer if length else new_layer
        for name in ("keys", "values"):
            like = getattr(reference, name)  # [b, kv_heads, s, head_dim]
            old = getattr(layer, name) if length else like.new_zeros((rows, like.shape[1], 0, like.shape[3]))
            new = getattr(new_layer, name) if new_length else like.new_zeros((new_rows, like.shape[1], 0, like.shape[3]))
            joined = torch.cat([_pad_columns(old, width), _pad_columns(new, width)], dim=0)
            if not layer.is_initialized:
                layer.lazy_initialization(joined, joined)
            setattr(layer, name, joined)
    padding = key_valid.new_zeros((rows, width - length)), new_valid.new_zeros((new_rows, width - new_length))
    return torch.cat([torch.cat([key_valid, padding[0]], dim=1), torch.cat([new_valid, padding[1]], dim=1)], dim=0)
