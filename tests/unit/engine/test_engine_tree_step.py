"""Tree inputs (mask, positions) and KV commit: unit checks, then against tiny models.

The model checks prove the two facts the engine rests on: one forward over [root + tree] with
the additive mask gives every node the logits of a plain causal run over its own branch
(under sdpa and eager attention), and keeping the accepted path's KV (crop or in-place
gather) leaves a cache that continues exactly like a freshly computed one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from common.drafting.draft_tree import DraftTree, chain_tree, flatten
from common.modeling.tiny import build_tiny_model
from services.decoder.engine.kv_cache import compact, keep_accepted
from services.decoder.engine.tree_inputs import additive_mask, build_tree_inputs

MIN32 = torch.finfo(torch.float32).min


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample_tree() -> DraftTree:
    # root -> 11 -> 12 -> 13 ; root -> 11 -> 14 ; root -> 15 -> 16
    return DraftTree(tokens=[11, 12, 13, 14, 15, 16], parents=[-1, 0, 1, 0, -1, 4], scores=[1.0] * 6)


# ---------------------------------------------------------------- inputs, no model
def test_mask_positions_and_filler_rows() -> None:
    wide = flatten(10, sample_tree())  # 7 nodes
    narrow = flatten(20, DraftTree(tokens=[21], parents=[-1], scores=[1.0]))  # 2 nodes
    key_valid = torch.tensor([[True, True, True], [False, True, True]])  # row 1: a hole at column 0
    inputs = build_tree_inputs([wide, narrow], [3, 2], key_valid, dtype=torch.float32, pad_token_id=0)
    assert inputs.input_ids.tolist() == [[10, 11, 12, 13, 14, 15, 16], [20, 21, 0, 0, 0, 0, 0]]
    assert inputs.position_ids.tolist() == [[3, 4, 5, 6, 5, 4, 5], [2, 3, 2, 2, 2, 2, 2]]
    mask = inputs.attention_mask
    assert mask.shape == (2, 1, 7, 3 + 7) and mask.dtype == torch.float32
    allowed = (mask == 0)[:, 0]
    # row 0, node 13 (index 3): all cache columns, root, 11, 12, itself
    assert allowed[0, 3].tolist() == [True] * 3 + [True, True, True, True, False, False, False]
    # row 0, node 16 (index 6): root, 15, itself - not the other branch
    assert allowed[0, 6].tolist() == [True] * 3 + [True, False, False, False, False, True, True]
    # row 1: the hole is masked for real nodes; filler nodes see only themselves
    assert allowed[1, 1].tolist() == [False, True, True, True, True, False, False, False, False, False]
    assert allowed[1, 4].tolist() == [False] * 3 + [False] * 4 + [True, False, False]
    assert set(mask.unique().tolist()) == {0.0, MIN32}
    assert inputs.real_nodes.tolist() == [[True] * 7, [True, True] + [False] * 5]


def test_additive_mask_uses_the_dtype_minimum() -> None:
    allowed = torch.tensor([[True, False]])
    assert additive_mask(allowed, torch.bfloat16).tolist() == [[0.0, torch.finfo(torch.bfloat16).min]]


def filled_cache(batch: int, length: int, layers: int = 2) -> DynamicCache:
    """Cache whose key/value at column c equals c (value = -c), to trace what moved where."""
    cache = DynamicCache()
    column = torch.arange(length, dtype=torch.float32)[None, None, :, None].expand(batch, 2, length, 3)
    for layer in range(layers):
        cache.update(column.clone(), -column.clone(), layer)
    return cache


def test_keep_accepted_crops_a_contiguous_path_without_copying() -> None:
    cache = filled_cache(1, 10)  # 6 old columns + a 4-node tree
    storage = cache.layers[0].keys.data_ptr()
    assert keep_accepted(cache, 6, [[0, 1, 2]]) == [3]
    assert cache.get_seq_length() == 9
    assert cache.layers[0].keys.data_ptr() == storage
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == list(range(9))


def test_keep_accepted_gathers_a_branch_per_row() -> None:
    cache = filled_cache(2, 10)
    kept = keep_accepted(cache, 5, [[0, 2, 4], [0, 3]])
    assert kept == [3, 2] and cache.get_seq_length() == 8
    for layer in cache.layers:
        assert layer.keys[0, 1, :, 2].tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
        assert layer.keys[1, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 8, 8]  # last column: filler
        assert layer.values[0, 0, :, 0].tolist() == [-c for c in [0, 1, 2, 3, 4, 5, 7, 9]]


def test_compact_left_pads_rows_to_their_real_columns() -> None:
    cache = filled_cache(2, 5)
    key_valid = torch.tensor([[True, False, True, False, True], [False, True, False, False, True]])
    new_valid = compact(cache, key_valid)
    assert new_valid.tolist() == [[True, True, True], [False, True, True]]
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 2, 4]
    assert cache.layers[0].keys[1, 0, 1:, 0].tolist() == [1, 4]


# ---------------------------------------------------------------- against tiny models
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    model, _ = build_tiny_model(request.param, seed=0)
    return model


def causal_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]  # [T, V]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_tree_forward_gives_each_node_its_branch_logits(model, attention) -> None:
    model.set_attn_implementation(attention)
    try:
        context = [5, 9, 33, 7, 81, 12, 3]
        draft = sample_tree()
        tree = flatten(context[-1], draft)
        cache = DynamicCache(config=model.config)
        key_valid = torch.ones(1, 0, dtype=torch.bool)
        with torch.no_grad():
            prefill = build_tree_inputs([chain_tree(context[:-1])], [0], key_valid, dtype=model.dtype)
            model(**_model_args(prefill), past_key_values=cache, use_cache=True)
            step = build_tree_inputs(
                [tree], [len(context) - 1], torch.ones(1, 6, dtype=torch.bool), dtype=model.dtype
            )
            logits = model(**_model_args(step), past_key_values=cache, use_cache=True).logits[0]  # [Q, V]
        for node in range(len(tree)):
            branch = context + (draft.path_to(node - 1) if node else [])
            torch.testing.assert_close(logits[node], causal_logits(model, branch)[-1], atol=1e-5, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def _model_args(inputs):
    return dict(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    )


def test_cache_after_keeping_a_side_branch_continues_like_a_fresh_one(model) -> None:
    context = [40, 41, 42, 43, 44]
    draft = sample_tree()
    tree = flatten(context[-1], draft)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = build_tree_inputs(
            [chain_tree(context[:-1])], [0], torch.ones(1, 0, dtype=torch.bool), dtype=model.dtype
        )
        model(**_model_args(prefill), past_key_values=cache, use_cache=True)
        step = build_tree_inputs([tree], [4], torch.ones(1, 4, dtype=torch.bool), dtype=model.dtype)
        model(**_model_args(step), past_key_values=cache, use_cache=True)
        keep_accepted(cache, 4, [[0, 5, 6]])  # root, 15, 16: not the first branch -> gather
        accepted = context + [15, 16]
        follow = build_tree_inputs(
            [chain_tree([77])], [len(accepted)], torch.ones(1, 7, dtype=torch.bool), dtype=model.dtype
        )
        logits = model(**_model_args(follow), past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(logits, causal_logits(model, accepted + [77])[-1], atol=1e-5, rtol=1e-4)
    np.testing.assert_equal(cache.get_seq_length(), len(accepted) + 1)
