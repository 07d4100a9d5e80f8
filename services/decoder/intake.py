"""A Generate request turned, once, into what the decoder runs: the `PreparedRequest`.

Built on the gRPC thread from the validated request, with no model forward: the prompt's
blocks rendered through the chat template and tokenized (once), the engine's generation
config, the draft pool and the KV tokens admission reserves (`prepare`); once admitted, the
block-reuse lookup (local memory and kv-store reads, `with_blocks`) is attached. The assembly
forwards and the prefill run later, on the thread that owns the model. The PreparedRequest
flows on unchanged: servicer -> batcher -> engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from adaccel.v1 import common_pb2
from common.drafting.pool_keys import task_pool_key
from common.drafting.pools import DraftPool, PoolRegistry, tiered
from common.prompt_tokens import (
    BlockTokenizer,
    ChatFrame,
    PromptTooLong,
    TokenizedPrompt,
    leading_instructions,
    tokenize_blocks,
)
from common.rpc.errors import InvalidArgument, Reason
from services.decoder.block_cache import BlockCache, BlockPlan
from services.decoder.engine import GenerationConfig

log = logging.getLogger(__name__)

# The API's defaults of its optional fields (GenerationConfig's, DARE's run scripts: top-2, p >= 0.1).
DEFAULT_RELAXED_TOP_K = 2
DEFAULT_RELAXED_MIN_PROB = 0.1


def default_seed(request_id: str) -> int:
    """A stable per-request seed, so a retried request samples the same text."""
    return int.from_bytes(request_id.encode()[-8:].rjust(8, b"\0"), "big") & 0x7FFFFFFF


def generation_config(params: common_pb2.GenerationParams, *, request_id: str, eos_token_id: int | None
                      ) -> GenerationConfig:
    """Maps the API's parameters to the engine's. The proto3 `optional` fields (relaxed.top_k,
    relaxed.min_prob, sampling.seed) take the default only when unset, so their 0 is a value;
    in `advanced`, 0 still means "the decoder's default"."""
    relaxed = params.relaxed
    sampling = params.sampling
    advanced = params.advanced
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        mode="relaxed" if params.mode == common_pb2.VERIFICATION_MODE_RELAXED else "strict",
        relaxed_top_k=relaxed.top_k if relaxed.HasField("top_k") else DEFAULT_RELAXED_TOP_K,
        relaxed_min_prob=relaxed.min_prob if relaxed.HasField("min_prob") else DEFAULT_RELAXED_MIN_PROB,
        temperature=sampling.temperature,
        top_p=sampling.top_p if 0 < sampling.top_p < 1 else 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else default_seed(request_id),
        drafting=not advanced.disable_drafting,
        decoding_length=advanced.decoding_length or None,
        branch_length=advanced.branch_length or None,
        eos_token_id=eos_token_id,
    )


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """One request, ready to run. kv_tokens = prompt + max_new_tokens + the request's own draft
    tree + its root: the KV tokens it may hold at its last step (what admission reserves)."""

    request_id: str
    prompt: TokenizedPrompt
    config: GenerationConfig
    pool: DraftPool | None
    blocks: BlockPlan | None  # reused blocks found by the lookup (None: prefill everything)
    kv_tokens: int
    pool_key: str = ""  # the pool drafted from (the request's key, a parent or "global"; "" = none)
    task_pool_key: str = ""  # the task's pool drafted from beside it ("" = none)

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.token_ids


class PoolTracker(Protocol):
    """Keeps requested pools fresh in the background (services.decoder.pool_snapshots)."""

    def note(self, pool_key: str | None) -> None: ...

    def held_keys(self) -> list[str]: ...


class TreeSize(Protocol):
    """How many draft tokens one step of a request may feed (the engine's DecodingEngine)."""

    def tree_tokens(self, config: GenerationConfig) -> int: ...


class RequestIntake:
    """Validated GenerateRequest -> PreparedRequest (no gRPC, no model forward here)."""

    def __init__(self, tokenizer, pools: PoolRegistry, tree: TreeSize, *, max_prompt_tokens: int,
                 chat_frame: ChatFrame | None = None, pool_tracker: PoolTracker | None = None,
                 block_cache: BlockCache | None = None, context_limit: int | None = None,
                 task_pool_weight: float = 1.0):
        # Memoised per block text: the same instruction and item blocks recur across requests.
        self.block_tokenizer = BlockTokenizer(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pools = pools
        self.tree = tree
        self.max_prompt_tokens = max_prompt_tokens
        # The model's positions (max_position_embeddings), or None: unchecked. The engine never
        # drafts past max_new_tokens (depth <= room - 1), so the last position a request uses,
        # root or draft, is prompt + max_new_tokens - 1: that sum is all that must fit.
        self.context_limit = context_limit
        # The model's chat template, or None: prompts then go to the model raw.
        self.chat_frame = chat_frame
        self.pool_tracker = pool_tracker
        self.task_pool_weight = task_pool_weight  # the task pool's candidates' weight (pools.TieredPool)
        self.block_cache = block_cache

    def tokenize(self, request: common_pb2.GenerateRequest) -> TokenizedPrompt:
        """The request's blocks through the model's chat template (unless it asks for raw_prompt)."""
        blocks: Sequence[common_pb2.PromptBlock] = request.blocks
        frame = None if request.raw_prompt else self.chat_frame
        system_blocks = leading_instructions([b.kind == common_pb2.BLOCK_KIND_INSTRUCTION for b in blocks])
        try:
            return tokenize_blocks(self.block_tokenizer, [b.text for b in blocks], self.max_prompt_tokens,
                                   frame=frame, system_blocks=system_blocks)
        except PromptTooLong as exc:
            raise InvalidArgument(f"blocks: {exc}", reason=Reason.PROMPT_TOO_LONG, field="blocks",
                                  limit=self.max_prompt_tokens) from exc

    def prepare(self, request: common_pb2.GenerateRequest, request_id: str) -> PreparedRequest:
        prompt = self.tokenize(request)
        total = len(prompt.token_ids) + request.params.max_new_tokens
        if self.context_limit is not None and total > self.context_limit:
            raise InvalidArgument(
                f"params.max_new_tokens: prompt of {len(prompt.token_ids)} tokens + max_new_tokens "
                f"{request.params.max_new_tokens} = {total} passes the model's context of {self.context_limit} "
                "tokens; shorten the prompt or lower max_new_tokens",
                reason=Reason.MODEL_CONTEXT, field="params.max_new_tokens", limit=self.context_limit)
        config = generation_config(request.params, request_id=request_id, eos_token_id=self.eos_token_id)
        # The request's pool, else its parents ("a/b" -> "a"), else the global pool; the engine adds
        # a request-local overlay of the prompt's own n-grams on top and drops it afterwards. The
        # tracker only records the key (a background refresh fetches it): no RPC on this path.
        task_key = task_pool_key(request.task or None)
        if self.pool_tracker is not None:
            self.pool_tracker.note(request.pool_key or None)
            if task_key is not None:
                self.pool_tracker.note(task_key)
        pool_key = self.pools.resolve_key(request.pool_key or None)
        # Under the pool key's, the task's pool when this replica holds it (never a fallback).
        key_pool = self.pools[pool_key]
        pool = tiered(key_pool, self.pools.get(task_key), self.task_pool_weight)
        kv_tokens = len(prompt.token_ids) + config.max_new_tokens + self.tree.tree_tokens(config) + 1
        if pool_key != (request.pool_key or pool_key):
            log.debug("pool key not held here: drafting from its fallback",
                     extra={"request_id": request_id, "pool_key": request.pool_key, "pool_key_used": pool_key})
        return PreparedRequest(request_id, prompt, config, pool, None, kv_tokens,
                               pool_key=pool_key if config.drafting else "",
                               task_pool_key=task_key if config.drafting and pool is not key_pool else "")

    def with_blocks(self, prepared: PreparedRequest, request: common_pb2.GenerateRequest) -> PreparedRequest:
        """The request with its reusable blocks looked up (after admission: the lookup reads the
        kv-store and queues misses for publishing, work a rejected request must not cause)."""
        if self.block_cache is None:
            return prepared
        blocks = self.block_cache.lookup(prepared.prompt, request.blocks,
                                         reuse=not request.params.advanced.disable_block_reuse)
        return replace(prepared, blocks=blocks)

    def held_pool_keys(self) -> list[str]:
        """Pools whose snapshot this replica holds (reported to the router for affinity)."""
        return self.pool_tracker.held_keys() if self.pool_tracker is not None else []
