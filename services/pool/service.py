"""Pool gRPC servicer: validate, call the pool manager, build the reply. No pool logic here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.drafting.geometry import DEFAULT_GEOMETRY, DraftGeometry
from common.drafting.pool_keys import GLOBAL_POOL
from common.requests import BLOCK_ID_PATTERN, POOL_KEY_PATTERN, RequestLimits
from common.rpc.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    require,
)
from services.pool.ngram_records import RejectedRecord, check_token_ids
from services.pool.pool_manager import PoolManager, UnknownPool
from services.pool.pool_meta import PoolMeta
from services.pool.updater import PoolUpdater

DEFAULT_DECODING_LENGTH = DEFAULT_GEOMETRY.decoding_length  # RetrieveDrafts' defaults: the one geometry
DEFAULT_BRANCH_LENGTH = DEFAULT_GEOMETRY.branch_length
DEFAULT_KEY_LENGTH = DEFAULT_GEOMETRY.key_length
MAX_KEY_LENGTH = 8
MAX_VERSION_KEYS = 1024
_KINDS = {pool_pb2.SEQUENCE_KIND_UNSPECIFIED: "output", pool_pb2.SEQUENCE_KIND_OUTPUT: "output",
          pool_pb2.SEQUENCE_KIND_INPUT: "input"}


def _require_pool_key(pool_key: str, field: str = "pool_key", *, allow_empty: bool) -> str:
    require((allow_empty or bool(pool_key)) and bool(POOL_KEY_PATTERN.match(pool_key)), field,
            "1-128 characters of letters, digits and _.-/")
    return pool_key or GLOBAL_POOL


def _pool_info(meta: PoolMeta) -> pool_pb2.PoolInfo:
    return pool_pb2.PoolInfo(pool_key=meta.pool_key, version=meta.version, nodes=meta.nodes,
                             capacity=meta.capacity, updated_at=meta.updated_at, squeezes=meta.squeezes,
                             sequences=meta.sequences, sequence_tokens=meta.sequence_tokens,
                             bytes=meta.size_bytes)


def _require_tokens(token_ids: Sequence[int], vocab_size: int, field: str) -> None:
    try:
        check_token_ids(token_ids, vocab_size, field)
    except RejectedRecord as exc:
        raise InvalidArgument(str(exc), field=field) from exc


class PoolService(pool_pb2_grpc.PoolServicer):
    def __init__(self, pools: PoolManager, updater: PoolUpdater | None, *, tokenizer, vocab_size: int,
                 max_tokens_per_insert: int, snapshot_chunk_bytes: int = 1 << 20,
                 limits: RequestLimits | None = None):
        self.pools = pools
        self.updater = updater
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_tokens_per_insert = max_tokens_per_insert
        self.snapshot_chunk_bytes = snapshot_chunk_bytes
        self.limits = limits or RequestLimits()

    def RetrieveDrafts(self, request: pool_pb2.RetrieveDraftsRequest, context) -> pool_pb2.DraftTree:
        pool_key = _require_pool_key(request.pool_key, allow_empty=True)
        limits = self.limits
        require(0 <= request.decoding_length <= limits.max_decoding_length, "decoding_length",
                f"must be in 0..{limits.max_decoding_length} (0 = {DEFAULT_DECODING_LENGTH})")
        require(0 <= request.branch_length <= limits.max_branch_length, "branch_length",
                f"must be in 0..{limits.max_branch_length} (0 = {DEFAULT_BRANCH_LENGTH})")
        require(0 <= request.key_length <= MAX_KEY_LENGTH, "key_length",
                f"must be in 0..{MAX_KEY_LENGTH} (0 = {DEFAULT_KEY_LENGTH})")
        if len(request.context) > self.max_tokens_per_insert:
            raise ResourceExhausted(
                f"context: {len(request.context)} tokens, limit is {self.max_tokens_per_insert}",
                field="context", limit=self.max_tokens_per_insert)
        _require_tokens(request.context, self.vocab_size, "context")
        try:
            used, version, tree = self.pools.retrieve(
                pool_key, list(request.context), decoding_length=request.decoding_length or DEFAULT_DECODING_LENGTH,
                branch_length=request.branch_length or DEFAULT_BRANCH_LENGTH,
                key_length=request.key_length or DEFAULT_KEY_LENGTH, exact=request.exact)
        except UnknownPool:
            raise NotFound(f"pool_key: no pool {pool_key!r} (exact lookup; set exact=false to fall back)",
                           reason=Reason.POOL_NOT_FOUND, field="pool_key") from None
        return pool_pb2.DraftTree(tokens=tree.tokens, parents=tree.parents, scores=tree.scores,
                                  pool_version=version, pool_key=used)

    def GetSnapshot(self, request: pool_pb2.SnapshotRequest, context) -> Iterator[pool_pb2.SnapshotChunk]:
        pool_key = _require_pool_key(request.pool_key, allow_empty=True)
        require(request.have_version >= 0, "have_version", "must be >= 0")
        meta = self.pools.meta(pool_key)
        if meta is None:
            raise NotFound(f"pool_key: no pool {pool_key!r}", reason=Reason.POOL_NOT_FOUND, field="pool_key")
        if request.have_version and request.have_version == meta.version:
            yield pool_pb2.SnapshotChunk(header=pool_pb2.SnapshotHeader(
                pool_key=pool_key, version=meta.version, total_bytes=0, nodes=meta.nodes))
            return
        try:
            snapshot = self.pools.snapshot(pool_key)
        except UnknownPool:  # evicted between the two calls
            raise NotFound(f"pool_key: no pool {pool_key!r}", reason=Reason.POOL_NOT_FOUND,
                           field="pool_key") from None
        data = snapshot.data
        yield pool_pb2.SnapshotChunk(header=pool_pb2.SnapshotHeader(
            pool_key=pool_key, version=snapshot.version, total_bytes=len(data), nodes=snapshot.nodes))
        view = memoryview(data)
        for start in range(0, len(data), self.snapshot_chunk_bytes):
            yield pool_pb2.SnapshotChunk(data=bytes(view[start:start + self.snapshot_chunk_bytes]))

    def Insert(self, request: pool_pb2.InsertRequest, context) -> pool_pb2.InsertReply:
        pool_key = _require_pool_key(request.pool_key, allow_empty=False)
        if request.item_id:
            require(bool(BLOCK_ID_PATTERN.match(request.item_id)), "item_id",
                    "1-128 characters of letters, digits and _.:-/")
        require(request.kind in _KINDS, "kind", "unknown sequence kind")
        total = sum(len(s.token_ids) for s in request.sequences) + sum(len(t) for t in request.texts) // 8
        if total > self.max_tokens_per_insert:  # before tokenizing: refuse huge texts cheaply
            raise ResourceExhausted(
                f"sequences: at least {total} tokens, limit is {self.max_tokens_per_insert}",
                field="sequences", limit=self.max_tokens_per_insert)
        sequences = [list(s.token_ids) for s in request.sequences]
        for i, seq in enumerate(sequences):
            _require_tokens(seq, self.vocab_size, f"sequences[{i}]")
        if request.texts:
            if self.tokenizer is None:
                raise FailedPrecondition("texts: this pool service has no tokenizer (set ADACCEL_MODEL_PATH)",
                                         reason=Reason.NO_TOKENIZER, field="texts")
            sequences += [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in request.texts]
        total = sum(len(s) for s in sequences)
        require(total > 0, "sequences", "nothing to insert")
        if total > self.max_tokens_per_insert:
            raise ResourceExhausted(f"sequences: {total} tokens, limit is {self.max_tokens_per_insert}",
                                    field="sequences", limit=self.max_tokens_per_insert)
        meta = self.pools.insert(pool_key, sequences, _KINDS[request.kind],
                                 item_ids=(request.item_id,) if request.item_id else ())
        if meta is None:  # about an item removed from the inventory: ignored
            meta = self.pools.meta(pool_key) or PoolMeta(pool_key)
        return pool_pb2.InsertReply(version=meta.version, nodes=meta.nodes)

    def DeleteItem(self, request: pool_pb2.DeleteItemRequest, context) -> pool_pb2.DeleteItemReply:
        require(bool(BLOCK_ID_PATTERN.match(request.item_id)), "item_id",
                "1-128 characters of letters, digits and _.:-/")
        pool_key = None
        if request.pool_key:
            pool_key = _require_pool_key(request.pool_key, allow_empty=False)
            if pool_key not in self.pools:
                raise NotFound(f"pool_key: no pool {pool_key!r}", reason=Reason.POOL_NOT_FOUND,
                               field="pool_key")
        before = {m.pool_key: m.sequences for m in self.pools.metas()}
        metas = self.pools.remove_item(request.item_id, pool_key)
        return pool_pb2.DeleteItemReply(
            sequences_removed=sum(before.get(m.pool_key, 0) - m.sequences for m in metas),
            pools=[pool_pb2.PoolVersion(pool_key=m.pool_key, resolved_key=m.pool_key, version=m.version,
                                        nodes=m.nodes) for m in metas])

    def GetVersions(self, request: pool_pb2.VersionsRequest, context) -> pool_pb2.VersionsReply:
        if len(request.pool_keys) > MAX_VERSION_KEYS:
            raise ResourceExhausted(f"pool_keys: {len(request.pool_keys)} keys, limit is {MAX_VERSION_KEYS}",
                                    field="pool_keys", limit=MAX_VERSION_KEYS)
        reply = pool_pb2.VersionsReply()
        for i, key in enumerate(request.pool_keys):
            _require_pool_key(key, f"pool_keys[{i}]", allow_empty=True)
            resolved = self.pools.resolve(key)
            meta = self.pools.meta(resolved)
            reply.pools.append(pool_pb2.PoolVersion(
                pool_key=key, resolved_key=resolved, version=meta.version if meta else 0,
                nodes=meta.nodes if meta else 0))
        return reply

    def Stats(self, request, context) -> pool_pb2.PoolStats:
        updater = self.updater
        limits = self.pools.limits
        return pool_pb2.PoolStats(
            pools=[_pool_info(m) for m in self.pools.metas() if m.version > 0],
            records_ingested=updater.records_ingested if updater else 0,
            records_dead_lettered=updater.records_dead_lettered if updater else 0,
            ingest_lag_s=updater.last_lag_s if updater else 0.0,
            tokens_ingested=updater.tokens_ingested if updater else 0,
            inventory_events=updater.inventory_events if updater else 0,
            pools_evicted=self.pools.pools_evicted,
            max_pools=limits.max_pools,
            pool_capacity=limits.capacity,
            disk_bytes=self.pools.store.disk_bytes(),
        )

    # ---- draft geometry (issue 17 item 4): advertised, so decoders can check theirs against it
    @property
    def geometry(self) -> DraftGeometry:
        """The n-gram length the pools store; key and tree size are RetrieveDrafts' defaults."""
        return replace(DEFAULT_GEOMETRY, ngram_length=self.pools.limits.ngram_length)

    def Info(self, request: pool_pb2.PoolServiceInfoRequest, context) -> pool_pb2.PoolServiceInfo:
        g = self.geometry
        return pool_pb2.PoolServiceInfo(geometry=pool_pb2.DraftGeometry(
            key_length=g.key_length, ngram_length=g.ngram_length, decoding_length=g.decoding_length,
            branch_length=g.branch_length))
