"""Pool gRPC servicer: insert and stats now; draft retrieval and snapshots come with the pool issue."""

from __future__ import annotations

import grpc

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.requests import POOL_KEY_PATTERN
from common.rpc.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, require
from services.pool.ngram_records import RejectedRecord, check_token_ids, ngram_node_increments
from services.pool.pool_store import PoolStore
from services.pool.updater import PoolUpdater


class PoolService(pool_pb2_grpc.PoolServicer):
    def __init__(self, store: PoolStore, updater: PoolUpdater | None, *, tokenizer, vocab_size: int,
                 ngram_length: int, max_tokens_per_insert: int):
        self.store = store
        self.updater = updater
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.ngram_length = ngram_length
        self.max_tokens_per_insert = max_tokens_per_insert

    def Insert(self, request: pool_pb2.InsertRequest, context: grpc.ServicerContext):
        require(bool(request.pool_key) and bool(POOL_KEY_PATTERN.match(request.pool_key)), "pool_key",
                "1-128 characters of letters, digits and _.-/")
        sequences = [list(s.token_ids) for s in request.sequences]
        if request.texts:
            if self.tokenizer is None:
                raise FailedPrecondition("texts: this pool service has no tokenizer (set ADACCEL_MODEL_PATH)")
            sequences += [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in request.texts]
        total = sum(len(s) for s in sequences)
        require(total > 0, "sequences", "nothing to insert")
        if total > self.max_tokens_per_insert:
            raise ResourceExhausted(f"sequences: {total} tokens, limit is {self.max_tokens_per_insert}")
        for i, seq in enumerate(sequences):
            try:
                check_token_ids(seq, self.vocab_size, f"sequences[{i}]")
            except RejectedRecord as exc:
                raise InvalidArgument(str(exc)) from exc
        info = self.store.apply(request.pool_key, ngram_node_increments(sequences, self.ngram_length))
        return pool_pb2.InsertReply(version=info.version, nodes=info.nodes)

    def Stats(self, request, context):
        updater = self.updater
        return pool_pb2.PoolStats(
            pools=self.store.pools(),
            records_ingested=updater.records_ingested if updater else 0,
            records_dead_lettered=updater.records_dead_lettered if updater else 0,
            ingest_lag_s=updater.last_lag_s if updater else 0.0,
        )
