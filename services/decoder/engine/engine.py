"""The decoding loop: prefill, then per step draft -> tree inputs -> forward -> verify -> keep KV.

One loop serves a batch of requests; `generate` is a batch of one. Each row's cache holds the
KV of every token but the last one (the root); a step feeds [root + draft tree], and keeps the
KV of the root and of the accepted drafts; the bonus token becomes the next root. Prefill
therefore covers prompt[:-1] and the very first step already drafts from the prompt's tail.

Batch layout: rows share one DynamicCache; because rows accept different numbers of tokens,
each row's cache has holes (see kv_cache.py), tracked in `key_valid` [B, S] and masked out.
Finished rows leave the batch (batch_select_indices) at the end of the step that ends them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from common.drafting.budget import AdaptiveDrafting
from common.drafting.confidence import ConfidenceSettings
from common.drafting.cost_model import StepCostModel
from common.drafting.draft_tree import DraftTree, FlatTree, chain_tree, flatten
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
from services.decoder.engine.tree_inputs import TreeInputs, build_tree_inputs


@dataclass(slots=True)
class _Request:
    """One request's decoding state (one batch row while it runs)."""

    index: int  # position in the caller's list
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


@dataclass(slots=True)
class _Batch:
    requests: list[_Request]  # active rows, in cache row order
    cache: DynamicCache
    key_valid: torch.Tensor  # [B, S] bool: cache columns that hold real tokens


class DecodingEngine:
    """In-process lookahead decoding over a transformers causal LM (no gRPC here).

    generate(): one request, yields a StepResult per forward pass.
    generate_batch(): several requests in shared forward passes, returns each one's new
    tokens; iter_batch() is the same as a stream of per-step results (list indexed like the
    prompts, None for rows without a result that step).
    """

    def __init__(
        self, model: torch.nn.Module, settings: EngineSettings | None = None, *, cost_model: StepCostModel | None = None
    ) -> None:
        """`cost_model`: predicted step cost for adaptive drafting (settings.adaptive); None
        profiles this model briefly on first use (services/decoder/cost_profile.py)."""
        self.model = model
        self.settings = settings or EngineSettings()
        self.device = torch.device(self.settings.device) if self.settings.device else model.device
        self.dtype = model.dtype
        self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        self.adaptive: AdaptiveDrafting | None = None
        # Tree steps through the model's own parts minus transformers' per-call plumbing (same
        # logits, checked at construction; None: the plain forward).
        self.lean_forward = LeanForward.for_model(model) if self.settings.lean_forward else None
        if self.settings.adaptive:
            if cost_model is None:
                from services.decoder.cost_profile import profile_cost_model  # torch-heavy, only when needed

                cost_model = profile_cost_model(model, "", max_seconds=3.0)
            self.adaptive = AdaptiveDrafting(cost_model, ConfidenceSettings(weights=self.settings.confidence_weights))

    # ------------------------------------------------------------------ public API
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
        the pool + request-overlay drafter (benchmarks: an oracle)."""
        request = self._new_request(0, prompt_ids, config, pool, draft_source)
        if past_key_values is not None:
            check_prefix_cache(past_key_values)
        return self._single_steps(request, past_key_values)

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
        requests = [
            self._new_request(i, p, c, pool) for i, (p, c, pool) in enumerate(zip(prompts, configs, pools))
        ]
        return self._batch_steps(requests, len(prompts))

    # ------------------------------------------------------------------ request setup
    def _new_request(
        self,
        index: int,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        pool: TokenTrie | None,
        draft_source: DraftSource | None = None,
    ) -> _Request:
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
        return _Request(
            index, config, decoding_length, branch_length, prompt, len(prompt), pool, drafter, generator
        )

    # ------------------------------------------------------------------ the loop
    def _single_steps(self, request: _Request, past_key_values: DynamicCache | None) -> Iterator[StepResult]:
        if request.room <= 0:
            return
        batch = self._prefill([request], past_key_values)
        while batch.requests:
            (result,) = self._step(batch)
            yield result

    def _batch_steps(self, requests: list[_Request], size: int) -> Iterator[list[StepResult | None]]:
        runnable = [r for r in requests if r.room > 0]
        if not runnable:
            return
        batch = self._prefill(runnable, None)
        while batch.requests:
            step: list[StepResult | None] = [None] * size
            rows = list(batch.requests)  # _step retires finished rows
            for request, result in zip(rows, self._step(batch)):
                step[request.index] = result
            yield step

    @torch.inference_mode()
    def _prefill(self, requests: list[_Request], past_key_values: DynamicCache | None) -> _Batch:
        """Caches every prompt token but the last (the first step's root)."""
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.model.config)
        reused = cache_length(cache)
        if reused:
            assert len(requests) == 1, "a prefilled cache is only accepted for a single request"
            excess = reused - requests[0].context_length
            if excess > 0:  # the cache covers the root too: recompute that one token
                cache.crop(-excess)
                reused -= excess
        batch = _Batch(
            requests, cache, torch.ones((len(requests), reused), dtype=torch.bool, device=self.device)
        )
        chains = [chain_tree(r.tokens[reused:-1]) for r in requests]
        if len(requests) == 1 and len(chains[0]):
            self._prefill_dense(requests[0].tokens[reused:-1], reused, cache)
            batch.key_valid = torch.ones((1, reused + len(chains[0])), dtype=torch.bool, device=self.device)
        elif any(len(chain) for chain in chains):
            inputs = self._tree_inputs(batch, chains, [reused] * len(requests))
            self._forward(inputs, cache, logits_to_keep=1)  # only the KV is needed
            batch.key_valid = torch.cat([batch.key_valid, inputs.real_nodes], dim=1)
        return batch

    def _prefill_dense(self, tokens: list[int], start: int, cache: DynamicCache) -> None:
        """One row over a dense cache (no holes): the model builds its own causal mask, which
        lets SDPA take its causal kernel; an explicit [1, 1, L, L] float mask made long prompts'
        prefill about 1.5x slower (2,478 tokens: ~465 vs ~300 ms on the default model, one CPU
        thread; ~300 ms is also what transformers' generate takes)."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)[None, :]
        self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> list[StepResult]:
        """One forward pass for every active row; returns their results in row order."""
        drafts = self._draft_rows(batch)
        trees = [flatten(request.tokens[-1], draft) for request, draft in zip(batch.requests, drafts)]
        old_length = cache_length(batch.cache)
        inputs = self._tree_inputs(batch, trees, [r.context_length for r in batch.requests])
        logits = self._forward(inputs, batch.cache)  # [B, Q, V]
        verdicts = [
            self._verify(logits[row, : len(tree)], tree, request)
            for row, (tree, request) in enumerate(zip(trees, batch.requests))
        ]
        self._keep_accepted_kv(batch, old_length, verdicts)
        results = [self._emit(r, v, len(d)) for r, v, d in zip(batch.requests, verdicts, drafts)]
        self._retire_finished(batch)
        return results

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

    def _draft(self, request: _Request, budget: int) -> DraftTree:
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

    def _verify(self, logits: torch.Tensor, tree: FlatTree, request: _Request) -> Verdict:
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

    def _emit(self, request: _Request, verdict: Verdict, drafted: int) -> StepResult:
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

    def _finish(self, request: _Request) -> None:
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


class BatchSession:
    """A running batch that requests join between steps and leave when done (continuous batching).

    add() prefills one request alone (optionally on top of a batch-1 cache holding a prefix of its
    prompt, from block reuse) and appends its row to the running batch (cache_rows.append_rows);
    step() runs one shared verification forward for every row and returns (handle, result) pairs;
    rows that finish that step are retired by the step itself. The handle is the request's state
    object; `handle.done` says it will get no more results. Not thread-safe: one thread owns it.
    """

    def __init__(self, engine: DecodingEngine) -> None:
        self.engine = engine
        self.batch: _Batch | None = None

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
    ) -> _Request:
        request = self.engine._new_request(0, prompt_ids, config, pool, draft_source)
        if request.room <= 0:
            request.done = True
            return request
        if past_key_values is not None:
            check_prefix_cache(past_key_values)
        joined = self.engine._prefill([request], past_key_values)
        if not self.rows:
            self.batch = joined
        else:
            self.batch.key_valid = append_rows(self.batch.cache, self.batch.key_valid, joined.cache, joined.key_valid)
            self.batch.requests.append(request)
        return request

    def step(self) -> list[tuple[_Request, StepResult]]:
        if not self.rows:
            return []
        rows = list(self.batch.requests)  # _step retires finished rows
        return list(zip(rows, self.engine._step(self.batch)))

    def remove(self, request: _Request) -> None:
        """Drops a row before it finished (its caller went away)."""
        if self.batch is not None and any(r is request for r in self.batch.requests):
            request.done = True
            self.engine._retire_finished(self.batch)
