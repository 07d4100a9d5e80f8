"""The decoding loop: prefill, then per step draft -> tree inputs -> forward -> verify -> keep KV.

`BatchSession` is the engine's one serving API: requests join a running batch between steps
(each prefilled alone, then appended as a row), every step is one shared verification
forward, and finished rows leave at the end of the step that ends them. `generate`,
`iter_batch` and `generate_batch` are thin wrappers over a session.

Each row's cache holds the KV of every token but the last one (the root); a step feeds
[root + draft tree], and keeps the KV of the root and of the accepted drafts; the bonus token
becomes the next root. Prefill covers the whole prompt and its last position's logits give the
first token (emitted with the prefill, as transformers' `generate` does: a separate first step
over the prompt's last token would cost one forward per request, ~100 ms of TTFT on the default
model here); that token is the first root, so the first step drafts from the prompt's tail and it.

Batch layout: rows share one DynamicCache; because rows accept different numbers of tokens,
each row's cache has holes (see kv_cache.py), tracked in `key_valid` [B, S] and masked out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from common.drafting.budget import AdaptiveDrafting
from common.drafting.confidence import ConfidenceSettings
from common.drafting.cost_model import StepCostModel
from common.drafting.draft_tree import DraftTree, FlatTree, flatten
from common.drafting.pools import DraftSettings, DraftSource, RequestDrafter
from common.drafting.trie import TokenTrie
from common.drafting.verification import (
    SamplingParams,
    Verdict,
    verify_relaxed,
    verify_sampling,
    verify_strict,
)
from services.decoder.engine.cache_rows import append_rows
from services.decoder.engine.config import EngineSettings, GenerationConfig, StepResult
from services.decoder.engine.kv_cache import cache_length, check_cache, compact, keep_accepted
from services.decoder.engine.lean_forward import LeanForward
from services.decoder.engine.spare_capacity import with_spare_capacity
from services.decoder.engine.tree_inputs import TreeInputs, build_tree_inputs


@dataclass(slots=True, eq=False)
class RequestState:
    """One request's decoding state (one batch row while it runs); BatchSession's handle."""

    config: GenerationConfig
    decoding_length: int
    branch_length: int
    tokens: list[int]  # prompt + emitted; tokens[-1] is the next root, all others are cached
    prompt_length: int
    pool: TokenTrie | None
    drafter: DraftSource | None
    generator: torch.Generator | None
    done: bool = False

    @property
    def context_length(self) -> int:
        """Real tokens in this row's cache: also the root's position id."""
        return len(self.tokens) - 1

    @property
    def room(self) -> int:
        """Tokens still allowed by max_new_tokens."""
        return self.config.max_new_tokens - (len(self.tokens) - self.prompt_length)


class StepTimer(Protocol):
    """Receives the seconds each part of a step took (benchmarks' step profile)."""

    def record(self, part: str, seconds: float) -> None: ...


# The parts of a step a StepTimer hears about, in the order they run ("step" is the whole step).
STEP_PARTS = ("draft", "inputs", "forward", "verify", "kv", "emit")


@dataclass(slots=True)
class _Batch:
    requests: list[RequestState]  # active rows, in cache row order
    cache: DynamicCache
    key_valid: torch.Tensor  # [B, S] bool: cache columns that hold real tokens


class DecodingEngine:
    """In-process lookahead decoding over a transformers causal LM (no gRPC here).

    Serving drives it through a BatchSession (below). generate(): one request, a StepResult
    per forward pass; iter_batch(): several requests in shared forward passes, a list per step
    indexed like the prompts (None for rows without a result that step); generate_batch():
    each prompt's new tokens. All three are sessions underneath.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: EngineSettings | None = None,
        *,
        cost_model: StepCostModel | None = None,
        step_timer: StepTimer | None = None,
    ) -> None:
        """`cost_model`: predicted step cost for adaptive drafting (settings.adaptive); None
        profiles this model briefly on first use (services/decoder/cost_profile.py).
        `step_timer`: told how long each part of every step took (STEP_PARTS, and "step")."""
        self.model = model
        self.settings = settings or EngineSettings()
        self.device = torch.device(self.settings.device) if self.settings.device else model.device
        self.dtype = model.dtype
        self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        self.step_timer = step_timer
        self.adaptive: AdaptiveDrafting | None = None
        # Tree steps through the model's own parts minus transformers' per-call plumbing (same
        # logits, checked at construction; None: the plain forward).
        self.lean_forward = LeanForward.for_model(model) if self.settings.lean_forward else None
        if self.settings.adaptive:
            if cost_model is None:
                from services.decoder.cost_profile import profile_cost_model  # torch-heavy, only when needed

                cost_model = profile_cost_model(model, "", max_seconds=3.0)
            self.adaptive = AdaptiveDrafting(cost_model, ConfidenceSettings(weights=self.settings.confidence_weights),
                                             clock=time.perf_counter,
                                             draft_margin=self.settings.adaptive_draft_margin)

    def tree_tokens(self, config: GenerationConfig) -> int:
        """The most draft tokens one step of this request can feed (KV admission reserves them)."""
        if not config.drafting:
            return 0
        return _or_default(config.decoding_length, self.settings.decoding_length)

    # ------------------------------------------------------------------ thin drivers
    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        pool: TokenTrie | None = None,
        *,
        past_key_values: DynamicCache | None = None,
        draft_source: DraftSource | None = None,
    ) -> Iterator[StepResult]:
        """Streams one request's steps. `past_key_values`: a DynamicCache (batch 1) already
        holding the KV of a prefix of prompt_ids; the engine prefills only the rest and then
        extends that cache object in place (it owns it from here on). `draft_source` replaces
        the pool + request-overlay drafter (benchmarks: an oracle). Bad input raises here; the
        prefill runs when the first step is asked for."""
        request = self._new_request(prompt_ids, config, pool, draft_source)
        if past_key_values is not None:
            check_prefix_cache(past_key_values)
        session = BatchSession(self)

        def steps() -> Iterator[StepResult]:
            session.join(request, past_key_values)
            yield from (result for _, result in session.take_first())  # before any step runs
            for step in session.run():
                yield from (result for _, result in step)

        return steps()

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        configs: Sequence[GenerationConfig],
        pools: Sequence[TokenTrie | None] | None = None,
    ) -> list[list[int]]:
        """New tokens of each prompt, decoded together (prompts may differ in length)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.iter_batch(prompts, configs, pools):
            for index, result in enumerate(step):
                if result is not None:
                    outputs[index].extend(result.token_ids)
        return outputs

    def iter_batch(
        self,
        prompts: Sequence[Sequence[int]],
        configs: Sequence[GenerationConfig],
        pools: Sequence[TokenTrie | None] | None = None,
    ) -> Iterator[list[StepResult | None]]:
        pools = list(pools) if pools is not None else [None] * len(prompts)
        if not len(prompts) == len(configs) == len(pools):
            raise ValueError("prompts, configs and pools must have the same length")
        requests = [self._new_request(p, c, pool) for p, c, pool in zip(prompts, configs, pools)]
        index_of = {id(request): i for i, request in enumerate(requests)}
        session = BatchSession(self)

        def rows(step: list[tuple[RequestState, StepResult]]) -> list[StepResult | None]:
            row: list[StepResult | None] = [None] * len(prompts)
            for handle, result in step:
                row[index_of[id(handle)]] = result
            return row

        def steps() -> Iterator[list[StepResult | None]]:
            for request in requests:
                session.join(request, None)
            yield rows(session.take_first())  # the prefills' tokens, then one list per forward
            for step in session.run():
                yield rows(step)

        return steps()

    # ------------------------------------------------------------------ request setup
    def _new_request(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        pool: TokenTrie | None,
        draft_source: DraftSource | None = None,
    ) -> RequestState:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids must not be empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        decoding_length = _or_default(config.decoding_length, self.settings.decoding_length)
        branch_length = _or_default(config.branch_length, self.settings.branch_length)
        drafter = None
        if config.drafting and draft_source is not None:
            drafter = draft_source
        elif config.drafting:
            drafter = RequestDrafter(
                pool,
                prompt,
                DraftSettings(key_length=self.settings.key_length),
                ngram_length=self.settings.key_length + branch_length,
            )
        if drafter is not None and self.adaptive is not None:
            drafter = self.adaptive.wrap(drafter, pool)
        generator = None
        if config.temperature > 0:
            generator = torch.Generator(device="cpu").manual_seed(config.seed)
        return RequestState(config, decoding_length, branch_length, prompt, len(prompt), pool, drafter, generator)

    # ------------------------------------------------------------------ the loop
    def _timed(self, part: str, method, *args, **kwargs):
        if self.step_timer is None:
            return method(*args, **kwargs)
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.step_timer.record(part, time.perf_counter() - started)

    @torch.inference_mode()
    def _prefill_begin(self, request: RequestState, past_key_values: DynamicCache | None) -> PendingPrefill:
        """The request's starting cache (reused prefix or empty), before any prompt token is computed."""
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.model.config)
        if self.settings.kv_spare_columns:
            with_spare_capacity(cache, self.settings.kv_spare_columns)
        reused = cache_length(cache)
        excess = reused - request.context_length
        if excess > 0:  # the cache covers the last prompt token too: recompute it for its logits
            cache.crop(-excess)
            reused -= excess
        return PendingPrefill(request, cache, computed=reused, target=len(request.tokens))

    @torch.inference_mode()
    def _prefill_chunk(self, pending: PendingPrefill, max_tokens: int) -> int:
        """Computes up to max_tokens more prompt positions of `pending`; returns how many."""
        count = min(max_tokens, pending.remaining)
        if count > 0:
            start = pending.computed
            logits = self._prefill_dense(pending.request.tokens[start:start + count], start, pending.cache)
            pending.computed += count
            if not pending.remaining:
                pending.last_logits = logits[0, -1:]  # [1, V]: the last prompt position's
        return count

    def _first_token(self, pending: PendingPrefill) -> StepResult:
        """Emits the token the prefill's last logits choose (the verification rule of the
        request's mode on a tree of the root alone): it becomes the first step's root."""
        request = pending.request
        tree = flatten(request.tokens[-1], DraftTree())
        result = self._emit(request, self._verify(pending.last_logits, tree, request), 0)
        pending.last_logits = None
        if request.done:
            self._finish(request)
        return result

    def _prefilled_batch(self, pending: PendingPrefill) -> _Batch:
        """A batch of one row caching every prompt token (the first token is its root)."""
        key_valid = torch.ones((1, pending.computed), dtype=torch.bool, device=self.device)
        return _Batch([pending.request], pending.cache, key_valid)

    def _prefill_dense(self, tokens: list[int], start: int, cache: DynamicCache) -> torch.Tensor:
        """One row over a dense cache (no holes): the model builds its own causal mask, which
        lets SDPA take its causal kernel; an explicit [1, 1, L, L] float mask made long prompts'
        prefill about 1.5x slower (2,478 tokens: ~465 vs ~300 ms on the default model, one CPU
        thread; ~300 ms is also what transformers' generate takes)."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)[None, :]
        output = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
        return output.logits  # [1, 1, V]

    def _step(self, batch: _Batch) -> list[StepResult]:
        """One forward pass for every active row; returns their results in row order."""
        if self.adaptive is None:
            return self._timed("step", self._step_parts, batch)
        started = time.perf_counter()
        results = self._timed("step", self._step_parts, batch)
        self.adaptive.step_finished(time.perf_counter() - started)  # what the step cost, against its prediction
        return results

    @torch.inference_mode()
    def _step_parts(self, batch: _Batch) -> list[StepResult]:
        timed = self._timed
        drafts = timed("draft", self._draft_rows, batch)
        trees = [flatten(request.tokens[-1], draft) for request, draft in zip(batch.requests, drafts)]
        old_length = cache_length(batch.cache)
        inputs = timed("inputs", self._tree_inputs, batch, trees, [r.context_length for r in batch.requests])
        logits = timed("forward", self._forward, inputs, batch.cache)  # [B, Q, V]
        verdicts = timed("verify", self._verify_rows, logits, trees, batch.requests)
        timed("kv", self._keep_accepted_kv, batch, old_length, verdicts)
        results = timed("emit", self._emit_rows, batch.requests, verdicts, drafts)
        self._retire_finished(batch)
        return results

    def _verify_rows(self, logits: torch.Tensor, trees: list[FlatTree], requests: list[RequestState]) -> list[Verdict]:
        return [self._verify(logits[row, : len(tree)], tree, request)
                for row, (tree, request) in enumerate(zip(trees, requests))]

    def _emit_rows(self, requests: list[RequestState], verdicts: list[Verdict], drafts: list[DraftTree]
                   ) -> list[StepResult]:
        return [self._emit(r, v, len(d)) for r, v, d in zip(requests, verdicts, drafts)]

    # ------------------------------------------------------------------ step parts
    def _draft_rows(self, batch: _Batch) -> list[DraftTree]:
        """Every row's draft: a fixed budget each (decoding_length / branch_length, split by
        batch_draft_tokens), or, adaptive, the trees the cost model and confidence choose
        together for the whole batch (decoding_length / branch_length then cap candidates)."""
        if self.adaptive is None:
            budget = self._row_draft_budget(len(batch.requests))
            return [self._draft(request, budget) for request in batch.requests]
        rows = [
            (r.drafter, r.tokens, r.decoding_length, min(r.branch_length, r.room - 1)) for r in batch.requests
        ]
        return self.adaptive.draft_rows(rows, cache_length(batch.cache), self.settings.batch_draft_tokens)

    def _row_draft_budget(self, rows: int) -> int:
        total = self.settings.batch_draft_tokens
        return total // rows if total is not None else 1 << 30

    def _draft(self, request: RequestState, budget: int) -> DraftTree:
        if request.drafter is None:
            return DraftTree()
        # Never draft deeper than the tokens still allowed: room - 1 drafts + the bonus.
        depth = min(request.branch_length, request.room - 1)
        return request.drafter.draft(request.tokens, min(request.decoding_length, budget), depth)

    def _tree_inputs(self, batch: _Batch, trees: list[FlatTree], context_lengths: list[int]) -> TreeInputs:
        return build_tree_inputs(
            trees, context_lengths, batch.key_valid, dtype=self.dtype, pad_token_id=self.settings.pad_token_id
        )

    def _forward(self, inputs: TreeInputs, cache: DynamicCache, *, logits_to_keep: int = 0) -> torch.Tensor:
        if self.lean_forward is not None and logits_to_keep == 0:
            return self.lean_forward(inputs.input_ids, inputs.position_ids, inputs.attention_mask, cache)
        output = self.model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return output.logits  # [B, Q, V] (or [B, 1, V] with logits_to_keep=1)

    def _verify(self, logits: torch.Tensor, tree: FlatTree, request: RequestState) -> Verdict:
        config = request.config
        if config.temperature > 0:
            params = SamplingParams(config.temperature, config.top_k, config.top_p)
            return verify_sampling(logits, tree, params, request.generator)
        if config.mode == "relaxed":
            return verify_relaxed(logits, tree, top_k=config.relaxed_top_k, min_prob=config.relaxed_min_prob)
        return verify_strict(logits, tree)

    def _keep_accepted_kv(self, batch: _Batch, old_length: int, verdicts: list[Verdict]) -> None:
        kept = keep_accepted(batch.cache, old_length, [v.path for v in verdicts])
        width = max(kept)
        new_valid = (
            torch.arange(width, device=self.device)[None, :] < torch.tensor(kept, device=self.device)[:, None]
        )
        batch.key_valid = torch.cat([batch.key_valid, new_valid], dim=1)  # [B, S + width]
        if min(kept) < width:  # new holes: check whether the cache is worth compacting
            # Compaction can only shrink the cache to its fullest row: rows with shorter prompts
            # keep their padding. Judge by what it would free, not by the share of holes, or a
            # batch of mixed prompt lengths would copy the whole cache on every step.
            fullest = int(batch.key_valid.sum(dim=1).max())
            freed = 1.0 - fullest / batch.key_valid.shape[1]
            if freed > self.settings.compact_hole_fraction:
                batch.key_valid = compact(batch.cache, batch.key_valid)

    def _emit(self, request: RequestState, verdict: Verdict, drafted: int) -> StepResult:
        """Appends the verdict's tokens, trimmed to max_new_tokens and cut after EOS."""
        tokens = verdict.tokens[: request.room]
        eos = request.config.eos_token_id
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        request.tokens.extend(tokens)
        if request.drafter is not None:
            request.drafter.observe(tokens)
        # A trimmed verdict always ends the request, so its KV no longer has to match tokens.
        request.done = request.room <= 0 or (eos is not None and tokens[-1] == eos)
        return StepResult(token_ids=tokens, drafted=drafted, accepted=min(verdict.accepted, len(tokens)))

    def _retire_finished(self, batch: _Batch) -> None:
        alive = [row for row, request in enumerate(batch.requests) if not request.done]
        if len(alive) == len(batch.requests):
            return
        for request in batch.requests:
            if request.done:
                self._finish(request)
        if alive:
            rows = torch.tensor(alive, dtype=torch.long, device=self.device)
            batch.cache.batch_select_indices(rows)
            batch.key_valid = batch.key_valid[rows]
        batch.requests = [batch.requests[row] for row in alive]

    def _finish(self, request: RequestState) -> None:
        if self.settings.learn_from_outputs and request.pool is not None:
            request.pool.insert(request.tokens[request.prompt_length :], "output")
        request.drafter = None  # the request-local overlay is dropped here


def check_prefix_cache(cache: DynamicCache) -> None:
    """A caller's prefix cache must be a well-formed DynamicCache of batch size 1."""
    check_cache(cache)
    if cache_length(cache) and cache.layers[0].keys.shape[0] != 1:
        raise ValueError("past_key_values must have batch size 1")


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(eq=False)
class PendingPrefill:
    """A request whose prompt is being prefilled (BatchSession.begin / advance / finish): its cache
    holds prompt positions [0, computed); the row can join once `target` (every prompt token) are
    cached, and `last_logits` [1, V] (the last chunk's last position) choose its first token."""

    request: RequestState
    cache: DynamicCache
    computed: int
    target: int
    last_logits: torch.Tensor | None = None

    @property
    def remaining(self) -> int:
        return self.target - self.computed


class BatchSession:
    """A running batch that requests join between steps and leave when done (continuous batching).

    add() prefills one request alone (optionally on top of a batch-1 cache holding a prefix of its
    prompt, from block reuse) and appends its row to the running batch (cache_rows.append_rows);
    step() runs one shared verification forward for every row and returns (handle, result) pairs;
    rows that finish that step are retired by the step itself. A prefill emits the request's first
    token when it finishes: step() returns those first results ahead of its forward's, unless
    take_first() took them at once (a server streaming the first token without waiting a step).
    The handle is the request's state; `handle.done` says it will get no more results. Not thread-safe: one thread owns it (in the
    decoder, the batcher's scheduler thread, which owns the model). It drives the engine's
    underscored step internals (_new_request, _prefill_begin/_chunk, _prefilled_batch, _step,
    _retire_finished): a pairing private
    to this module; nothing outside it calls them.
    """

    def __init__(self, engine: DecodingEngine) -> None:
        self.engine = engine
        self.batch: _Batch | None = None
        self._first: list[tuple[RequestState, StepResult]] = []  # prefills' first tokens, not yet returned

    @property
    def rows(self) -> int:
        return len(self.batch.requests) if self.batch is not None else 0

    def add(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        pool: TokenTrie | None = None,
        *,
        past_key_values: DynamicCache | None = None,
        draft_source: DraftSource | None = None,
    ) -> RequestState:
        """Prefills the request in one go and appends its row; ValueError on bad ids or a bad cache."""
        pending = self.begin(prompt_ids, config, pool, past_key_values=past_key_values, draft_source=draft_source)
        self.advance(pending, pending.remaining)
        return self.finish(pending)

    def begin(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        pool: TokenTrie | None = None,
        *,
        past_key_values: DynamicCache | None = None,
        draft_source: DraftSource | None = None,
    ) -> PendingPrefill:
        """Checks a request and starts its prefill (nothing computed yet); advance() computes it in
        chunks, finish() appends the row. Chunks let a scheduler run the batch's steps between
        the pieces of a long prompt (chunked prefill). ValueError on bad ids or a bad cache."""
        request = self.engine._new_request(prompt_ids, config, pool, draft_source)
        if past_key_values is not None:
            check_prefix_cache(past_key_values)
        return self._begin_checked(request, past_key_values)

    def join(self, request: RequestState, past_key_values: DynamicCache | None) -> None:
        """Prefills a checked request (engine._new_request) in one go and appends its row, unless
        it has nothing to generate (then it is done at once)."""
        pending = self._begin_checked(request, past_key_values)
        self.advance(pending, pending.remaining)
        self.finish(pending)

    def _begin_checked(self, request: RequestState, past_key_values: DynamicCache | None) -> PendingPrefill:
        if request.room <= 0:
            request.done = True
            return PendingPrefill(request, DynamicCache(), computed=0, target=0)
        return self.engine._prefill_begin(request, past_key_values)

    def advance(self, pending: PendingPrefill, max_tokens: int) -> int:
        """Computes up to max_tokens more of the prompt; returns how many (0 once it is all cached).
        Chunking is exact up to float rounding: each chunk attends to the cached positions before it."""
        if pending.request.done:
            return 0
        return self.engine._prefill_chunk(pending, max_tokens)

    def finish(self, pending: PendingPrefill) -> RequestState:
        """Emits a fully prefilled request's first token (take_first / step return it) and appends
        its row unless that token ended it (a request with nothing to generate is done at once)."""
        request = pending.request
        if request.done:
            return request
        if pending.remaining:
            raise ValueError(f"prefill not finished: {pending.remaining} prompt tokens left")
        self._first.append((request, self.engine._first_token(pending)))
        if request.done:
            return request
        joined = self.engine._prefilled_batch(pending)
        if not self.rows:
            self.batch = joined
        else:
            self.batch.key_valid = append_rows(self.batch.cache, self.batch.key_valid, joined.cache, joined.key_valid)
            self.batch.requests.append(request)
        return request

    def take_first(self) -> list[tuple[RequestState, StepResult]]:
        """The first tokens of the requests finished since the last call (or step)."""
        first, self._first = self._first, []
        return first

    def step(self) -> list[tuple[RequestState, StepResult]]:
        """First tokens not yet taken, then one forward's results for every row."""
        results = self.take_first()
        if self.rows:
            rows = list(self.batch.requests)  # _step retires finished rows
            results.extend(zip(rows, self.engine._step(self.batch)))
        return results

    def run(self) -> Iterator[list[tuple[RequestState, StepResult]]]:
        """Steps until every row is done (the drivers above; serving steps one at a time)."""
        while self.rows or self._first:
            yield self.step()

    def remove(self, request: RequestState) -> None:
        """Drops a row before it finished (its caller went away)."""
        if self.batch is not None and any(r is request for r in self.batch.requests):
            request.done = True
            self.engine._retire_finished(self.batch)
