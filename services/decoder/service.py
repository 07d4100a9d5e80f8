"""Decoder gRPC servicer: validate, tokenize, admit, stream, publish. No model logic here.

Requests are decoded together by the Batcher (services/decoder/batcher.py): Generate admits the
request (RESOURCE_EXHAUSTED with a retry-after-ms hint when the KV budget or the admitted
count is full), hands it over, and streams the step results its ticket receives.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, records_pb2
from common.requests import RequestLimits, block_ids_of_kind, validate_generate_request
from services.decoder.batcher import Batcher, Ticket
from services.decoder.metrics import DecoderMetrics, verification_mode
from services.decoder.publisher import GeneratedPublisher
from services.decoder.runner import GenerationRunner, PreparedRequest

log = logging.getLogger(__name__)


class DecoderService(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, runner: GenerationRunner, publisher: GeneratedPublisher, *, decoder_id: str,
                 limits: RequestLimits, batcher: Batcher, decoding_length: int, branch_length: int,
                 metrics: DecoderMetrics):
        self.runner = runner
        self.metrics = metrics
        self.publisher = publisher
        self.decoder_id = decoder_id
        self.limits = limits
        self.batcher = batcher
        self.admission = batcher.admission
        self.decoding_length = decoding_length
        self.branch_length = branch_length

    def Generate(self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext):
        arrived = time.perf_counter()
        validate_generate_request(request, self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        prompt_ids = self.runner.tokenize_prompt(request)
        ticket = self.batcher.admit(len(prompt_ids), request.params.max_new_tokens)
        # The RPC ending early (client gone, deadline passed) takes the request out of the batch.
        if not context.add_callback(ticket.cancel):
            ticket.cancel()
        try:
            prepared = self.runner.prepare(prompt_ids, request, request_id)
            self.batcher.submit(ticket, prepared.prompt_ids, prepared.config, prepared.pool,
                                prepared.past_key_values)
            yield from self._generate(request, request_id, prepared, ticket, arrived, context)
        finally:
            self.batcher.close(ticket)

    def _generate(self, request, request_id, prepared: PreparedRequest, ticket: Ticket, arrived, context):
        tokenizer = self.runner.loaded.tokenizer
        prompt_ids = prepared.prompt_ids
        stats = common_pb2.GenerationStats(prompt_tokens=len(prompt_ids),
                                           cached_prompt_tokens=prepared.cached_prompt_tokens,
                                           computed_prompt_tokens=len(prompt_ids) - prepared.cached_prompt_tokens,
                                           recomputed_prompt_tokens=prepared.recomputed_prompt_tokens)
        generated: list[int] = []
        text, text_so_far = "", ""
        finish = common_pb2.FINISH_REASON_LENGTH
        for step in ticket:
            if not generated:
                stats.ttft_s = time.perf_counter() - arrived
            generated.extend(step.token_ids)
            stats.accepted_per_step.append(len(step.token_ids))
            stats.drafted_per_step.append(step.drafted)
            stats.accepted_drafts_per_step.append(step.accepted)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            # Hold back an incomplete multi-byte character (decoded as U+FFFD) until it completes.
            stable = text[:-1] if text.endswith("\ufffd") else text
            delta_text, text_so_far = stable[len(text_so_far):], stable
            yield common_pb2.GenerateChunk(delta=common_pb2.TokenDelta(token_ids=step.token_ids, text=delta_text))
            if generated[-1] == self.runner.eos_token_id:
                finish = common_pb2.FINISH_REASON_EOS
        if ticket.cancelled.is_set():
            log.info("request ended before it finished (client gone or deadline)", extra={"request_id": request_id})
            return
        stats.total_s = time.perf_counter() - arrived
        stats.new_tokens = len(generated)
        stats.steps = len(stats.accepted_per_step)
        stats.mean_accepted_per_step = stats.new_tokens / max(stats.steps, 1)
        self.metrics.record(stats, verification_mode(request.params), drafting=not request.params.disable_drafting)
        summary = common_pb2.GenerationSummary(
            request_id=request_id, text=text, token_ids=generated, stats=stats, finish_reason=finish,
            decoder_id=self.decoder_id, model_id=self.runner.loaded.model_id,
        )
        if request.publish:
            self.publisher.publish(records_pb2.GeneratedRecord(
                request_id=request_id, pool_key=request.pool_key,
                item_ids=block_ids_of_kind(request, common_pb2.BLOCK_KIND_ITEM),
                user_ids=block_ids_of_kind(request, common_pb2.BLOCK_KIND_USER_HISTORY),
                token_ids=generated, text=text, model_id=self.runner.loaded.model_id,
            ))
        yield common_pb2.GenerateChunk(summary=summary)

    def Info(self, request, context):
        loaded = self.runner.loaded
        return decoder_pb2.DecoderInfo(
            decoder_id=self.decoder_id, model_id=loaded.model_id, vocab_size=loaded.model.config.vocab_size,
            max_prompt_tokens=self.runner.max_prompt_tokens, max_new_tokens=self.limits.max_new_tokens,
            decoding_length=self.decoding_length, branch_length=self.branch_length,
            device=self.runner.device, random_weights=loaded.random_weights,
        )

    def Report(self, request, context):
        block_hashes, block_keys = self.runner.held_blocks()
        return decoder_pb2.DecoderReport(
            decoder_id=self.decoder_id, queue_depth=self.admission.active,
            tokens_in_flight=self.admission.tokens_in_flight, pool_keys=self.runner.held_pool_keys(),
            block_hashes=block_hashes, block_keys=block_keys,
        )
