"""The lean tree-step forward gives the model's own logits, bit for bit, and the same cache.

Random trees (random parents, widths, batch rows with holes in the cache) on tiny Llama and
Qwen2 models with grouped-query attention, under SDPA and eager attention; architectures it
does not know are refused, so the engine keeps the plain forward for them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from common.drafting.draft_tree import FlatTree
from common.modeling.tiny import build_tiny_model
from services.decoder.engine import DecodingEngine, EngineSettings
from services.decoder.engine.lean_forward import LeanForward
from services.decoder.engine.tree_inputs import build_tree_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return build_tiny_model(request.param, seed=3)[0]


def _random_tree(draw, vocab: int) -> FlatTree:
    size = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, node - 1)) for node in range(1, size)]
    tokens = [draw(st.integers(3, vocab - 1)) for _ in range(size)]
    depths = [0] * size
    children: list[list[int]] = [[] for _ in range(size)]
    for node in range(1, size):
        depths[node] = depths[parents[node]] + 1
        children[parents[node]].append(node)
    return FlatTree(tokens=tokens, parents=parents, depths=depths, children=children)


@given(data=st.data())
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lean_logits_and_cache_equal_the_models_forward(model, data):
    lean = LeanForward.for_model(model)
    assert lean is not None
    vocab = model.config.vocab_size
    rows = data.draw(st.integers(1, 3))
    context = data.draw(st.integers(1, 20))
    trees = [_random_tree(data.draw, vocab) for _ in range(rows)]
    key_valid = torch.rand(rows, context, generator=torch.Generator().manual_seed(context)) > 0.2
    key_valid[:, 0] = True  # every row sees something
    inputs = build_tree_inputs(trees, [int(v.sum()) for v in key_valid], key_valid, dtype=model.dtype)
    prefix = torch.randint(3, vocab, (rows, context), generator=torch.Generator().manual_seed(rows))
    caches = []
    for _ in range(2):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
        caches.append(cache)
    with torch.inference_mode():
        expected = model(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                         attention_mask=inputs.attention_mask, past_key_values=caches[0], use_cache=True).logits
        got = lean(inputs.input_ids, inputs.position_ids, inputs.attention_mask, caches[1])
    assert torch.equal(got, expected)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_eager_attention_is_followed_too():
    model, _ = build_tiny_model("llama", seed=4, kv_heads=4)
    model.config._attn_implementation = "eager"
    assert LeanForward.for_model(model) is not None  # its start-up check compared against eager


def test_unknown_layouts_keep_the_plain_forward():
    config = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    qwen3 = Qwen3ForCausalLM(config).eval()  # q/k norms inside attention: not a known layout
    assert LeanForward.for_model(qwen3) is None
    engine = DecodingEngine(qwen3, EngineSettings())
    assert engine.lean_forward is None


def test_a_model_whose_parts_do_something_else_is_refused(monkeypatch):
    model, _ = build_tiny_model("llama", seed=5)
    # A wrapper that changes the model's output after the layers (as some fine-tuned heads do):
    # the start-up check sees different logits and refuses.
    original = model.forward

    def scaled_forward(*args, **kwargs):
        output = original(*args, **kwargs)
        output.logits = output.logits * 2
        return output

    monkeypatch.setattr(model, "forward", scaled_forward)
    assert LeanForward.for_model(model) is None


def test_engine_uses_it_by_default_and_can_be_told_not_to(model):
    assert DecodingEngine(model, EngineSettings()).lean_forward is not None
    assert DecodingEngine(model, EngineSettings(lean_forward=False)).lean_forward is None


def test_a_layout_it_cannot_read_falls_back_instead_of_failing(monkeypatch):
    model, _ = build_tiny_model("qwen2", seed=6)
    import services.decoder.engine.lean_forward as lean_module

    def broken(self, model):
        raise AttributeError("no apply_rotary_pos_emb in this modeling module")

    monkeypatch.setattr(lean_module.LeanForward, "__init__", broken)
    assert LeanForward.for_model(model) is None
