"""Keeping only the accepted path's KV in a transformers DynamicCache.

After a tree step each layer holds [B, kv_heads, S + Q, head_dim]: S old columns and one per
tree node. Row b keeps the nodes `paths[b]` (root first, ascending). The kept columns are
moved in place to S, S+1, ... and the tail is cut with `crop(-n)` (transformers 5.x takes a
negative count; crop slices, it does not copy). When every row's path is a prefix of its tree
(the best branch, laid out contiguously by the draft tree), only the crop happens.

Rows keep different numbers of columns; the batch keeps max(len(path)), and a shorter row's
extra columns are holes, marked False in `key_valid` [B, S] and masked out of attention.
`compact` squeezes holes out once they are a large share of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def check_cache(cache: DynamicCache) -> None:
    """Tree steps rewrite cache columns in place: only plain full-attention layers allow it."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"expected a transformers DynamicCache, got {type(cache).__name__}")
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise ValueError(
                f"cache layer {type(layer).__name__} is not supported (sliding/linear attention)"
            )


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def keep_accepted(cache: DynamicCache, old_length: int, paths: Sequence[Sequence[int]]) -> list[int]:
    """Keeps columns old_length + paths[b] of row b; returns how many of the kept columns are
    real per row (len(paths[b])); the batch keeps max of those."""
    new_length = cache_length(cache)
    tree_width = new_length - old_length
    keep = max(len(path) for path in paths)
    assert all(len(path) >= 1 and path[0] == 0 for path in paths), "paths start at the root"
    assert all(max(path) < tree_width for path in paths)
    if any(list(path) != list(range(len(path))) for path in paths):
        # Row b's filler columns repeat its last kept index: they are marked invalid anyway.
        index = torch.tensor(
            [list(path) + [path[-1]] * (keep - len(path)) for path in paths], dtype=torch.long
        )  # [B, keep]
        for layer in cache.layers:
            if not layer.is_initialized:
                continue
            index_on_device = index.to(layer.keys.device) + old_length
            for tensor in (layer.keys, layer.values):  # [B, H, S + Q, D]
                batch, heads, _, head_dim = tensor.shape
                gather_index = index_on_device[:, None, :, None].expand(batch, heads, keep, head_dim)
                # gather copies first, so overlapping source and destination columns are safe
                tensor[:, :, old_length : old_length + keep] = tensor.gather(2, gather_index)
    if tree_width > keep:
        cache.crop(-(tree_width - keep))
    assert cache_length(cache) == old_length + keep
    return [len(path) for path in paths]


def compact(cache: DynamicCache, key_valid: torch.Tensor) -> torch.Tensor:
    """Drops hole columns (left-padding rows that have fewer real columns); returns the new
    key_valid. Copies the whole cache, so callers do it rarely (see EngineSettings)."""
    batch, length = key_valid.shape  # [B, S]
    assert length == cache_length(cache)
    real_counts = key_valid.sum(dim=1)
    width = int(real_counts.max())
    # Stable sort puts each row's holes first and its real columns last, in their order.
    order = torch.sort(key_valid.to(torch.int8), dim=1, stable=True).indices[:, length - width :]  # [B, W]
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        for name in ("keys", "values"):
            tensor = getattr(layer, name)  # [B, H, S, D]
            index = order.to(tensor.device)[:, None, :, None].expand(
                batch, tensor.shape[1], width, tensor.shape[3]
            )
            setattr(layer, name, tensor.gather(2, index))
    return torch.gather(key_valid, 1, order)
