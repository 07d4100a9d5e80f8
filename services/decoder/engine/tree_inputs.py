"""Model inputs for one forward pass over a batch of flat trees.

Each row is one request's FlatTree (root + draft; or a plain chain for prefill), right-padded
to the batch's widest tree Q with filler nodes. The cache already holds S columns per row, of
which `key_valid` [B, S] says which hold real tokens (rows have different histories, so their
padding and the filler columns of earlier steps are holes in the cache).

transformers 5.x uses a 4-D mask as given; the form that is right under both `sdpa` and
`eager` attention is an additive float mask of the model's dtype: 0 where a query may attend,
finfo(dtype).min elsewhere, shape [B, 1, Q, S + Q]. Position ids must be passed explicitly
(context length + depth in the tree): the model would otherwise number the tree tokens
S, S+1, ... and the logits would be silently wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.drafting.draft_tree import FlatTree, ancestor_mask


@dataclass(slots=True)
class TreeInputs:
    input_ids: torch.Tensor  # [B, Q] long
    position_ids: torch.Tensor  # [B, Q] long
    attention_mask: torch.Tensor  # [B, 1, Q, S + Q] additive float
    real_nodes: torch.Tensor  # [B, Q] bool: False for filler nodes


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0.0 where `allowed`, finfo(dtype).min elsewhere (a boolean mask is silently wrong under eager)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def build_tree_inputs(
    trees: Sequence[FlatTree],
    context_lengths: Sequence[int],
    key_valid: torch.Tensor,
    *,
    dtype: torch.dtype,
    pad_token_id: int = 0,
) -> TreeInputs:
    """Inputs for the rows `trees`; `context_lengths[b]`: real tokens in row b's cache, the
    position of its root; `key_valid` [B, S] bool on the model's device."""
    batch = len(trees)
    assert batch == len(context_lengths) == key_valid.shape[0] and key_valid.dtype == torch.bool
    width = max(len(tree) for tree in trees)
    tokens = np.full((batch, width), pad_token_id, dtype=np.int64)
    positions = np.zeros((batch, width), dtype=np.int64)
    real = np.zeros((batch, width), dtype=bool)
    # Filler nodes attend to themselves only: a fully masked softmax row would be NaN.
    tree_allowed = np.broadcast_to(np.eye(width, dtype=bool), (batch, width, width)).copy()
    for row, (tree, context_length) in enumerate(zip(trees, context_lengths)):
        size = len(tree)
        tokens[row, :size] = tree.tokens
        positions[row, :size] = context_length + np.asarray(tree.depths)
        positions[row, size:] = context_length
        real[row, :size] = True
        tree_allowed[row, :size, :size] = ancestor_mask(tree)
    device = key_valid.device
    real_nodes = torch.from_numpy(real).to(device)
    cache_allowed = key_valid[:, None, :] & real_nodes[:, :, None]  # [B, Q, S]
    allowed = torch.cat([cache_allowed, torch.from_numpy(tree_allowed).to(device)], dim=-1)  # [B, Q, S + Q]
    attention_mask = additive_mask(allowed[:, None], dtype)  # [B, 1, Q, S + Q]
    assert attention_mask.shape == (batch, 1, width, key_valid.shape[1] + width)
    return TreeInputs(
        input_ids=torch.from_numpy(tokens).to(device),
        position_ids=torch.from_numpy(positions).to(device),
        attention_mask=attention_mask,
        real_nodes=real_nodes,
    )
