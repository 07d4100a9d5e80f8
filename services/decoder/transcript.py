"""One request's output as its caller sees it: step results in, text deltas and a summary out.

Text is decoded from all tokens so far and released only up to the last complete character: a
multi-byte character split across steps decodes as U+FFFD until its last byte arrives, so that
trailing U+FFFD is held back (a caller that joins the deltas gets exactly the final text).
No gRPC and no clock here: the servicer passes the times in.
"""

from __future__ import annotations

from adaccel.v1 import common_pb2, records_pb2
from common.requests import block_ids_of_kind
from services.decoder.batcher import PrefillStats
from services.decoder.engine import StepResult


class Transcript:
    def __init__(self, tokenizer, *, eos_token_id: int | None, prompt_tokens: int, prepare_s: float = 0.0,
                 block_lookup_s: float = 0.0):
        """prepare_s, block_lookup_s: what the request's intake took before it was submitted."""
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (may end in a held-back U+FFFD)
        self._released = ""  # the text the deltas carried so far
        self.stats = common_pb2.GenerationStats(prompt_tokens=prompt_tokens, computed_prompt_tokens=prompt_tokens,
                                                prepare_s=prepare_s, block_lookup_s=block_lookup_s)

    @property
    def finish_reason(self) -> int:
        if self.token_ids and self.eos_token_id is not None and self.token_ids[-1] == self.eos_token_id:
            return common_pb2.FINISH_REASON_EOS
        return common_pb2.FINISH_REASON_LENGTH

    def add(self, step: StepResult, *, seconds_since_arrival: float, prefill: PrefillStats) -> common_pb2.TokenDelta:
        """The delta this step adds; the first step also fixes TTFT, where it went, and the prompt's
        KV figures."""
        stats = self.stats
        if not self.token_ids:
            stats.ttft_s = seconds_since_arrival
            stats.queue_s = prefill.queue_s
            stats.prefill_s = prefill.prefill_s
            before = stats.prepare_s + stats.block_lookup_s + prefill.queue_s + prefill.prefill_s
            stats.first_step_s = max(0.0, seconds_since_arrival - before)
            stats.cached_prompt_tokens = prefill.cached_tokens
            stats.computed_prompt_tokens = stats.prompt_tokens - prefill.cached_tokens
            stats.recomputed_prompt_tokens = prefill.recomputed_tokens
        self.token_ids.extend(step.token_ids)
        stats.accepted_per_step.append(len(step.token_ids))
        stats.drafted_per_step.append(step.drafted)
        stats.accepted_drafts_per_step.append(step.accepted)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        stable = self.text.removesuffix("\ufffd")
        delta, self._released = stable[len(self._released):], stable
        return common_pb2.TokenDelta(token_ids=step.token_ids, text=delta)

    def summary(self, *, request_id: str, total_s: float, decoder_id: str, model_id: str
                ) -> common_pb2.GenerationSummary:
        stats = self.stats
        stats.total_s = total_s
        stats.new_tokens = len(self.token_ids)
        stats.steps = len(stats.accepted_per_step)
        stats.mean_accepted_per_step = stats.new_tokens / max(stats.steps, 1)
        return common_pb2.GenerationSummary(
            request_id=request_id, text=self.text, token_ids=self.token_ids, stats=stats,
            finish_reason=self.finish_reason, decoder_id=decoder_id, model_id=model_id,
        )

    def record(self, request: common_pb2.GenerateRequest, *, request_id: str, model_id: str
               ) -> records_pb2.GeneratedRecord:
        """What goes to Kafka for the pools to learn from (services/pool/updater.py)."""
        return records_pb2.GeneratedRecord(
            request_id=request_id, pool_key=request.pool_key, task=request.task,
            item_ids=block_ids_of_kind(request, common_pb2.BLOCK_KIND_ITEM),
            user_ids=block_ids_of_kind(request, common_pb2.BLOCK_KIND_USER_HISTORY),
            token_ids=self.token_ids, text=self.text, model_id=model_id,
        )

