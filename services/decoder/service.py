"""Decoder gRPC servicer: validate, tokenize, run the model, stream, publish. No model logic here."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, records_pb2
from common.requests import RequestLimits, block_ids_of_kind, validate_generate_request
from common.rpc.errors import ResourceExhausted
from services.decoder.metrics import DecoderMetrics
from services.decoder.publisher import GeneratedPublisher
from services.decoder.runner import GenerationRunner

log = logging.getLogger(__name__)


class Admission:
    """Bounded admission: at most `capacity` requests inside the decoder; the rest are refused now."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self.active = 0
        self.tokens_in_flight = 0

    def enter(self, tokens: int) -> None:
        with self._lock:
            if self.active >= self.capacity:
                raise ResourceExhausted(
                    f"decoder busy: {self.active} requests admitted, limit {self.capacity}; retry after ~1s"
                )
            self.active += 1
            self.tokens_in_flight += tokens

    def leave(self, tokens: int) -> None:
        with self._lock:
            self.active -= 1
            self.tokens_in_flight -= tokens


class DecoderService(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, runner: GenerationRunner, publisher: GeneratedPublisher, *, decoder_id: str,
                 limits: RequestLimits, admission: Admission, decoding_length: int, branch_length: int,
                 metrics: DecoderMetrics):
        self.runner = runner
        self.metrics = metrics
        self.publisher = publisher
        self.decoder_id = decoder_id
        self.limits = limits
        self.admission = admission
        self.decoding_length = decoding_length
        self.branch_length = branch_length
        # One forward at a time on the model until batched verification lands.
        self._model_lock = threading.Lock()

    def Generate(self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext):
        arrived = time.perf_counter()
        validate_generate_request(request, self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        prompt_ids = self.runner.tokenize_prompt(request.blocks)
        budget = len(prompt_ids) + request.params.max_new_tokens
        self.admission.enter(budget)
        try:
            yield from self._generate(request, request_id, prompt_ids, arrived, context)
        finally:
            self.admission.leave(budget)

    def _generate(self, request, request_id, prompt_ids, arrived, context):
        tokenizer = self.runner.loaded.tokenizer
        stats = common_pb2.GenerationStats(prompt_tokens=len(prompt_ids), computed_prompt_tokens=len(prompt_ids))
        generated: list[int] = []
        text_so_far = ""
        finish = common_pb2.FINISH_REASON_LENGTH
        with self._model_lock:
            for step in self.runner.steps(prompt_ids, request, request_id):
                if not context.is_active():
                    log.info("client went away", extra={"request_id": request_id})
                    return
                if not generated:
                    stats.ttft_s = time.perf_counter() - arrived
                generated.extend(step.token_ids)
                stats.accepted_per_step.append(len(step.token_ids))
                stats.drafted_per_step.append(step.drafted)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                # Hold back an incomplete multi-byte character (decoded as U+FFFD) until it completes.
                stable = text[:-1] if text.endswith("\ufffd") else text
                delta_text, text_so_far = stable[len(text_so_far):], stable
                yield common_pb2.GenerateChunk(delta=common_pb2.TokenDelta(token_ids=step.token_ids, text=delta_text))
                if generated[-1] == self.runner.eos_token_id:
                    finish = common_pb2.FINISH_REASON_EOS
        stats.total_s = time.perf_counter() - arrived
        stats.new_tokens = len(generated)
        stats.steps = len(stats.accepted_per_step)
        stats.mean_accepted_per_step = stats.new_tokens / max(stats.steps, 1)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        self.metrics.record(stats, common_pb2.VerificationMode.Name(request.params.mode))
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
        return decoder_pb2.DecoderReport(
            decoder_id=self.decoder_id, queue_depth=self.admission.active,
            tokens_in_flight=self.admission.tokens_in_flight, pool_keys=self.runner.held_pool_keys(),
        )
