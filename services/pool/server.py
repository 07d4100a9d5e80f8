from __future__ import annotations

import functools

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.rpc.server import ServerHandle, create_server
from common.telemetry import Telemetry
from services.pool.metrics import PoolMetrics
from services.pool.ngram_records import generated_record_mutation, inventory_event_mutation
from services.pool.pool_manager import PoolLimits, PoolManager
from services.pool.pool_store import PoolStore
from services.pool.service import PoolService
from services.pool.settings import PoolSettings
from services.pool.updater import PoolUpdater

SERVICE_NAME = pool_pb2.DESCRIPTOR.services_by_name["Pool"].full_name


def _load_tokenizer(settings: PoolSettings):
    """The model's tokenizer and vocabulary size (the embedding size, which may exceed the tokenizer's)."""
    if settings.model_path is None:
        return None, settings.vocab_size
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model_path, local_files_only=True)
    config = AutoConfig.from_pretrained(settings.model_path, local_files_only=True)
    return tokenizer, settings.vocab_size or config.vocab_size


def pool_limits(settings: PoolSettings) -> PoolLimits:
    return PoolLimits(ngram_length=settings.ngram_length, capacity=settings.pool_capacity,
                      max_pools=settings.max_pools, squeeze_to=settings.squeeze_to,
                      input_weight=settings.input_weight, max_sequence_tokens=settings.max_sequence_tokens)


def create_pool_server(settings: PoolSettings, telemetry: Telemetry) -> ServerHandle:
    store = PoolStore(settings.data_dir / "pool")
    try:
        pools = PoolManager(store, pool_limits(settings))
        tokenizer, vocab_size = _load_tokenizer(settings)
    except BaseException:
        store.close()
        raise
    servicer = PoolService(pools, None, tokenizer=tokenizer, vocab_size=vocab_size,
                           max_tokens_per_insert=settings.max_tokens_per_insert,
                           snapshot_chunk_bytes=settings.snapshot_chunk_bytes)
    handle = create_server(settings, telemetry, [(pool_pb2_grpc.add_PoolServicer_to_server, servicer)],
                           [SERVICE_NAME])
    if settings.kafka_bootstrap:
        tokenize = None
        if tokenizer is not None:
            def tokenize(text: str) -> list[int]:
                return tokenizer(text, add_special_tokens=False)["input_ids"]
        transforms = {
            settings.kafka_generated_topic: functools.partial(
                generated_record_mutation, vocab_size=vocab_size, max_tokens=settings.max_tokens_per_insert),
            settings.kafka_inventory_topic: functools.partial(
                inventory_event_mutation, vocab_size=vocab_size, max_tokens=settings.max_tokens_per_insert,
                tokenize=tokenize),
        }
        # Serving means: the store is open and the updater is connected to the broker.
        updater = PoolUpdater(pools, settings, transforms, on_health=handle.set_serving,
                              tracer=telemetry.tracer("adaccel.pool"),
                              metrics=PoolMetrics.create(telemetry.meter("adaccel.pool")))
        servicer.updater = updater
        updater.start()
        handle.on_stop.append(updater.stop)
    else:
        handle.set_serving(True)
    handle.on_stop.append(store.close)
    return handle
