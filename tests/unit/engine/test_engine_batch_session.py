"""Continuous batching: requests that join a running batch at different steps, with prompts and
lengths of their own, get exactly the tokens of single-request greedy decoding (strict mode).

Float caveat as in test_engine_greedy: a divergence is tolerated only at a reference near-tie
(top-2 logit gap below TIE_GAP); none is expected on these models.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from common.drafting.trie import TokenTrie, TrieSettings
from common.modeling.tiny import build_tiny_model
from services.decoder.engine import DecodingEngine, EngineSettings, GenerationConfig
from services.decoder.engine.engine import BatchSession

TIE_GAP = 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", seed=0)[0]


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    cache = DynamicCache(config=model.config)
    logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
    tokens, gaps = [], []
    for _ in range(n):
        top = torch.topk(logits, 2).values
        tokens.append(int(logits.argmax()))
        gaps.append(float(top[0] - top[1]))
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return tokens, gaps


def assert_greedy(label, output, expected, gaps):
    for i, (got, want) in enumerate(zip(output, expected)):
        if got != want:
            assert gaps[i] < TIE_GAP, f"{label}: diverged at {i} (gap {gaps[i]:.2e}): {output} != {expected}"
            return
    assert output == expected, f"{label}: {output} != {expected}"


def run_session(engine, arrivals):
    """arrivals: (join_step, prompt, config, pool, past_key_values); returns each one's tokens."""
    session = BatchSession(engine)
    outputs = [[] for _ in arrivals]
    handles = {}
    step = 0
    while step <= max(a[0] for a in arrivals) or session.rows:
        for index, (join, prompt, config, pool, past) in enumerate(arrivals):
            if join == step:
                handles[id(session.add(prompt, config, pool, past_key_values=past))] = index
        for handle, result in session.step():
            outputs[handles[id(handle)]].extend(result.token_ids)
        step += 1
    return outputs


request = st.tuples(
    st.integers(0, 4),  # join at this step
    st.lists(st.integers(3, 300), min_size=1, max_size=24),  # prompt
    st.integers(1, 24),  # max_new_tokens
    st.sampled_from(["none", "greedy", "random"]),  # pool
)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request, min_size=2, max_size=4), decoding_length=st.sampled_from([16, 4]))
def test_rows_joining_a_running_batch_decode_exactly_greedy(model, requests, decoding_length):
    engine = DecodingEngine(model, EngineSettings(decoding_length=decoding_length, branch_length=6,
                                                  compact_hole_fraction=0.3))
    arrivals, expected = [], []
    for join, prompt, max_new, pool_kind in requests:
        tokens, gaps = greedy(model, prompt, max_new)
        pool = None
        if pool_kind != "none":
            pool = TokenTrie(TrieSettings(ngram_length=8))
            pool.insert(prompt + tokens if pool_kind == "greedy" else list(reversed(prompt + tokens)))
        arrivals.append((join, prompt, GenerationConfig(max_new_tokens=max_new), pool, None))
        expected.append((tokens, gaps))
    for index, (output, (tokens, gaps)) in enumerate(zip(run_session(engine, arrivals), expected)):
        assert_greedy(f"row {index}", output, tokens, gaps)


def test_a_joining_row_may_bring_a_prefilled_cache(model):
    engine = DecodingEngine(model, EngineSettings(decoding_length=8, branch_length=4))
    long_prompt, short_prompt = list(range(10, 40)), [7, 8, 9]
    prefix = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([long_prompt[:20]]), past_key_values=prefix, use_cache=True)
    arrivals = [(0, short_prompt, GenerationConfig(max_new_tokens=12), None, None),
                (2, long_prompt, GenerationConfig(max_new_tokens=10), None, prefix),
                (3, [5], GenerationConfig(max_new_tokens=4), None, None)]  # nothing to prefill
    outputs = run_session(engine, arrivals)
    for (_, prompt, config, _, _), output in zip(arrivals, outputs):
        tokens, gaps = greedy(model, prompt, config.max_new_tokens)
        assert_greedy(str(prompt[:3]), output, tokens, gaps)


def test_removed_rows_stop_and_the_rest_continue(model):
    engine = DecodingEngine(model, EngineSettings(decoding_length=4, branch_length=2))
    session = BatchSession(engine)
    first = session.add([3, 4, 5], GenerationConfig(max_new_tokens=20))
    second = session.add([9, 10, 11, 12], GenerationConfig(max_new_tokens=6))
    got = [t for handle, result in session.step() for t in result.token_ids if handle is second]
    session.remove(first)
    assert first.done and session.rows == 1
    while session.rows:
        got.extend(t for handle, result in session.step() for t in result.token_ids if handle is second)
    tokens, gaps = greedy(model, [9, 10, 11, 12], 6)
    assert second.done
    assert_greedy("second", got, tokens, gaps)


def test_the_prefill_emits_the_first_token_and_each_step_is_one_more_forward(model):
    """The first token comes from the prefill's own logits (no extra forward, as in transformers'
    generate), before any step; a request it ends (max_new_tokens=1) never joins the batch."""
    forwards = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        # lean_forward off: its steps call the model's parts, which the hook would not see
        engine = DecodingEngine(model, EngineSettings(decoding_length=4, branch_length=2, lean_forward=False))
        session = BatchSession(engine)
        prompt = [9, 10, 11, 12]
        tokens, gaps = greedy(model, prompt, 5)
        forwards.clear()  # the engine's construction checks and the reference above
        handle = session.add(prompt, GenerationConfig(max_new_tokens=5))
        assert len(forwards) == 1 and session.rows == 1  # the prefill, one forward
        first = session.take_first()
        assert [(h, r.token_ids, r.drafted) for h, r in first] == [(handle, tokens[:1], 0)]
        assert session.take_first() == []  # taken once: step() does not return it again
        got, steps = list(tokens[:1]), 0
        while session.rows:
            got.extend(t for _, result in session.step() for t in result.token_ids)
            steps += 1
        assert_greedy("after the first token", got, tokens, gaps)
        assert len(forwards) == 1 + steps  # no pool: one token a step, 4 after the prefill's
        assert steps == 4
        one = session.add([3, 4, 5], GenerationConfig(max_new_tokens=1))
        assert one.done and session.rows == 0 and len(forwards) == 6
        assert [(h, r.token_ids) for h, r in session.step()] == [(one, greedy(model, [3, 4, 5], 1)[0])]
        forwards.clear()
        streamed = engine.generate(prompt, GenerationConfig(max_new_tokens=5))
        assert next(streamed).token_ids == tokens[:1] and len(forwards) == 1  # TTFT is the prefill's
    finally:
        hook.remove()
