"""Beyond-prefix KV reuse in the decoder: find each prompt block's KV, assemble, hand the engine a cache.

For one request (`BlockCache.prepare`):
  1. The prompt is split into its blocks (tokenized one by one, common/prompt_tokens.py). Free
     text and blocks shorter than `min_block_tokens` are never cached; the trailing run of them
     (the question) is the tail, always computed (if the prompt ends with a cacheable block, that
     block is the tail).
  2. Each cacheable block is looked up by its content hash (common/blocks/hashing.py): local
     memory first (`LocalBlockMemory`: an LRU by bytes; user histories and instructions in a tier
     of their own that item traffic cannot evict, RcLLM's replication), then the kv-store shards
     the placement names (`KvStoreClient`: one Contains per shard, then chunked Gets in parallel,
     each with a timeout; a shard that fails is skipped for a back-off period, so a kv-store that
     is down costs one timeout, not one per request). A block read from the store is checked
     (model, hash, dtype, shape, checksum) and kept locally.
  3. A block found nowhere is computed in context by this request (exact) and, off the critical
     path, computed standalone at position 0 by a background worker and published to local
     memory and the kv-store (`BlockPublisher`).
  4. Hits and misses are assembled (common/blocks/assembly.py) in the serving mode, which the
     per-model accuracy gate (common/blocks/calibration.py) may have turned into "full".

The result, `PreparedPrompt`, is what the engine takes: the prompt ids and a batch-1 DynamicCache
holding the KV of the prompt (the engine re-runs the last token as its first root), or None when
nothing was reused (the engine prefills the whole prompt itself).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from transformers import DynamicCache

from adaccel.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from common.blocks.assembly import BlockKV, assemble, compute_block_kv
from common.blocks.hashing import BlockHash, BlockKind, block_hash, tokenizer_fingerprint
from common.blocks.placement import REPLICATED_KINDS, Placement
from common.blocks.routing_keys import routing_key
from common.prompt_tokens import TokenizedPrompt
from common.rpc.streams import join_header_stream
from common.telemetry import carry_context

log = logging.getLogger(__name__)

KIND_OF_PROTO = {
    common_pb2.BLOCK_KIND_INSTRUCTION: BlockKind.INSTRUCTION,
    common_pb2.BLOCK_KIND_USER_HISTORY: BlockKind.USER_HISTORY,
    common_pb2.BLOCK_KIND_ITEM: BlockKind.ITEM,
    common_pb2.BLOCK_KIND_TEXT: BlockKind.FREE_TEXT,
}


@dataclass(frozen=True)
class PreparedPrompt:
    """What the engine needs to start a request (the batcher's entry point as well).

    prompt_ids: the prompt's token ids.
    past_key_values: batch-1 DynamicCache with the KV of prompt_ids[:k] for some k <= len
        (here k = len: the engine crops the last token and recomputes it as its first root),
        or None: the engine prefills everything.
    cached_tokens: prompt tokens whose KV came from a block cache hit (recomputed ones included).
    computed_tokens: prompt tokens computed because nothing was cached for them (misses, tail);
        cached_tokens + computed_tokens == len(prompt_ids).
    recomputed_tokens: cached tokens recomputed by the correction (CacheBlend / EPIC picks).
    mode: the assembly mode that ran ("full" when nothing was reused).
    """

    prompt_ids: list[int]
    past_key_values: DynamicCache | None
    cached_tokens: int
    computed_tokens: int
    recomputed_tokens: int = 0
    mode: str = "full"


@dataclass(frozen=True)
class ReuseSettings:
    mode: str = "epic"  # full | reuse | cacheblend | epic
    recompute_ratio: float = 0.15
    check_layer: int = 1
    epic_tokens: int = 16
    min_block_tokens: int = 4


class CorruptBlock(ValueError):
    """A stored block that does not match what was asked for (model, hash, dtype, shape, checksum)."""


# ----------------------------------------------------------------------------- tensor codec


def kv_checksum(data: bytes) -> int:
    """The kv-store's checksum rule (services/kvstore/block_store.py): CRC-32 of the raw bytes."""
    return zlib.crc32(data) & 0xFFFFFFFF


def cache_model_key(model_id: str, dtype: torch.dtype) -> str:
    """What block KV and the accuracy gate are keyed by: the model and its dtype."""
    return f"{model_id}:{dtype_name(dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_block(kv: BlockKV, *, hash_: BlockHash, model_id: str) -> tuple[kvstore_pb2.KvHeader, bytes]:
    """One tensor [layers, 2 (K, V), kv_heads, tokens, head_dim], raw bytes in C order."""
    stacked = torch.stack([torch.stack((k[0], v[0])) for k, v in zip(kv.keys, kv.values, strict=True)])
    stacked = stacked.detach().to("cpu").contiguous()
    data = stacked.view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
    header = kvstore_pb2.KvHeader(
        block_hash=hash_, model_id=model_id, dtype=dtype_name(stacked.dtype), shape=list(stacked.shape),
        total_bytes=len(data), checksum=kv_checksum(data), num_tokens=kv.num_tokens,
    )
    return header, data


def decode_block(header: kvstore_pb2.KvHeader, data: bytes, *, hash_: BlockHash, model_id: str,
                 expected_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> BlockKV:
    """Checks every field against what the caller expects; raises CorruptBlock on any mismatch."""
    if header.block_hash != hash_:
        raise CorruptBlock("block hash differs from the one asked for")
    if header.model_id != model_id:
        raise CorruptBlock(f"block of model {header.model_id!r}, expected {model_id!r}")
    if header.dtype != dtype_name(dtype):
        raise CorruptBlock(f"dtype {header.dtype!r}, expected {dtype_name(dtype)!r}")
    if tuple(header.shape) != expected_shape or header.num_tokens != expected_shape[3]:
        raise CorruptBlock(f"shape {list(header.shape)}, expected {list(expected_shape)}")
    if len(data) != header.total_bytes or len(data) != np.prod(expected_shape) * dtype.itemsize:
        raise CorruptBlock(f"{len(data)} bytes, header says {header.total_bytes}")
    if kv_checksum(data) != header.checksum:
        raise CorruptBlock("checksum mismatch")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(expected_shape)
    tensor = tensor.to(device)
    return BlockKV(
        keys=tuple(tensor[layer, 0][None] for layer in range(expected_shape[0])),
        values=tuple(tensor[layer, 1][None] for layer in range(expected_shape[0])),
    )


def block_nbytes(kv: BlockKV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(kv.keys, kv.values))


# ----------------------------------------------------------------------------- local memory


@dataclass(slots=True)
class _Entry:
    kv: BlockKV
    nbytes: int
    routing_key: int


class LocalBlockMemory:
    """Block KV held by this replica: two LRU tiers with byte budgets. Replicated kinds (user
    histories, instructions) have their own tier, so a burst of new items cannot evict them."""

    def __init__(self, budget_bytes: int, replicated_budget_bytes: int):
        self._tiers: dict[bool, OrderedDict[BlockHash, _Entry]] = {True: OrderedDict(), False: OrderedDict()}
        self._budgets = {True: replicated_budget_bytes, False: budget_bytes}
        self._bytes = {True: 0, False: 0}
        self._lock = threading.Lock()

    def get(self, hash_: BlockHash) -> BlockKV | None:
        with self._lock:
            for tier in self._tiers.values():
                entry = tier.get(hash_)
                if entry is not None:
                    tier.move_to_end(hash_)
                    return entry.kv
        return None

    def put(self, hash_: BlockHash, kv: BlockKV, kind: BlockKind, routing_key_: int) -> None:
        replicated = kind in REPLICATED_KINDS
        nbytes = block_nbytes(kv)
        with self._lock:
            tier = self._tiers[replicated]
            if hash_ in tier or nbytes > self._budgets[replicated]:
                return
            tier[hash_] = _Entry(kv, nbytes, routing_key_)
            self._bytes[replicated] += nbytes
            while self._bytes[replicated] > self._budgets[replicated]:
                _, evicted = tier.popitem(last=False)
                self._bytes[replicated] -= evicted.nbytes

    def summary(self, limit: int) -> tuple[list[int], list[int]]:
        """(8-byte content hashes, routing keys) of held blocks, newest first, replicated tier
        first, at most `limit` of each: what the replica reports to the router."""
        hashes: list[int] = []
        keys: list[int] = []
        with self._lock:
            for replicated in (True, False):
                for hash_, entry in reversed(self._tiers[replicated].items()):
                    if len(hashes) >= limit:
                        break
                    hashes.append(int.from_bytes(hash_[:8], "little"))
                    keys.append(entry.routing_key)
        return hashes, keys

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"blocks": sum(len(t) for t in self._tiers.values()),
                    "bytes": self._bytes[True] + self._bytes[False]}


# ----------------------------------------------------------------------------- kv-store client


@dataclass(frozen=True)
class WantedBlock:
    hash_: BlockHash
    kind: BlockKind
    text: str


class KvStoreClient:
    """The decoder's side of the kv-store shards: lookups with timeouts and a per-shard back-off.

    `channels` maps shard address -> gRPC channel; `placement` decides which shard holds what;
    `embed` (optional) gives an item text's embedding for similarity placement (only consulted
    when there is more than one shard)."""

    def __init__(self, placement: Placement, channels: dict[str, grpc.Channel], *, timeout_s: float,
                 down_backoff_s: float, embed: Callable[[str], np.ndarray] | None = None, workers: int = 8):
        self.placement = placement
        self.stubs = {addr: kvstore_pb2_grpc.KvStoreStub(ch) for addr, ch in channels.items()}
        self.timeout_s = timeout_s
        self.down_backoff_s = down_backoff_s
        self.embed = embed if len(placement.shards) > 1 else None
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-get")
        self.errors = 0

    def shards_for(self, block: WantedBlock) -> list[str]:
        embedding = None
        if self.embed is not None and block.kind == BlockKind.ITEM:
            embedding = self.embed(block.text)
        return self.placement.shards_for(block.kind, block.hash_, embedding)

    def _up(self, shard: str) -> bool:
        with self._lock:
            return self._down_until.get(shard, 0.0) <= time.monotonic()

    def _failed(self, shard: str, err: grpc.RpcError) -> None:
        self.errors += 1
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            with self._lock:
                self._down_until[shard] = time.monotonic() + self.down_backoff_s
            log.warning("kv-store shard unreachable; computing blocks locally for %.1fs", self.down_backoff_s,
                        extra={"shard": shard, "code": err.code().name})
        else:
            log.warning("kv-store call failed", extra={"shard": shard, "code": err.code().name,
                                                       "details": err.details()})

    def fetch(self, model_id: str, wanted: Sequence[WantedBlock]
              ) -> dict[BlockHash, tuple[kvstore_pb2.KvHeader, bytes]]:
        """Blocks found (header, raw bytes, unchecked); anything missing or failing is left out."""
        by_shard: dict[str, list[BlockHash]] = {}
        for block in wanted:
            shard = next((s for s in self.shards_for(block) if self._up(s)), None)
            if shard is not None:
                by_shard.setdefault(shard, []).append(block.hash_)
        present: list[tuple[str, BlockHash]] = []
        for shard, hashes in by_shard.items():
            try:
                reply = self.stubs[shard].Contains(
                    kvstore_pb2.ContainsRequest(block_hashes=hashes, model_id=model_id), timeout=self.timeout_s)
            except grpc.RpcError as err:
                self._failed(shard, err)
                continue
            present.extend((shard, h) for h, here in zip(hashes, reply.present) if here)
        found: dict[BlockHash, tuple[kvstore_pb2.KvHeader, bytes]] = {}
        for hash_, got in zip([h for _, h in present],
                              self._pool.map(carry_context(lambda sh: self._get(model_id, *sh)), present)):
            if got is not None:
                found[hash_] = got
        return found

    def _get(self, model_id: str, shard: str, hash_: BlockHash):
        try:
            chunks = self.stubs[shard].Get(kvstore_pb2.GetRequest(block_hash=hash_, model_id=model_id),
                                           timeout=self.timeout_s)
            header, data = join_header_stream(chunks)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:  # evicted or dropped as corrupt since Contains
                self._failed(shard, err)
            return None
        return (header, data) if header is not None else None

    def put(self, block: WantedBlock, header: kvstore_pb2.KvHeader, data: bytes, chunk_bytes: int) -> int:
        """Writes to every shard the placement names that is up; returns how many stored it."""
        stored = 0
        for shard in self.shards_for(block):
            if not self._up(shard):
                continue

            def stream():
                yield kvstore_pb2.KvChunk(header=header)
                for start in range(0, len(data), chunk_bytes):
                    yield kvstore_pb2.KvChunk(data=data[start:start + chunk_bytes])

            try:
                self.stubs[shard].Put(stream(), timeout=max(self.timeout_s, 5.0))
                stored += 1
            except grpc.RpcError as err:
                self._failed(shard, err)
        return stored

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class _PublishJob:
    block: WantedBlock
    token_ids: tuple[int, ...]
    routing_key: int


class BlockPublisher:
    """Computes missed blocks standalone at position 0 and publishes them, on its own thread, so a
    request never waits for it. The queue is bounded: when full, a block is dropped (a later
    request that misses it again re-queues it)."""

    def __init__(self, model, memory: LocalBlockMemory, store: KvStoreClient | None, *, model_id: str,
                 max_queue: int, chunk_bytes: int):
        self.model, self.memory, self.store, self.model_id = model, memory, store, model_id
        self.chunk_bytes = chunk_bytes
        self._queue: queue.Queue[_PublishJob | None] = queue.Queue(maxsize=max_queue)
        self._pending: set[BlockHash] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.published = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="block-publisher", daemon=True)
        self._thread.start()

    def submit(self, job: _PublishJob) -> None:
        with self._lock:
            if job.block.hash_ in self._pending:
                return
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.dropped += 1
                return
            self._pending.add(job.block.hash_)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until every submitted block is published (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._publish(job)
            except Exception:  # noqa: BLE001 - a failed publish must not stop the worker
                log.exception("publishing a block failed", extra={"block": job.block.hash_.hex()})
            finally:
                with self._idle:
                    self._pending.discard(job.block.hash_)
                    self._idle.notify_all()

    def _publish(self, job: _PublishJob) -> None:
        kv = compute_block_kv(self.model, job.token_ids)
        self.memory.put(job.block.hash_, kv, job.block.kind, job.routing_key)
        if self.store is not None:
            header, data = encode_block(kv, hash_=job.block.hash_, model_id=self.model_id)
            self.store.put(job.block, header, data, self.chunk_bytes)
        self.published += 1


# ----------------------------------------------------------------------------- the cache


@dataclass
class _Segment:
    token_ids: list[int]
    kind: BlockKind
    text: str
    cacheable: bool
    hash_: BlockHash | None = None
    routing_key: int = 0
    kv: BlockKV | None = None


@dataclass
class BlockCacheCounters:
    local_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    rejected: int = 0  # blocks read from the store and refused (corrupt, wrong model/shape)


class BlockCache:
    def __init__(self, model, tokenizer, model_id: str, settings: ReuseSettings, memory: LocalBlockMemory,
                 store: KvStoreClient | None, *, publish_queue: int = 256, chunk_bytes: int = 1 << 20):
        self.model = model
        self.settings = settings
        self.memory = memory
        self.store = store
        # The hash names weights and dtype: two dtypes of one checkpoint give different KV.
        self.model_key = cache_model_key(model_id, model.dtype)
        self.tokenizer_fp = tokenizer_fingerprint(tokenizer)
        self.mode = settings.mode
        self.counters = BlockCacheCounters()
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._shape = (config.num_hidden_layers, 2, config.num_key_value_heads, head_dim)
        self.publisher = BlockPublisher(model, memory, store, model_id=self.model_key, max_queue=publish_queue,
                                        chunk_bytes=chunk_bytes)

    # -- the entry point
    def prepare(self, tokenized: TokenizedPrompt, blocks: Sequence[common_pb2.PromptBlock], *,
                reuse: bool = True) -> PreparedPrompt:
        """The prompt's ids and the cache to start from; runs model forwards (the assembly), so
        call it where the model may run (the decoder's model lock / the batcher's thread)."""
        ids = list(tokenized.token_ids)
        if not reuse or self.mode == "full":
            return PreparedPrompt(ids, None, 0, len(ids))
        segments = self._segments(tokenized, blocks)
        body, tail = self._split_tail(segments)
        if not any(s.cacheable for s in body):
            return PreparedPrompt(ids, None, 0, len(ids))
        self._lookup([s for s in body if s.cacheable])
        if all(s.kv is None for s in body):
            return PreparedPrompt(ids, None, 0, len(ids))
        s = self.settings
        assembly = assemble(self.model, [(seg.token_ids, seg.kv) for seg in body], tail, mode=self.mode,
                            recompute_ratio=s.recompute_ratio, check_layer=s.check_layer, epic_tokens=s.epic_tokens)
        stats = assembly.stats
        return PreparedPrompt(ids, assembly.cache, stats.cached_tokens, stats.computed_tokens,
                              stats.recomputed_tokens, self.mode)

    def report(self, limit: int) -> tuple[list[int], list[int]]:
        return self.memory.summary(limit)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self.publisher.flush(timeout_s)

    def close(self) -> None:
        self.publisher.close()
        if self.store is not None:
            self.store.close()

    # -- steps
    def _segments(self, tokenized: TokenizedPrompt, blocks: Sequence[common_pb2.PromptBlock]) -> list[_Segment]:
        assert len(tokenized.spans) == len(blocks), (len(tokenized.spans), len(blocks))
        out = []
        for (start, end), block in zip(tokenized.spans, blocks):
            kind = KIND_OF_PROTO[block.kind]
            token_ids = tokenized.token_ids[start:end]
            cacheable = kind != BlockKind.FREE_TEXT and len(token_ids) >= self.settings.min_block_tokens
            out.append(_Segment(token_ids, kind, block.text, cacheable))
        return out

    @staticmethod
    def _split_tail(segments: list[_Segment]) -> tuple[list[_Segment], list[int]]:
        """Body segments (non-empty ones) and the tail's token ids (never empty)."""
        segments = [s for s in segments if s.token_ids]
        cut = len(segments)
        while cut > 0 and not segments[cut - 1].cacheable:
            cut -= 1
        if cut == len(segments):  # ends with a cacheable block: that block is computed as the tail
            cut -= 1
        tail = [t for s in segments[cut:] for t in s.token_ids]
        return segments[:cut], tail

    def _lookup(self, segments: list[_Segment]) -> None:
        for seg in segments:
            seg.hash_ = block_hash(model_id=self.model_key, tokenizer_fp=self.tokenizer_fp, kind=seg.kind,
                                   token_ids=seg.token_ids)
            seg.routing_key = routing_key(_PROTO_OF_KIND[seg.kind], seg.text)
            seg.kv = self.memory.get(seg.hash_)
            if seg.kv is not None:
                self.counters.local_hits += 1
        remote = [seg for seg in segments if seg.kv is None]
        if remote and self.store is not None:
            wanted = [WantedBlock(seg.hash_, seg.kind, seg.text) for seg in remote]
            found = self.store.fetch(self.model_key, wanted)
            for seg in remote:
                got = found.get(seg.hash_)
                if got is None:
                    continue
                try:
                    seg.kv = decode_block(*got, hash_=seg.hash_, model_id=self.model_key,
                                          expected_shape=(*self._shape[:3], len(seg.token_ids), self._shape[3]),
                                          dtype=self.model.dtype, device=self.model.device)
                except CorruptBlock as exc:
                    self.counters.rejected += 1
                    log.warning("kv-store block rejected; recomputing it", extra={"block": seg.hash_.hex(),
                                                                                  "reason": str(exc)})
                    continue
                self.counters.store_hits += 1
                self.memory.put(seg.hash_, seg.kv, seg.kind, seg.routing_key)  # the local replica
        for seg in segments:
            if seg.kv is None:
                self.counters.misses += 1
                self.publisher.submit(_PublishJob(WantedBlock(seg.hash_, seg.kind, seg.text),
                                                  tuple(seg.token_ids), seg.routing_key))


_PROTO_OF_KIND = {kind: proto for proto, kind in KIND_OF_PROTO.items()}
