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
     path, computed standalone at position 0 and published to local memory and the kv-store
     (`BlockPublisher`: the model's owner computes queued blocks between steps, an I/O thread
     writes them to the store).
  4. Hits and misses are assembled (common/blocks/assembly.py) in the serving mode, which the
     per-model accuracy gate (common/blocks/calibration.py) may have turned into "full".

Prefix caching runs beside it, in every mode (in "full" it is the only reuse, and exact): once a
request's prompt is prefilled, the KV of each of its blocks computed in place (exact, not
assembled from approximate reuse) is kept in local memory under the block's prefix hash
(common/blocks/hashing.py `prefix_hash`: the chain of block hashes up to it); a later prompt
starting with the same blocks takes that KV as it is, with no correction, and prefills the rest.
The replica reports these entries under prefix routing keys (common/blocks/routing_keys.py), so
the router's affinity sends a returning user where their [instruction][history] prefix is.

Steps 1-3 need no model and run on the caller's (gRPC) thread: `lookup` returns a `BlockPlan`.
Step 4 runs model forwards and so runs where the model is owned (the decoder's batcher thread):
`assemble(plan)` returns a `PreparedPrompt`, what the engine takes: the prompt ids and a batch-1
DynamicCache holding the KV of the prompt (the engine re-runs the last token as its first root),
or None when nothing was reused (the engine prefills the whole prompt itself). `prepare` is both
in one call, for callers that own the model themselves (benchmarks, tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from transformers import DynamicCache

from adaccel.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from common.blocks.assembly import BlockKV, assemble, compute_block_kv
from common.blocks.hashing import BlockHash, BlockKind, block_hash, prefix_hash, tokenizer_fingerprint
from common.blocks.kv_codec import (
    BlockHeader,
    CorruptBlock,
    block_nbytes,
    cache_model_key,
    decode_block,
    encode_block,
)
from common.blocks.placement import REPLICATED_KINDS, Placement
from common.blocks.routing_keys import prefix_routing_keys, routing_key
from common.prompt_tokens import TokenizedPrompt
from common.rpc.block_kinds import kinds_and_texts
from common.rpc.kv_headers import header_from_proto, header_to_proto
from common.rpc.streams import join_header_stream
from common.telemetry import carry_context

log = logging.getLogger(__name__)


def prefix_cache(model, kvs: Sequence[BlockKV]) -> DynamicCache:
    """A batch-1 cache of consecutive exact blocks' KV (new tensors: the engine writes to it)."""
    layers = len(kvs[0].keys)
    return DynamicCache(ddp_cache_data=[(torch.cat([kv.keys[i] for kv in kvs], dim=2),
                                         torch.cat([kv.values[i] for kv in kvs], dim=2)) for i in range(layers)],
                        config=model.config)


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
    mode: str = "full"  # "prefix": an exact prefix from prefix caching and nothing else reused

    @classmethod
    def uncached(cls, prompt_ids: Sequence[int]) -> PreparedPrompt:
        """Nothing reused: the engine prefills every token."""
        ids = list(prompt_ids)
        return cls(ids, None, 0, len(ids))


@dataclass(frozen=True)
class PrefixEntry:
    """A block whose KV this request computes exactly in place: kept after its prefill."""

    prefix_hash: BlockHash
    start: int  # prompt positions [start, end)
    end: int
    kind: BlockKind
    prefix_key: int  # what the replica reports it under


@dataclass(frozen=True)
class BlockPlan:
    """A prompt whose cacheable blocks were looked up (no model ran yet): what `assemble` takes.

    body: (token ids, KV or None) of each block before the tail, in prompt order; the first
        `prefix_blocks` hold exact KV from prefix caching (BlockKV.base_position = their start).
    tail: the tokens always computed (the trailing free text, or the last block).
    remember: blocks after the exact prefix that this request computes in place, to keep for
        prefix caching once prefilled (`BlockCache.remember`).
    """

    prompt_ids: list[int]
    body: list[tuple[list[int], BlockKV | None]]
    tail: list[int]
    prefix_blocks: int = 0
    remember: tuple[PrefixEntry, ...] = ()

    @property
    def prefix_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.body[: self.prefix_blocks])


@dataclass(frozen=True)
class ReuseSettings:
    mode: str = "epic"  # full | reuse | cacheblend | epic
    recompute_ratio: float = 0.15
    check_layer: int = 1
    epic_tokens: int = 16
    min_block_tokens: int = 4
    kernel_backend: str = "torch"  # the tensor steps' implementation: torch | triton (kernels/backend.py)
    prefix_caching: bool = True  # keep each prefilled block's exact KV under its prefix hash


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
              ) -> dict[BlockHash, tuple[BlockHeader, bytes]]:
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
        found: dict[BlockHash, tuple[BlockHeader, bytes]] = {}
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
        return (header_from_proto(header), data) if header is not None else None

    def put(self, block: WantedBlock, header: BlockHeader, data: bytes, chunk_bytes: int) -> int:
        """Writes to every shard the placement names that is up; returns how many stored it."""
        stored = 0
        for shard in self.shards_for(block):
            if not self._up(shard):
                continue

            def stream():
                yield kvstore_pb2.KvChunk(header=header_to_proto(header))
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
    """Computes missed blocks standalone at position 0 and publishes them, so a request never
    waits for it. The model has one owner: `compute` runs the forwards and is called by that
    owner (the batcher, between steps); the kv-store writes go to an I/O thread. The queue is
    bounded: when full, a block is dropped (a later request that misses it again re-queues it)."""

    def __init__(self, model, memory: LocalBlockMemory, store: KvStoreClient | None, *, model_id: str,
                 max_queue: int, chunk_bytes: int):
        self.model, self.memory, self.store, self.model_id = model, memory, store, model_id
        self.chunk_bytes = chunk_bytes
        self.max_queue = max_queue
        self._queue: deque[_PublishJob] = deque()
        self._pending: set[BlockHash] = set()  # queued, being computed or being written
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-writer") if store else None
        self.published = 0
        self.dropped = 0

    def submit(self, job: _PublishJob) -> None:
        """Queues a block (any thread); nothing runs until the model's owner calls compute."""
        with self._lock:
            if job.block.hash_ in self._pending:
                return
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            self._queue.append(job)
            self._pending.add(job.block.hash_)

    @property
    def queued(self) -> int:
        """Blocks waiting for the model's owner to compute them."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Blocks queued, being computed or being written to the store."""
        with self._lock:
            return len(self._pending)

    def compute(self, max_blocks: int | None = None) -> int:
        """Computes up to `max_blocks` queued blocks (None: all) on the calling thread, which must
        own the model; returns how many it took. The store write is handed to the I/O thread."""
        done = 0
        while max_blocks is None or done < max_blocks:
            with self._lock:
                if not self._queue:
                    break
                job = self._queue.popleft()
            done += 1
            try:
                kv = compute_block_kv(self.model, job.token_ids)
                self.memory.put(job.block.hash_, kv, job.block.kind, job.routing_key)
            except Exception:
                log.exception("computing a block failed", extra={"block": job.block.hash_.hex()})
                self._settled(job)
                continue
            if self._writer is None:
                self.published += 1
                self._settled(job)
            else:
                self._writer.submit(carry_context(self._write), job, kv)
        return done

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Computes every queued block on the calling thread (call it only where the model is
        owned: tests, benchmarks) and waits for the store writes; False on timeout."""
        self.compute()
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True, cancel_futures=True)

    def _write(self, job: _PublishJob, kv: BlockKV) -> None:
        try:
            header, data = encode_block(kv, hash_=job.block.hash_, model_id=self.model_id)
            self.store.put(job.block, header, data, self.chunk_bytes)
            self.published += 1
        except Exception:
            log.exception("publishing a block failed", extra={"block": job.block.hash_.hex()})
        finally:
            self._settled(job)

    def _settled(self, job: _PublishJob) -> None:
        with self._idle:
            self._pending.discard(job.block.hash_)
            self._idle.notify_all()


# ----------------------------------------------------------------------------- the cache


@dataclass
class _Segment:
    token_ids: list[int]
    kind: BlockKind
    text: str
    cacheable: bool
    start: int  # prompt position of its first token
    prefix_key: int  # prefix routing key (blocks 0..this one)
    hash_: BlockHash | None = None
    prefix_hash: BlockHash | None = None
    routing_key: int = 0
    kv: BlockKV | None = None


@dataclass
class BlockCacheCounters:
    local_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    rejected: int = 0  # blocks read from the store and refused (corrupt, wrong model/shape)
    prefix_hits: int = 0  # blocks whose exact in-prompt KV prefix caching held


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

    # -- the entry points
    def lookup(self, tokenized: TokenizedPrompt, blocks: Sequence[common_pb2.PromptBlock], *,
               reuse: bool = True) -> BlockPlan | None:
        """Finds the longest exact prefix prefix caching holds, then each later cacheable block's
        KV (local memory, then the kv-store; not in mode "full"), and queues the misses for
        publishing; no model runs here. None: nothing to reuse or keep (the engine prefills all)."""
        prefix_caching = self.settings.prefix_caching
        if not reuse or (self.mode == "full" and not prefix_caching):
            return None
        segments = self._segments(tokenized, blocks)
        body, tail = self._split_tail(segments)
        held = self._held_prefix(body) if prefix_caching else 0
        if self.mode != "full":
            self._lookup([s for s in body[held:] if s.cacheable])
        # Blocks computed in place up to the first approximately reused one are exact: kept.
        exact_end = next((i for i in range(held, len(body)) if body[i].kv is not None), len(body))
        remember = tuple(PrefixEntry(seg.prefix_hash, seg.start, seg.start + len(seg.token_ids), seg.kind,
                                     seg.prefix_key) for seg in body[held:exact_end]) if prefix_caching else ()
        if not remember and all(s.kv is None for s in body):
            return None
        return BlockPlan(list(tokenized.token_ids), [(seg.token_ids, seg.kv) for seg in body], tail,
                         prefix_blocks=held, remember=remember)

    def assemble(self, plan: BlockPlan | None, prompt_ids: Sequence[int]) -> PreparedPrompt:
        """The cache to start from; runs model forwards, so call it where the model is owned."""
        if plan is None:
            return PreparedPrompt.uncached(prompt_ids)
        if all(kv is None for _, kv in plan.body[plan.prefix_blocks:]):  # an exact prefix at most
            if not plan.prefix_blocks:
                return PreparedPrompt.uncached(prompt_ids)
            cached = plan.prefix_tokens
            cache = prefix_cache(self.model, [kv for _, kv in plan.body[: plan.prefix_blocks]])
            return PreparedPrompt(plan.prompt_ids, cache, cached, len(plan.prompt_ids) - cached, mode="prefix")
        s = self.settings
        assembly = assemble(self.model, plan.body, plan.tail, mode=self.mode, recompute_ratio=s.recompute_ratio,
                            check_layer=s.check_layer, epic_tokens=s.epic_tokens, backend=s.kernel_backend)
        stats = assembly.stats
        return PreparedPrompt(plan.prompt_ids, assembly.cache, stats.cached_tokens, stats.computed_tokens,
                              stats.recomputed_tokens, self.mode)

    def prepare(self, tokenized: TokenizedPrompt, blocks: Sequence[common_pb2.PromptBlock], *,
                reuse: bool = True) -> PreparedPrompt:
        """lookup + assemble, for callers that own the model (benchmarks, tests)."""
        return self.assemble(self.lookup(tokenized, blocks, reuse=reuse), tokenized.token_ids)

    def remember(self, plan: BlockPlan | None, cache: DynamicCache, computed: int) -> int:
        """Keeps the exact KV of the plan's `remember` blocks from a prefilled batch-1 cache
        holding prompt positions [0, computed) (copies: the running batch goes on writing its
        own); returns how many were kept. Call it where the model is owned, once prefilled."""
        if plan is None:
            return 0
        layers = cache.layers[: self._shape[0]]
        kept = 0
        for entry in plan.remember:
            if entry.end > computed:
                break
            kv = BlockKV(keys=tuple(layer.keys[:, :, entry.start:entry.end].clone() for layer in layers),
                         values=tuple(layer.values[:, :, entry.start:entry.end].clone() for layer in layers),
                         base_position=entry.start)
            self.memory.put(entry.prefix_hash, kv, entry.kind, entry.prefix_key)
            kept += 1
        return kept

    def report(self, limit: int) -> tuple[list[int], list[int]]:
        return self.memory.summary(limit)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Publishes every queued block now (see BlockPublisher.flush: the model's owner only)."""
        return self.publisher.flush(timeout_s)

    def close(self) -> None:
        self.publisher.close()
        if self.store is not None:
            self.store.close()

    # -- steps
    def _segments(self, tokenized: TokenizedPrompt, blocks: Sequence[common_pb2.PromptBlock]) -> list[_Segment]:
        """One segment per block, hashed (its own hash and its prefix hash; empty ones unhashed)."""
        assert len(tokenized.spans) == len(blocks), (len(tokenized.spans), len(blocks))
        kinds_texts = kinds_and_texts(blocks)
        out = []
        parent: BlockHash | None = None
        for (start, end), (kind, text), prefix_key in zip(tokenized.spans, kinds_texts,
                                                          prefix_routing_keys(kinds_texts)):
            token_ids = tokenized.token_ids[start:end]
            cacheable = kind != BlockKind.FREE_TEXT and len(token_ids) >= self.settings.min_block_tokens
            seg = _Segment(token_ids, kind, text, cacheable, start, prefix_key)
            if token_ids:
                seg.hash_ = block_hash(model_id=self.model_key, tokenizer_fp=self.tokenizer_fp, kind=kind,
                                       token_ids=token_ids)
                seg.prefix_hash = parent = prefix_hash(parent, seg.hash_)
            out.append(seg)
        return out

    def _held_prefix(self, body: list[_Segment]) -> int:
        """How many leading body blocks prefix caching holds (their kv set to the exact KV)."""
        held = 0
        for seg in body:
            kv = self.memory.get(seg.prefix_hash)
            if kv is None or kv.num_tokens != len(seg.token_ids) or kv.base_position != seg.start:
                break
            seg.kv = kv
            held += 1
        self.counters.prefix_hits += held
        return held

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
            seg.routing_key = routing_key(seg.kind, seg.text)
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

