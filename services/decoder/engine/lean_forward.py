"""The model's own forward for one tree step, without the per-call plumbing around it.

On CPU a small model's forward is mostly fixed cost: for the 2.7M-parameter default model, a
1-token step is ~3.3 ms of which ~0.7 ms is matrix work; transformers' wrappers (module calls,
output records, mask preparation, kwargs checks) take ~0.8 ms of the rest. A tree step needs
none of them: the mask is already the 4-D float mask of tree_inputs.py and the cache is a
DynamicCache. `LeanForward` runs the same sub-computations of the same model objects in the
same order (the model's embedding, its rotary module and `apply_rotary_pos_emb`, its norms,
linear layers and MLP activation, transformers' registered attention function for the
model's attention implementation, the DynamicCache's `update`), so the logits are the very
same floats: `LeanForward.for_model` checks that bit for bit on a random tree at start-up
and returns None (callers keep the plain forward) when they are not, or when the
architecture is not one whose decoder layer it knows.

Grouped-query attention over a tree (more than one query per row) is the one place where it
does not call transformers' function as is: for several queries that function copies every
key/value head `num_key_value_groups` times (`repeat_kv`) before SDPA, which at 16 rows x
3,400 cached tokens on the default model is ~1.5 s of a ~3 s forward, 3x a one-token step.
Under SDPA on CPU, `enable_gqa=True` gives the same floats without the copy (torch >= 2.5;
checked bit for bit with the rest at start-up); one query keeps transformers' own path (it
packs the heads itself), and other devices keep transformers' choice (its reasons there:
masked GQA falls back to the math kernel on CUDA).

Known layouts: Llama, Qwen2 and Mistral decoder layers (pre-norm, q/k/v/o projections with
optional bias, gated MLP); anything else, or any extra op in a layer (Qwen3's q/k norms),
is left to the plain forward.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})
_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm", "post_attention_layernorm",
)  # fmt: skip


class LeanForward:
    """logits [B, Q, V] of input_ids [B, Q] at position_ids [B, Q] under an additive 4-D mask
    [B, 1, Q, S + Q], appending the step's KV to `cache` (like the model's forward)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.model = model
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        implementation = model.config._attn_implementation
        self.attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None) or _eager(model)
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        groups = getattr(self.layers[0].self_attn, "num_key_value_groups", 1)
        device = next(model.parameters()).device
        self.tree_attention: Callable = (
            _sdpa_gqa if implementation == "sdpa" and groups > 1 and device.type == "cpu" else self.attention
        )

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> LeanForward | None:
        """A checked LeanForward for `model`, or None where the plain forward must be used.
        Decided once per model object and attention implementation: the engine, the step-cost
        profile and its device string all ask, and the check runs two forwards."""
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        known = _DECIDED.get(model)
        if known is not None and known[0] == implementation:
            return known[1]
        decided = cls._decide(model)
        _DECIDED[model] = (implementation, decided)
        return decided

    @classmethod
    def _decide(cls, model: torch.nn.Module) -> LeanForward | None:
        reason = _unsupported(model)
        if reason is None:
            try:
                lean = cls(model)
                reason = lean._differs_from_model()
            except (AttributeError, TypeError, ValueError, RuntimeError) as exc:  # a layout it misread
                reason = f"its check failed: {exc!r}"
            if reason is None:
                return lean
        log.info("tree steps use the model's own forward (%s)", reason)
        return None

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        decoder = self.decoder
        hidden = decoder.embed_tokens.forward(input_ids)
        cos, sin = decoder.rotary_emb.forward(hidden, position_ids)
        batch, width = input_ids.shape
        attend = self.attention if width == 1 else self.tree_attention
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = layer.input_layernorm.forward(hidden)
            head_shape = (batch, width, -1, attention.head_dim)
            query = _linear(x, attention.q_proj).view(head_shape).transpose(1, 2)
            key = _linear(x, attention.k_proj).view(head_shape).transpose(1, 2)
            value = _linear(x, attention.v_proj).view(head_shape).transpose(1, 2)
            query, key = self.apply_rotary(query, key, cos, sin)
            key, value = cache.update(key, value, index)
            output, _ = attend(attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling)
            hidden = hidden + _linear(output.reshape(batch, width, -1).contiguous(), attention.o_proj)
            x = layer.post_attention_layernorm.forward(hidden)
            mlp = layer.mlp
            hidden = hidden + _linear(mlp.act_fn(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj), mlp.down_proj)
        return _linear(decoder.norm.forward(hidden), self.model.lm_head)

    def _differs_from_model(self) -> str | None:
        """None when a random 5-node tree over a 7-token cache gives the model's exact logits."""
        config = self.model.config
        device = next(self.model.parameters()).device
        generator = torch.Generator(device="cpu").manual_seed(0)
        vocab = config.vocab_size
        context = torch.randint(0, vocab, (2, 7), generator=generator).to(device)
        tree = torch.randint(0, vocab, (2, 5), generator=generator).to(device)
        parents = [-1, 0, 0, 1, 3]  # root, two children, a grandchild, its child
        allowed = torch.eye(5, dtype=torch.bool)
        for node, parent in enumerate(parents):
            if parent >= 0:
                allowed[node] |= allowed[parent]
        full = torch.cat([torch.ones(5, 7, dtype=torch.bool), allowed], dim=1)
        mask = torch.zeros(full.shape, dtype=self.model.dtype).masked_fill_(~full, torch.finfo(self.model.dtype).min)
        mask = mask[None, None].expand(2, 1, 5, 12).to(device)
        depth = torch.tensor([0, 1, 1, 2, 3])
        positions = (7 + depth)[None].expand(2, 5).to(device)
        logits = []
        with torch.inference_mode():
            for run in (self._model_logits, self):
                cache = DynamicCache(config=config)
                self.model(input_ids=context, past_key_values=cache, use_cache=True)
                logits.append(run(tree, positions, mask, cache))
        if logits[0].shape != logits[1].shape or not torch.equal(logits[0], logits[1]):
            return "its logits differ from the model's forward"
        return None

    def _model_logits(self, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          past_key_values=cache, use_cache=True).logits


# model -> (attention implementation it was checked under, the LeanForward or None)
_DECIDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sdpa_gqa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor, dropout: float, scaling: float) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for a float mask, grouped-query heads shared inside the kernel:
    query [B, H, Q, D], key/value [B, H_kv, S + Q, D] -> output [B, Q, H, D]."""
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                            scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)  # what nn.Linear.forward does, without the module call


def _eager(model: torch.nn.Module) -> Callable:
    return sys.modules[type(model).__module__].eager_attention_forward


def _unsupported(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    decoder = getattr(model, "model", None)
    if decoder is None or not all(hasattr(decoder, part) for part in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return "unexpected decoder layout"
    if getattr(model, "lm_head", None) is None or not isinstance(model.lm_head, torch.nn.Linear):
        return "no linear lm_head"
    for layer in decoder.layers:
        for path in _LAYER_PARTS:
            owner = layer
            for name in path.split("."):
                owner = getattr(owner, name, None)
            if owner is None:
                return f"decoder layer without {path}"
        if getattr(layer, "attention_type", "full_attention") != "full_attention":
            return "sliding-window layers"
        extra = {name for name, _ in layer.self_attn.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj"}
        if extra:
            return f"attention has extra parts {sorted(extra)}"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "logit soft-capping"
    return None
