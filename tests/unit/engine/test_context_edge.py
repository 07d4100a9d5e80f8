"""Edges of speculation (issue 18 item 6): requests whose prompt + max_new_tokens reach, meet or
pass the model's context.

A request with prompt + max_new_tokens <= the context must decode to the limit without any
step using a position the model does not have, whatever its draft tree: trees larger than the
room left, branches deeper than it, pools holding greedy's own continuation (so drafts are long
and accepted right up to the edge) or junk (rejections), one row or several of different
lengths joining a running batch. One token more is refused up front by the intake with
INVALID_ARGUMENT naming params.max_new_tokens.

The tiny Llama here has a small context (LIMIT positions). RoPE itself would compute any
position, so a `PositionGuard` on the model's rotary module makes every position >= LIMIT raise,
as a model with a position table (or a sized KV cache) would: an overflow is then the
"exception inside a step" this test must never see, not silently different logits. Both the
model's forward and LeanForward call the rotary module's `forward`, so both are guarded.

Float caveat as in test_engine_greedy: a divergence from greedy is tolerated only at a
reference near-tie (top-2 logit gap below TIE_GAP).
"""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from adaccel.v1 import common_pb2
from common.drafting.cost_model import linear_cost_model
from common.drafting.pools import PoolRegistry
from common.drafting.trie import TokenTrie, TrieSettings
from common.modeling.tiny import build_tiny_model, byte_tokenizer
from common.rpc.errors import InvalidArgument
from services.decoder.engine import DecodingEngine, EngineSettings, GenerationConfig, StepResult
from services.decoder.engine.engine import BatchSession
from services.decoder.intake import RequestIntake

LIMIT = 64  # the tiny model's max_position_embeddings
TIE_GAP = 1e-4
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PositionGuard:
    """Makes the model refuse positions outside [0, limit), and records the highest one used."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        self.limit = limit
        self.highest = -1
        rotary = model.model.rotary_emb
        inner = rotary.forward

        def forward(x, position_ids):
            low, high = int(position_ids.min()), int(position_ids.max())
            self.highest = max(self.highest, high)
            if low < 0 or high >= limit:
                raise IndexError(f"position {high if high >= limit else low} outside the model's {limit} positions")
            return inner(x, position_ids)

        rotary.forward = forward  # an instance attribute: Module.__call__ and direct .forward calls both find it


@pytest.fixture(scope="module")
def model():
    model, _ = build_tiny_model("llama", seed=0, max_positions=LIMIT)
    return model


@pytest.fixture(scope="module")
def guard(model) -> PositionGuard:
    return PositionGuard(model, LIMIT)  # before any engine exists: LeanForward's check runs guarded too


class Greedy:
    """Plain one-token-at-a-time greedy over a DynamicCache, to the context's end; memoized."""

    def __init__(self, model) -> None:
        self.model = model
        self._memo: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}

    @torch.no_grad()
    def __call__(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        key = tuple(prompt)
        if key not in self._memo:
            cache = DynamicCache(config=self.model.config)
            logits = self.model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
            tokens, gaps = [], []
            for _ in range(LIMIT - len(prompt)):  # the last token is never fed: positions <= LIMIT - 2
                top = torch.topk(logits, 2).values
                tokens.append(int(logits.argmax()))
                gaps.append(float(top[0] - top[1]))
                if len(prompt) + len(tokens) < LIMIT:
                    logits = self.model(torch.tensor([[tokens[-1]]]), past_key_values=cache,
                                        use_cache=True).logits[0, -1]
            self._memo[key] = (tokens, gaps)
        tokens, gaps = self._memo[key]
        assert n <= len(tokens)
        return tokens[:n], gaps[:n]


@pytest.fixture(scope="module")
def greedy(model, guard) -> Greedy:
    return Greedy(model)


@pytest.fixture(scope="module")
def edge_stats():
    """Proves the examples reach the edge the hard way: rows whose last step emitted several
    tokens (accepted drafts ending exactly at max_new_tokens), and steps whose tree budget was
    larger than the room left."""
    totals = {"rows": 0, "rows_at_limit": 0, "multi_token_final_steps": 0, "accepted": 0, "emitted": 0,
              "trees_larger_than_room": 0, "eos_stops": 0}
    yield totals
    print(f"\ncontext-edge property: {totals}")
    assert totals["rows_at_limit"] >= 10, totals
    assert totals["multi_token_final_steps"] >= 10, totals
    assert totals["trees_larger_than_room"] >= 10, totals
    assert totals["accepted"] >= 0.2 * totals["emitted"], totals


def stopped_right(output: list[int], config: GenerationConfig) -> bool:
    """Exactly max_new_tokens, or fewer ending at the first EOS."""
    eos = config.eos_token_id
    if eos is not None and eos in output:
        return output.index(eos) == len(output) - 1 and len(output) <= config.max_new_tokens
    return len(output) == config.max_new_tokens


def assert_greedy(label: str, output: list[int], expected: list[int], gaps: list[float]) -> None:
    for i, (got, want) in enumerate(zip(output, expected)):
        if got != want:
            assert gaps[i] < TIE_GAP, f"{label}: diverged at {i} (gap {gaps[i]:.2e}): {output} != {expected}"
            return
    assert output == expected, f"{label}: {output} != {expected}"


# ---------------------------------------------------------------- strategies
tokens = st.integers(3, 300)


@st.composite
def edge_prompt(draw) -> tuple[list[int], int]:
    """(prompt, max_new_tokens) with prompt + max_new_tokens in LIMIT-3..LIMIT."""
    total = draw(st.sampled_from([LIMIT, LIMIT, LIMIT - 1, LIMIT - 2, LIMIT - 3]))
    # Short prompts generate long (many steps to the edge), long ones reach it at once.
    length = draw(st.one_of(st.integers(1, 12), st.integers(LIMIT - 12, total), st.integers(1, total)))
    if draw(st.booleans()):
        prompt = draw(st.lists(tokens, min_size=length, max_size=length))
    else:  # a repeated pattern: the request's own overlay has drafts too
        unit = draw(st.lists(tokens, min_size=1, max_size=6))
        prompt = (unit * (length // len(unit) + 1))[:length]
    return prompt, total - length


@st.composite
def pool_for(draw, prompt: list[int], continuation: list[int]) -> TokenTrie | None:
    kind = draw(st.sampled_from(["greedy", "greedy", "junk", "mixed", "none"]))
    if kind == "none":
        return None
    trie = TokenTrie(TrieSettings(ngram_length=draw(st.sampled_from([LIMIT, 24, 10]))))
    if kind in ("greedy", "mixed"):
        trie.insert(prompt + continuation)  # greedy's own continuation, to the very edge
    if kind in ("junk", "mixed"):
        alphabet = sorted(set(prompt + continuation))
        for seq in draw(st.lists(st.lists(st.sampled_from(alphabet), min_size=2, max_size=LIMIT), min_size=1,
                                 max_size=3)):
            trie.insert(seq)
    return trie


@st.composite
def row_config(draw, max_new: int, continuation: list[int]) -> GenerationConfig:
    mode = draw(st.sampled_from(["strict", "strict", "strict", "relaxed", "sampling"]))
    return GenerationConfig(
        max_new_tokens=max_new,
        mode="relaxed" if mode == "relaxed" else "strict",
        temperature=0.8 if mode == "sampling" else 0.0,
        seed=draw(st.integers(0, 3)),
        drafting=draw(st.sampled_from([True, True, True, True, False])),
        # 1..LIMIT: often far larger than the room left near the edge.
        decoding_length=draw(st.one_of(st.integers(1, LIMIT), st.sampled_from([LIMIT, 1]), st.none())),
        branch_length=draw(st.one_of(st.integers(0, LIMIT), st.sampled_from([LIMIT, LIMIT - 1]), st.none())),
        eos_token_id=draw(st.one_of(st.none(), st.none(), st.sampled_from(continuation or [2]))),
    )


@st.composite
def engine_settings(draw) -> tuple[EngineSettings, bool]:
    adaptive = draw(st.sampled_from([False, False, False, True]))
    settings = EngineSettings(
        decoding_length=draw(st.sampled_from([LIMIT, 16, 4])),
        branch_length=draw(st.sampled_from([LIMIT, 12, 3])),
        key_length=draw(st.integers(1, 3)),
        batch_draft_tokens=draw(st.sampled_from([None, None, 8, 3 * LIMIT])),
        compact_hole_fraction=draw(st.sampled_from([0.05, 0.5])),
        adaptive=adaptive,
    )
    return settings, adaptive


# ---------------------------------------------------------------- the property
def run_rows(engine: DecodingEngine, driver: str, arrivals) -> list[list[StepResult]]:
    """arrivals: (join_step, prompt, config, pool). Returns each row's steps."""
    if driver == "generate":
        (_, prompt, config, pool), = arrivals
        return [list(engine.generate(prompt, config, pool))]
    if driver == "generate_batch":
        steps: list[list[StepResult]] = [[] for _ in arrivals]
        for step in engine.iter_batch([a[1] for a in arrivals], [a[2] for a in arrivals], [a[3] for a in arrivals]):
            for index, result in enumerate(step):
                if result is not None:
                    steps[index].append(result)
        return steps
    session = BatchSession(engine)
    steps = [[] for _ in arrivals]
    index_of: dict[int, int] = {}
    last_join = max(a[0] for a in arrivals)
    step = 0
    while step <= last_join or session.rows:
        for index, (join, prompt, config, pool) in enumerate(arrivals):
            if join == step:
                index_of[id(session.add(prompt, config, pool))] = index
        for handle, result in session.step():
            steps[index_of[id(handle)]].append(result)
        if session.rows:  # every row's real cached tokens stay inside the context, holes aside
            assert int(session.batch.key_valid.sum(dim=1).max()) <= LIMIT - 1
        step += 1
    return steps


def rooms_before(steps: list[StepResult], max_new: int) -> list[int]:
    """The tokens max_new_tokens still allowed before each step."""
    rooms, emitted = [], 0
    for step in steps:
        rooms.append(max_new - emitted)
        emitted += len(step.token_ids)
    return rooms


@PROPERTY
@given(data=st.data(), rows=st.integers(1, 4))
def test_requests_at_the_context_edge_decode_to_the_limit_without_a_step_error(
    model, guard, greedy, edge_stats, data, rows
) -> None:
    settings, adaptive = data.draw(engine_settings())
    driver = data.draw(st.sampled_from(["session", "generate_batch"] if rows > 1 else ["generate", "session"]))
    arrivals, expected = [], []
    for _ in range(rows):
        prompt, max_new = data.draw(edge_prompt())
        continuation, gaps = greedy(prompt, LIMIT - len(prompt))
        config = data.draw(row_config(max_new, continuation))
        pool = data.draw(pool_for(prompt, continuation))
        join = data.draw(st.integers(0, 3)) if driver == "session" else 0
        arrivals.append((join, prompt, config, pool))
        tokens, gaps = greedy(prompt, max_new)
        if config.eos_token_id is not None and config.eos_token_id in tokens:
            cut = tokens.index(config.eos_token_id) + 1
            tokens, gaps = tokens[:cut], gaps[:cut]
        expected.append((tokens, gaps))
    cost_model = linear_cost_model(3e-3, 1e-5) if adaptive else None
    engine = DecodingEngine(model, settings, cost_model=cost_model)

    guard.highest = -1
    row_steps = run_rows(engine, driver, arrivals)

    # No step used a position past the longest request's last token (the guard would have raised).
    assert guard.highest <= max(len(p) + c.max_new_tokens for _, p, c, _ in arrivals) - 1
    for index, ((_, prompt, config, _), steps, (tokens, gaps)) in enumerate(zip(arrivals, row_steps, expected)):
        output = [t for step in steps for t in step.token_ids]
        label = f"row {index} (prompt {len(prompt)}, max_new {config.max_new_tokens}, config {config})"
        assert stopped_right(output, config), f"{label}: {len(output)} tokens {output}"
        if config.temperature == 0 and config.mode == "strict":
            assert_greedy(label, output, tokens, gaps)
            assert len(output) == len(tokens)
        assert all(step.token_ids for step in steps)
        edge_stats["rows"] += 1
        edge_stats["emitted"] += len(output)
        edge_stats["accepted"] += sum(step.accepted for step in steps)
        if len(prompt) + len(output) == LIMIT:
            edge_stats["rows_at_limit"] += 1
        if len(output) < config.max_new_tokens:
            edge_stats["eos_stops"] += 1
        if steps and len(output) == config.max_new_tokens and len(steps[-1].token_ids) >= 2:
            edge_stats["multi_token_final_steps"] += 1
        if config.drafting:
            budget = engine.tree_tokens(config)
            edge_stats["trees_larger_than_room"] += sum(budget > room for room in rooms_before(steps, config.max_new_tokens))


def test_a_greedy_pool_lands_exactly_on_the_limit_in_one_long_step(model, guard, greedy) -> None:
    """The whole continuation in the pool, a tree and a branch far larger than the room: the final
    step's accepted run ends exactly at position LIMIT - 1's token, one step for all of it."""
    prompt = [11, 12, 13, 14, 15]
    continuation, gaps = greedy(prompt, LIMIT - len(prompt))
    pool = TokenTrie(TrieSettings(ngram_length=LIMIT))
    pool.insert(prompt + continuation)
    engine = DecodingEngine(model, EngineSettings(decoding_length=LIMIT, branch_length=LIMIT))
    guard.highest = -1
    config = GenerationConfig(max_new_tokens=LIMIT - len(prompt), decoding_length=LIMIT, branch_length=LIMIT)
    steps = list(engine.generate(prompt, config, pool))
    output = [t for step in steps for t in step.token_ids]
    assert_greedy("one long step", output, continuation, gaps)
    assert len(prompt) + len(output) == LIMIT
    assert len(steps) <= 2 and sum(step.accepted for step in steps) >= len(output) - 2
    assert guard.highest <= LIMIT - 2  # the last token is emitted, never fed


def test_the_guard_really_refuses_positions_past_the_context(model, guard) -> None:
    """The guard is what turns an overflow into an error: one position past the context raises."""
    with torch.no_grad(), pytest.raises(IndexError, match="outside the model's"):
        model(torch.tensor([[5]]), position_ids=torch.tensor([[LIMIT]]))


# ---------------------------------------------------------------- intake
@pytest.fixture(scope="module")
def intake(model, guard) -> RequestIntake:
    return RequestIntake(byte_tokenizer(), PoolRegistry(), DecodingEngine(model), max_prompt_tokens=LIMIT,
                         context_limit=LIMIT)


def text_request(chars: int, max_new: int, decoding_length: int) -> common_pb2.GenerateRequest:
    block = common_pb2.PromptBlock(id="t", kind=common_pb2.BLOCK_KIND_TEXT, text="ab c" * (chars // 4) + "x" * (chars % 4))
    params = common_pb2.GenerationParams(max_new_tokens=max_new,
                                         advanced=common_pb2.AdvancedParams(decoding_length=decoding_length))
    return common_pb2.GenerateRequest(request_id="edge", blocks=[block], raw_prompt=True, params=params)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chars=st.integers(1, LIMIT - 2), over=st.integers(-4, 8), decoding_length=st.integers(0, 2 * LIMIT))
def test_the_intake_refuses_exactly_the_requests_past_the_context(intake, chars, over, decoding_length) -> None:
    """prompt + max_new_tokens > LIMIT: INVALID_ARGUMENT naming params.max_new_tokens and the limit,
    whatever the tree; <= LIMIT: prepared, the tree reserved in kv_tokens but never refused for."""
    request = text_request(chars, 0, decoding_length)
    prompt_length = len(intake.tokenize(request).token_ids)
    max_new = max(0, LIMIT - prompt_length + over)
    request.params.max_new_tokens = max_new
    if prompt_length + max_new > LIMIT:
        with pytest.raises(InvalidArgument) as refused:
            intake.prepare(request, "edge")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        message = str(refused.value)
        assert message.startswith("params.max_new_tokens:"), message
        assert f"= {prompt_length + max_new} passes the model's context of {LIMIT} tokens" in message
    else:
        prepared = intake.prepare(request, "edge")
        assert len(prepared.prompt_ids) == prompt_length
        assert prepared.config.max_new_tokens == max_new
        tree = decoding_length or intake.tree.settings.decoding_length
        assert prepared.kv_tokens == prompt_length + max_new + tree + 1
