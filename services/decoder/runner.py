"""Turns a validated request into engine steps on the loaded model (no gRPC here)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from transformers import DynamicCache

from adaccel.v1 import common_pb2
from common.drafting.pools import PoolRegistry
from common.modeling.loading import LoadedModel
from common.prompt_tokens import (
    BlockTokenizer,
    ChatFrame,
    PromptTooLong,
    TokenizedPrompt,
    leading_instructions,
    tokenize_blocks,
)
from common.rpc.errors import InvalidArgument
from services.decoder.block_cache import BlockCache, PreparedPrompt
from services.decoder.engine import DecodingEngine, GenerationConfig, StepResult, TokenTrie


def generation_config(params: common_pb2.GenerationParams, *, request_id: str, eos_token_id: int | None
                      ) -> GenerationConfig:
    """Maps the API's parameters to the engine's; 0 means "the decoder's default" in the API."""
    relaxed = params.relaxed
    sampling = params.sampling
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        mode="relaxed" if params.mode == common_pb2.VERIFICATION_MODE_RELAXED else "strict",
        relaxed_top_k=relaxed.top_k or 2,
        relaxed_min_prob=relaxed.min_prob or 0.1,
        temperature=sampling.temperature,
        top_p=sampling.top_p if 0 < sampling.top_p < 1 else 1.0,
        top_k=sampling.top_k,
        # A stable per-request seed, so a retried request samples the same text.
        seed=sampling.seed or (int.from_bytes(request_id.encode()[-8:].rjust(8, b"\0"), "big") & 0x7FFFFFFF),
        drafting=not params.disable_drafting,
        decoding_length=params.decoding_length or None,
        branch_length=params.branch_length or None,
        eos_token_id=eos_token_id,
    )


@dataclass(slots=True)
class PreparedRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    pool: TokenTrie | None
    # Batch-1 cache holding the KV of a prefix of prompt_ids (block reuse), or None.
    past_key_values: DynamicCache | None = None
    cached_prompt_tokens: int = 0
    recomputed_prompt_tokens: int = 0  # cached tokens the reuse correction recomputed


class PoolTracker(Protocol):
    """Keeps requested pools fresh in the background (services.decoder.pool_snapshots)."""

    def note(self, pool_key: str | None) -> None: ...

    def held_keys(self) -> list[str]: ...


class GenerationRunner:
    def __init__(self, loaded: LoadedModel, engine: DecodingEngine, pools: PoolRegistry, *, device: str,
                 max_prompt_tokens: int, pool_tracker: PoolTracker | None = None,
                 block_cache: BlockCache | None = None, report_block_limit: int = 4096,
                 chat_frame: ChatFrame | None = None):
        self.loaded = loaded
        # The model's chat template, or None: prompts then go to the model raw.
        self.chat_frame = chat_frame
        self.block_cache = block_cache
        self.report_block_limit = report_block_limit
        # Memoised per block text: the same blocks recur, and prepare() needs the block spans again.
        self.block_tokenizer = BlockTokenizer(loaded.tokenizer)
        self.engine = engine
        self.pools = pools
        self.pool_tracker = pool_tracker
        self.device = device
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_token_id = loaded.tokenizer.eos_token_id

    def held_pool_keys(self) -> list[str]:
        """Pools whose snapshot this replica holds (reported to the router for affinity)."""
        return self.pool_tracker.held_keys() if self.pool_tracker is not None else []

    def held_blocks(self) -> tuple[list[int], list[int]]:
        """(8-byte content hashes, routing keys) of blocks whose KV this replica holds, newest first."""
        if self.block_cache is None:
            return [], []
        return self.block_cache.report(self.report_block_limit)

    def tokenize(self, request: common_pb2.GenerateRequest) -> TokenizedPrompt:
        """The request's blocks through the model's chat template (unless it asks for raw_prompt)."""
        blocks: Sequence[common_pb2.PromptBlock] = request.blocks
        frame = None if request.raw_prompt else self.chat_frame
        system_blocks = leading_instructions([b.kind == common_pb2.BLOCK_KIND_INSTRUCTION for b in blocks])
        try:
            return tokenize_blocks(self.block_tokenizer, [b.text for b in blocks], self.max_prompt_tokens,
                                   frame=frame, system_blocks=system_blocks)
        except PromptTooLong as exc:
            raise InvalidArgument(f"blocks: {exc}") from exc

    def tokenize_prompt(self, request: common_pb2.GenerateRequest) -> list[int]:
        return self.tokenize(request).token_ids

    def prepare_prompt(self, request: common_pb2.GenerateRequest, prompt_ids: list[int] | None = None
                       ) -> PreparedPrompt:
        """The request's prompt ids and the KV to start from (block reuse), with cached / computed
        token counts: see block_cache.PreparedPrompt. Runs model forwards when blocks are reused
        (the assembly). params.disable_block_reuse -> no cache, the engine prefills everything."""
        tokenized = self.tokenize(request)
        if prompt_ids is not None and tokenized.token_ids != prompt_ids:
            raise ValueError("prompt_ids do not match the request's blocks")
        if self.block_cache is None:
            ids = tokenized.token_ids
            return PreparedPrompt(ids, None, 0, len(ids))
        return self.block_cache.prepare(tokenized, request.blocks, reuse=not request.params.disable_block_reuse)

    def prepare(self, prompt_ids: list[int], request: common_pb2.GenerateRequest, request_id: str
                ) -> PreparedRequest:
        """Everything the engine needs to run the request, alone or in a batch."""
        config = generation_config(request.params, request_id=request_id, eos_token_id=self.eos_token_id)
        # The request's pool, else its parents ("a/b" -> "a"), else the global pool; the engine adds
        # a request-local overlay of the prompt's own n-grams on top and drops it afterwards. The
        # tracker only records the key (a background refresh fetches it): no RPC on this path.
        if self.pool_tracker is not None:
            self.pool_tracker.note(request.pool_key or None)
        pool = self.pools.resolve(request.pool_key or None)
        prompt = self.prepare_prompt(request, prompt_ids)
        return PreparedRequest(prompt.prompt_ids, config, pool, prompt.past_key_values, prompt.cached_tokens,
                               prompt.recomputed_tokens)

    def steps(self, prompt_ids: list[int], request: common_pb2.GenerateRequest, request_id: str
              ) -> Iterator[StepResult]:
        """The request decoded alone (batch of one)."""
        prepared = self.prepare(prompt_ids, request, request_id)
        return self.engine.generate(prepared.prompt_ids, prepared.config, prepared.pool,
                                    past_key_values=prepared.past_key_values)
