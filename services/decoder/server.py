"""Builds the decoder server from its settings: model, publisher, servicer, gRPC plumbing."""

from __future__ import annotations

import logging

import torch

from adaccel.v1 import decoder_pb2, decoder_pb2_grpc, pool_pb2_grpc
from common.drafting.pools import PoolRegistry
from common.kafka_io import ensure_topics, make_producer
from common.modeling.dtypes import serving_dtype
from common.modeling.loading import load_model
from common.prompt_tokens import ChatFrame, chat_frame
from common.requests import RequestLimits
from common.rpc.channels import open_channel
from common.rpc.security import client_security
from common.rpc.server import ServerHandle, create_server
from common.telemetry import Telemetry
from kernels.backend import resolve_backend
from services.decoder.batcher import Batcher, KvAdmission, kv_bytes_per_token
from services.decoder.cost_profile import startup_cost_model
from services.decoder.engine import DecodingEngine, EngineSettings
from services.decoder.intake import RequestIntake
from services.decoder.metrics import DecoderMetrics
from services.decoder.pool_snapshots import PoolSnapshots
from services.decoder.publisher import GeneratedPublisher
from services.decoder.reuse_setup import create_block_cache
from services.decoder.service import DecoderService
from services.decoder.settings import DecoderSettings

log = logging.getLogger(__name__)
SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name


def prompt_frame(settings: DecoderSettings, loaded) -> ChatFrame | None:
    """The chat template prompts are rendered with, or None (raw prompts), said in the log."""
    frame = chat_frame(loaded.tokenizer) if settings.chat_template else None
    if frame is None:
        why = "chat_template is off" if not settings.chat_template else "the tokenizer has no chat template"
        log.info("prompts go to the model raw", extra={"reason": why, "model_id": loaded.model_id})
    return frame


def create_decoder_server(settings: DecoderSettings, telemetry: Telemetry) -> ServerHandle:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    dtype = serving_dtype(settings.dtype, settings.device)
    kernel_backend = resolve_backend(settings.kernel_backend, settings.device)  # refuses a backend that cannot run
    loaded = load_model(settings.model_path, device=settings.device, dtype=dtype)
    log.info("model loaded", extra={"model_id": loaded.model_id, "device": settings.device,
                                    "dtype": str(dtype).removeprefix("torch."), "kernel_backend": kernel_backend})
    if loaded.random_weights:
        log.warning("model has RANDOM weights (a stand-in): outputs and acceptance figures mean nothing",
                    extra={"model_id": loaded.model_id})
    def connect_producer():
        ensure_topics(settings, [settings.kafka_generated_topic])
        return make_producer(settings)

    producer = None
    if settings.kafka_bootstrap:
        try:
            producer = connect_producer()
        except Exception as exc:  # noqa: BLE001 - NoBrokersAvailable: serve anyway, publishing retried
            log.warning("kafka unreachable; generations are not published until it is back",
                        extra={"error": repr(exc)})
    tracer = telemetry.tracer("adaccel.decoder")
    publisher = GeneratedPublisher(producer, settings.kafka_generated_topic, tracer=tracer,
                                   new_producer=connect_producer if settings.kafka_bootstrap else None)
    limits = RequestLimits(max_blocks=settings.max_blocks, max_new_tokens=settings.max_new_tokens)
    adaptive = settings.adaptive_drafting
    decoding_length, branch_length = settings.draft_geometry.tree_caps(adaptive)
    engine = DecodingEngine(loaded.model, EngineSettings(
        decoding_length=decoding_length, branch_length=branch_length,
        pad_token_id=loaded.tokenizer.pad_token_id or 0, adaptive=adaptive, lean_forward=settings.lean_forward,
        confidence_weights=settings.confidence_weights, adaptive_draft_margin=settings.adaptive_draft_margin),
        cost_model=startup_cost_model(settings, loaded) if adaptive else None)
    snapshots = pool_channel = None
    pools = PoolRegistry()
    if settings.pool_addr:
        # Pool snapshots refreshed in the background; requests never wait for the pool service.
        pool_channel = open_channel(settings.pool_addr, tracer_provider=telemetry.tracer_provider,
                                    max_message_bytes=settings.max_message_bytes, security=client_security(settings))
        snapshots = PoolSnapshots(pool_pb2_grpc.PoolStub(pool_channel), refresh_s=settings.pool_refresh_s,
                                  max_pools=settings.pool_cache_pools, tracer=tracer,
                                  geometry=settings.draft_geometry)
        pools = snapshots.registry
    admission = KvAdmission(budget_bytes=int(settings.kv_budget_mb * (1 << 20)),
                            bytes_per_token=kv_bytes_per_token(loaded.model), max_requests=settings.max_queue)
    # Prompt blocks' KV from local memory / the kv-store; the accuracy gate may turn reuse off.
    block_cache, block_cache_closers = create_block_cache(settings, loaded, tracer_provider=telemetry.tracer_provider,
                                                          security=client_security(settings))
    # The batcher's thread is the model's one owner: block assembly, prefill, steps, publishing.
    batcher = Batcher(engine, admission, max_batch_size=settings.max_batch_size, block_cache=block_cache,
                      prefill_chunk_tokens=settings.prefill_chunk_tokens).start()
    intake = RequestIntake(loaded.tokenizer, pools, engine, max_prompt_tokens=settings.max_prompt_tokens,
                           chat_frame=prompt_frame(settings, loaded), pool_tracker=snapshots, block_cache=block_cache,
                           context_limit=getattr(loaded.model.config, "max_position_embeddings", None),
                           task_pool_weight=settings.task_pool_weight)
    info = decoder_pb2.DecoderInfo(
        decoder_id=settings.decoder_id, model_id=loaded.model_id, vocab_size=loaded.model.config.vocab_size,
        max_prompt_tokens=settings.max_prompt_tokens, max_new_tokens=limits.max_new_tokens,
        # What the engine runs: the adaptive caps when drafting is adaptive, else the fixed tree.
        decoding_length=engine.settings.decoding_length, branch_length=engine.settings.branch_length,
        device=settings.device, random_weights=loaded.random_weights,
    )
    decoder = DecoderService(
        intake, batcher, publisher, info=info, limits=limits,
        metrics=DecoderMetrics.create(telemetry.meter("adaccel.decoder")), tokenizer=loaded.tokenizer,
        block_cache=block_cache, report_block_limit=settings.report_block_limit,
    )
    decoder.metrics.observe_load(queue_depth=lambda: admission.active,
                                 tokens_in_flight=lambda: admission.tokens_in_flight, batch_size=lambda: batcher.rows)
    if block_cache is not None:
        decoder.metrics.observe_block_cache(block_cache)
    handle = create_server(settings, telemetry, [(decoder_pb2_grpc.add_DecoderServicer_to_server, decoder)],
                           [SERVICE_NAME])
    if not info.decoder_id:
        info.decoder_id = f"decoder-{handle.port}"
    handle.on_stop.append(batcher.stop)
    handle.on_stop.append(publisher.close)
    handle.on_stop.extend(block_cache_closers)
    if snapshots is not None:
        snapshots.start()
        handle.on_stop.append(snapshots.stop)
        handle.on_stop.append(pool_channel.close)
    handle.set_serving(True)
    return handle
