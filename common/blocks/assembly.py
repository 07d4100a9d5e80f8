"""Assembling a prompt's KV from independently cached blocks, with selective recomputation.

A prompt is [block 0 | block 1 | ... | tail]. Each block comes with its KV (a cache hit), computed
standalone at positions [0, n) or right after the prompt's first block, or without (a miss). The
tail (the question) is always computed.

Modes, all returning the KV of the whole prompt and the logits of its last position:
  full        plain prefill of all tokens; ignores the cached KV (the reference).
  reuse       cached blocks' keys re-rotated to their offsets, values as they are; only misses and
              the tail are computed (Prompt Cache style, no correction).
  cacheblend  as reuse, then CacheBlend's correction: layers 0..check_layer (>= 1) are computed for
              every token; on check_layer, each cached token's fresh V (or K) is compared with the reused
              one, and the top `recompute_ratio` share (high-KV-deviation tokens) is recomputed
              through the remaining layers together with misses and tail.
  epic        as reuse, plus EPIC's fixed pick: the first `epic_tokens` tokens of every cached block
              that does not start at position 0 are recomputed through all layers.

What is exact and what is approximated:
  * A cached block at position 0 is exactly prefix caching: its KV equals full prefill.
  * Misses are computed in context (they attend to every earlier token), so a prompt whose only
    cached block is the first one equals full prefill.
  * Every computed token attends to all earlier tokens of the prompt at every layer, using fresh
    KV where that token was computed in this layer and the reused KV otherwise. The approximation
    is only that non-recomputed cached tokens keep KV that never saw the blocks before them
    (cross-block attention missing), and that every computed token (tail, misses, picks) attends
    to such KV.
  * CacheBlend here selects once, on check_layer, and keeps that set for all later layers (LMCache's
    `blend_check_layers` behaviour); the paper's gradual filtering over several layers is not done.
    Layers 0..check_layer keep the fresh KV of every token, since it was computed anyway.
  * With recompute_ratio 1.0 every token is computed at every layer, so the result equals full
    prefill up to floating-point order.

The layer loop calls the model's own decoder layers with a 4-D additive float mask and explicit
position embeddings; a small cache stand-in scatters the computed tokens' K/V into the assembled
per-layer buffers and hands the whole buffers to attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from common.blocks.rope import RopeSpec, rerotate_keys, rope_spec
from kernels.deviation import select_top_tokens, token_deviation
from kernels.gather_scatter import gather_tokens, scatter_tokens_

MODES = ("full", "reuse", "cacheblend", "epic")
DEVIATION_TARGETS = ("value", "key")


@dataclass(frozen=True)
class BlockKV:
    """One block's KV computed at positions [base_position, base_position + n); keys are
    RoPE-rotated at those. base_position is 0 for a block computed standalone, and the context's
    length for one computed after a context (`compute_block_kv(..., context=...)`)."""

    keys: tuple[torch.Tensor, ...]  # per layer [1, kv_heads, n, head_dim]
    values: tuple[torch.Tensor, ...]  # per layer [1, kv_heads, n, head_dim]
    base_position: int = 0

    def __post_init__(self) -> None:
        assert len(self.keys) == len(self.values) > 0, (len(self.keys), len(self.values))
        for k, v in zip(self.keys, self.values, strict=True):
            assert k.dim() == 4 and k.shape == v.shape and k.shape[0] == 1, (tuple(k.shape), tuple(v.shape))

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]


@dataclass(frozen=True)
class AssemblyStats:
    mode: str
    prompt_tokens: int
    cached_tokens: int  # tokens of cache-hit blocks (recomputed ones included)
    computed_tokens: int  # tokens computed because nothing was cached for them: misses and tail
    recomputed_tokens: int  # cached tokens recomputed through all layers after check_layer
    token_layers: int  # sum over decoder layers of tokens run through it; full prefill = tokens * layers


@dataclass(frozen=True)
class Assembly:
    cache: DynamicCache  # KV of every prompt token, tail included; decode continues at prompt_tokens
    last_logits: torch.Tensor  # [1, vocab] float32, next-token logits after the last prompt token
    stats: AssemblyStats
    recomputed_positions: torch.Tensor  # [R] int64 prompt positions of the recomputed cached tokens


@dataclass(frozen=True)
class _Layout:
    token_ids: torch.Tensor  # [N] int64
    cached: torch.Tensor  # [N] bool: KV available from a block cache hit
    block_start: torch.Tensor  # [N] int64: prompt position where the token's block (or the tail) starts
    offset_in_block: torch.Tensor  # [N] int64
    computed_at: torch.Tensor  # [N] int64: where the token's cached block started when computed (0 if not cached)


def _num_layers(model) -> int:
    return model.config.num_hidden_layers


@torch.no_grad()
def compute_block_kv(model, token_ids: Sequence[int], context: BlockKV | None = None) -> BlockKV:
    """A block's KV: what the KV store keeps under its hash.

    Without a context the block is computed alone at positions [0, n). With one (a block that
    itself starts at position 0, typically the prompt's instruction block) the block is computed
    right after it, at positions [c, c + n), attending to it: its keys and values then saw the
    same start of prompt they will see when reused, so the block does not make its own first token
    an attention sink (a standalone block's first token draws the attention a real model gives
    position 0, which reused at a later offset pulls the answer off on pretrained models).
    """
    assert len(token_ids) > 0, "empty block"
    assert context is None or context.base_position == 0, "a context must start the prompt"
    device = model.device
    start = 0 if context is None else context.num_tokens
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64, device=device)[None]  # [1, n]
    positions = torch.arange(start, start + ids.shape[1], device=device)[None]  # [1, n]
    if context is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = DynamicCache(ddp_cache_data=list(zip(context.keys, context.values, strict=True)), config=model.config)
    model.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
    layers = cache.layers[: _num_layers(model)]
    return BlockKV(
        keys=tuple(layer.keys[:, :, start:].clone() for layer in layers),
        values=tuple(layer.values[:, :, start:].clone() for layer in layers),
        base_position=start,
    )


def _layout(
    blocks: Sequence[tuple[Sequence[int], BlockKV | None]], tail_ids: Sequence[int], device: torch.device
) -> _Layout:
    ids: list[int] = []
    cached: list[bool] = []
    starts: list[int] = []
    offsets: list[int] = []
    computed_at: list[int] = []
    for token_ids, kv in [*blocks, (tail_ids, None)]:
        assert len(token_ids) > 0, "empty block"
        assert kv is None or kv.num_tokens == len(token_ids), (kv.num_tokens, len(token_ids))
        start = len(ids)
        ids.extend(int(t) for t in token_ids)
        cached.extend([kv is not None] * len(token_ids))
        starts.extend([start] * len(token_ids))
        offsets.extend(range(len(token_ids)))
        computed_at.extend([kv.base_position if kv is not None else 0] * len(token_ids))

    def as_tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return _Layout(
        as_tensor(ids, torch.int64),
        as_tensor(cached, torch.bool),
        as_tensor(starts, torch.int64),
        as_tensor(offsets, torch.int64),
        as_tensor(computed_at, torch.int64),
    )


def _reused_kv(model, spec: RopeSpec, blocks, layout: _Layout, backend: str):
    """Per-layer buffers [1, kv_heads, N, head_dim]: cached blocks' KV moved to their offsets,
    zeros where nothing is cached (always overwritten by computed KV before attention reads it)."""
    n_tokens = layout.token_ids.shape[0]
    cached_kvs = [kv for _, kv in blocks if kv is not None]
    # Re-rotate from where the block was computed to where it starts now; a zero delta (a block at
    # the position it was computed at) leaves its keys bit-exact.
    delta = (layout.block_start - layout.computed_at).masked_fill(~layout.cached, 0)  # [N]
    keys, values = [], []
    for layer in range(_num_layers(model)):
        k_buf = _empty_kv(model, n_tokens, spec.head_dim)  # [1, Hkv, N, D]
        v_buf = torch.zeros_like(k_buf)
        if cached_kvs:
            cached_pos = layout.cached.nonzero().squeeze(1)  # [C] in prompt order, as blocks are
            k_cat = torch.cat([kv.keys[layer] for kv in cached_kvs], dim=2)  # [1, Hkv, C, D]
            v_cat = torch.cat([kv.values[layer] for kv in cached_kvs], dim=2)
            assert k_cat.shape == (*k_buf.shape[:2], cached_pos.shape[0], spec.head_dim), (
                tuple(k_cat.shape),
                tuple(k_buf.shape),
            )
            k_moved = rerotate_keys(k_cat.to(k_buf), delta[cached_pos], spec, backend=backend)
            scatter_tokens_(k_buf, cached_pos, k_moved, backend=backend)
            scatter_tokens_(v_buf, cached_pos, v_cat.to(v_buf), backend=backend)
        keys.append(k_buf)
        values.append(v_buf)
    return keys, values


def _empty_kv(model, n_tokens: int, head_dim: int) -> torch.Tensor:
    kv_heads = model.config.num_key_value_heads
    return torch.zeros((1, kv_heads, n_tokens, head_dim), dtype=model.dtype, device=model.device)


class _ScatterKV:
    """Stands in for a transformers Cache during one pass: a layer's update() writes the K/V of
    the tokens being computed into that layer's assembled buffer and returns the whole buffer, so
    those tokens attend to all prompt tokens. Only `update` is called by Llama/Qwen2 attention."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor,
                 backend: str):
        self.keys, self.values, self.positions, self.backend = keys, values, positions, backend

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        # key_states, value_states [1, Hkv, R, D], already rotated at `positions`
        scatter_tokens_(self.keys[layer_idx], self.positions, key_states, backend=self.backend)
        scatter_tokens_(self.values[layer_idx], self.positions, value_states, backend=self.backend)
        return self.keys[layer_idx], self.values[layer_idx]


def _additive_causal_mask(query_positions: torch.Tensor, n_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, R, N] float mask: 0 where key position <= query position, dtype min elsewhere
    (the only 4-D form right under both sdpa and eager in transformers 5.x)."""
    key_positions = torch.arange(n_tokens, device=query_positions.device)
    visible = key_positions[None, :] <= query_positions[:, None]  # [R, N]
    mask = torch.zeros(visible.shape, dtype=dtype, device=query_positions.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


def _run_layers(
    model,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    layers: range,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """hidden [1, R, hidden] of the tokens at `positions` [R] (ascending) through `layers`."""
    assert hidden.shape[1] == positions.shape[0], (tuple(hidden.shape), tuple(positions.shape))
    n_tokens = keys[0].shape[2]
    mask = _additive_causal_mask(positions, n_tokens, hidden.dtype)  # [1, 1, R, N]
    position_ids = positions[None]  # [1, R]
    position_embeddings = model.model.rotary_emb(hidden, position_ids=position_ids)
    cache = _ScatterKV(keys, values, positions, backend)
    for layer_idx in layers:
        out = model.model.layers[layer_idx](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _gather_hidden(hidden: torch.Tensor, positions: torch.Tensor, backend: str) -> torch.Tensor:
    # [1, N, hidden] -> [1, R, hidden], through the [B, H, T, D] kernel with H = 1
    return gather_tokens(hidden[:, None], positions, backend=backend)[:, 0]


def _full_prefill(model, layout: _Layout) -> Assembly:
    n_tokens = layout.token_ids.shape[0]
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=layout.token_ids[None],
        position_ids=torch.arange(n_tokens, device=model.device)[None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    stats = AssemblyStats(
        mode="full",
        prompt_tokens=n_tokens,
        cached_tokens=0,
        computed_tokens=n_tokens,
        recomputed_tokens=0,
        token_layers=n_tokens * _num_layers(model),
    )
    return Assembly(
        cache=out.past_key_values,
        last_logits=out.logits[:, -1].float(),
        stats=stats,
        recomputed_positions=torch.zeros(0, dtype=torch.int64, device=model.device),
    )


def _validate(model, blocks, tail_ids, mode, recompute_ratio, check_layer, epic_tokens, deviation_on) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= recompute_ratio <= 1.0:
        raise ValueError(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
    # Layer 0's K/V depend on the token alone (its keys only on the position, which re-rotation
    # fixes exactly), so deviation is zero there and cannot rank tokens: check on layer >= 1.
    if mode == "cacheblend" and not 1 <= check_layer < _num_layers(model):
        raise ValueError(f"check_layer must be in [1, {_num_layers(model)}), got {check_layer}")
    if epic_tokens < 0:
        raise ValueError(f"epic_tokens must be >= 0, got {epic_tokens}")
    if deviation_on not in DEVIATION_TARGETS:
        raise ValueError(f"deviation_on must be one of {DEVIATION_TARGETS}, got {deviation_on!r}")
    if len(tail_ids) == 0:
        raise ValueError("tail_ids must hold at least one token: the last position is always computed")
    attn = getattr(model.config, "_attn_implementation", None)
    if mode != "full" and attn not in ("sdpa", "eager"):
        # Flash-attention paths ignore a 4-D mask; the blended layer loop depends on it.
        raise ValueError(
            f"attention implementation {attn!r} is not supported for blending; use sdpa or eager"
        )
    for _, kv in blocks:
        if kv is not None and len(kv.keys) != _num_layers(model):
            raise ValueError(f"cached block has {len(kv.keys)} layers, model has {_num_layers(model)}")


def _cacheblend_pass(
    model, embeds, keys, values, candidates, recompute_ratio, check_layer, deviation_on, backend
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs layers 0..check_layer for all N tokens (their fresh KV replaces the reused one there),
    then picks the ceil(ratio * candidates) candidates whose K or V deviates most on check_layer.
    Returns the hidden states after check_layer [1, N, hidden] and the pick as a mask [N]."""
    n_tokens = embeds.shape[1]
    target = values if deviation_on == "value" else keys
    reused_check = target[check_layer].clone()  # [1, Hkv, N, D], before fresh KV overwrites it
    all_positions = torch.arange(n_tokens, device=embeds.device)  # [N]
    hidden = _run_layers(model, embeds, all_positions, range(check_layer + 1), keys, values, backend)
    scores = token_deviation(target[check_layer], reused_check, backend=backend)[0]  # [N]
    # The epsilon keeps float noise (0.15 * 60 = 9.000000000000002) from adding a token.
    n_pick = math.ceil(recompute_ratio * int(candidates.sum()) - 1e-9)
    picked = select_top_tokens(scores, candidates, n_pick)  # [n_pick]
    return hidden, torch.zeros_like(candidates).index_fill_(0, picked, True)


@torch.no_grad()
def assemble(
    model,
    blocks: Sequence[tuple[Sequence[int], BlockKV | None]],
    tail_ids: Sequence[int],
    *,
    mode: str = "cacheblend",
    recompute_ratio: float = 0.15,
    check_layer: int = 1,
    epic_tokens: int = 16,
    deviation_on: str = "value",
    backend: str = "torch",
) -> Assembly:
    """KV and last-position logits of the prompt blocks + tail; see the module doc for the modes.

    blocks: (token_ids, BlockKV from `compute_block_kv`, or None on a cache miss), in prompt order.
    Raises UnsupportedRopeError (from `rope_spec`) for models whose RoPE is not verified, in every
    mode but "full". backend: the tensor steps' implementation, "torch" or "triton" (kernels/).
    """
    _validate(model, blocks, tail_ids, mode, recompute_ratio, check_layer, epic_tokens, deviation_on)
    layout = _layout(blocks, tail_ids, model.device)
    if mode == "full":
        return _full_prefill(model, layout)

    spec = rope_spec(model)
    n_tokens = layout.token_ids.shape[0]
    n_layers = _num_layers(model)
    keys, values = _reused_kv(model, spec, blocks, layout, backend)
    not_cached = ~layout.cached  # [N]: misses and tail, computed in every layer
    # Cached tokens outside an exact prefix: the only ones whose reused KV is approximate.
    candidates = layout.cached & (layout.block_start > 0)  # [N]
    embeds = model.model.embed_tokens(layout.token_ids[None])  # [1, N, hidden]
    token_layers = 0

    if mode == "cacheblend":
        # Layers 0..check_layer for every token, then rank cached tokens by KV deviation there.
        hidden, recompute = _cacheblend_pass(
            model,
            embeds,
            keys,
            values,
            candidates,
            recompute_ratio,
            check_layer,
            deviation_on,
            backend,
        )  # [1, N, hidden], [N]
        token_layers += n_tokens * (check_layer + 1)
        first_rest_layer = check_layer + 1
    else:
        hidden = embeds
        recompute = (
            candidates & (layout.offset_in_block < epic_tokens)
            if mode == "epic"
            else torch.zeros_like(candidates)
        )  # [N]
        first_rest_layer = 0

    compute_mask = not_cached | recompute  # [N]
    positions = compute_mask.nonzero().squeeze(1)  # [R] ascending; the last prompt token is in it
    assert positions[-1].item() == n_tokens - 1 and hidden.shape[1] == n_tokens
    hidden = _gather_hidden(hidden, positions, backend)  # [1, R, hidden]
    hidden = _run_layers(model, hidden, positions, range(first_rest_layer, n_layers), keys, values, backend)
    token_layers += positions.shape[0] * (n_layers - first_rest_layer)

    last_hidden = model.model.norm(hidden[:, -1:])  # [1, 1, hidden]
    last_logits = model.lm_head(last_hidden)[:, -1].float()  # [1, vocab]
    cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)), config=model.config)
    stats = AssemblyStats(
        mode=mode,
        prompt_tokens=n_tokens,
        cached_tokens=int(layout.cached.sum()),
        computed_tokens=int(not_cached.sum()),
        recomputed_tokens=int(recompute.sum()),
        token_layers=token_layers,
    )
    return Assembly(
        cache=cache, last_logits=last_logits, stats=stats, recomputed_positions=recompute.nonzero().squeeze(1)
    )
