"""Decoder gRPC servicer: validate, prepare, admit, stream, publish. No model logic here.

A request is prepared once (services/decoder/intake.py: tokenized, configured, its blocks
looked up), admitted (RESOURCE_EXHAUSTED with a retry-after-ms hint when the KV budget or the
admitted count is full), handed to the Batcher (the thread that owns the model), and its step
results are streamed back through a Transcript (services/decoder/transcript.py).
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from common.requests import RequestLimits, validate_generate_request
from services.decoder.batcher import Batcher
from services.decoder.block_cache import BlockCache
from services.decoder.intake import RequestIntake
from services.decoder.metrics import DecoderMetrics, verification_mode
from services.decoder.publisher import GeneratedPublisher
from services.decoder.transcript import Transcript

log = logging.getLogger(__name__)


class DecoderService(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, intake: RequestIntake, batcher: Batcher, publisher: GeneratedPublisher, *,
                 info: decoder_pb2.DecoderInfo, limits: RequestLimits, metrics: DecoderMetrics,
                 tokenizer, block_cache: BlockCache | None = None, report_block_limit: int = 4096):
        self.intake = intake
        self.batcher = batcher
        self.admission = batcher.admission
        self.publisher = publisher
        self.info = info  # what Info answers (the decoder id is filled in once the port is known)
        self.limits = limits
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.block_cache = block_cache
        self.report_block_limit = report_block_limit

    @property
    def decoder_id(self) -> str:
        return self.info.decoder_id

    def Generate(self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext):
        arrived = time.perf_counter()
        validate_generate_request(request, self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        prepared = self.intake.prepare(request, request_id)
        ticket = self.batcher.admit(prepared.kv_tokens)
        admitted = time.perf_counter()
        # The RPC ending early (client gone, deadline passed) takes the request out of the batch.
        if not context.add_callback(ticket.cancel):
            ticket.cancel()
        try:
            with_blocks = self.intake.with_blocks(prepared, request)
            self.batcher.submit(ticket, with_blocks)
            transcript = Transcript(self.tokenizer, eos_token_id=self.intake.eos_token_id,
                                    prompt_tokens=len(prepared.prompt_ids), prepare_s=admitted - arrived,
                                    block_lookup_s=ticket.submitted_at - admitted)
            transcript.stats.pool_key_used = prepared.pool_key
            transcript.stats.task_pool_key_used = prepared.task_pool_key
            for step in ticket:
                delta = transcript.add(step, seconds_since_arrival=time.perf_counter() - arrived,
                                       prefill=ticket.prefill)
                yield common_pb2.GenerateChunk(delta=delta)
            if ticket.cancelled.is_set():
                log.info("request ended before it finished (client gone or deadline)",
                         extra={"request_id": request_id})
                return
            model_id = self.info.model_id
            summary = transcript.summary(request_id=request_id, total_s=time.perf_counter() - arrived,
                                         decoder_id=self.decoder_id, model_id=model_id)
            self.metrics.record(summary.stats, verification_mode(request.params),
                                drafting=not request.params.advanced.disable_drafting)
            if request.publish:
                self.publisher.publish(transcript.record(request, request_id=request_id, model_id=model_id))
            yield common_pb2.GenerateChunk(summary=summary)
        finally:
            self.batcher.close(ticket)

    def Info(self, request, context):
        return self.info

    def Report(self, request, context):
        block_hashes, block_keys = ([], []) if self.block_cache is None else self.block_cache.report(
            self.report_block_limit)
        return decoder_pb2.DecoderReport(
            decoder_id=self.decoder_id, queue_depth=self.admission.active,
            tokens_in_flight=self.admission.tokens_in_flight, pool_keys=self.intake.held_pool_keys(),
            prefill_tokens_pending=self.batcher.prefill_tokens_pending,
            block_hashes=block_hashes, block_keys=block_keys,
        )
