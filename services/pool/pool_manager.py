"""Pools: RocksDB is the source of truth, an in-memory TokenTrie per pool its mirror.

Every mutation (insert, item removal, decay, pool eviction) is applied to the mirror with the
trie's own logic, and the nodes it touched are written with their new counts - plus metadata
(version bump), remembered sequences and the consumer offset - in one RocksDB WriteBatch. On
start each mirror is rebuilt by a prefix scan in key order (parents before children), so a
restart after kill -9 serves exactly the pools of the last acknowledged write.

Decay: when a pool passes `capacity` nodes, the mirror squeezes (halve all counts, drop nodes at
0 with their subtrees) until it is under `squeeze_to * capacity`; the batch then rewrites the
pool's rows as `decay.squeezed_rows` computes them from the stored rows merged with this
mutation's new values (the same rule, checked against the mirror's size). So a pool over its
bound never grows without limit, and the state on disk never lags its decay.

Item removal: sequences inserted on behalf of items are remembered (column family
`sequences`, indexed by item in `items`); removing an item takes each of its sequences back
with TokenTrie.remove, halved once per squeeze since the insert. A sequence about several
items goes with the first of them removed. Nodes emptied by a removal stay (count 0, invisible
to retrieval) until the next decay, on disk as in memory.

Locking: one writer at a time (`_write_lock`: the Kafka updater and Insert/DeleteItem RPCs);
each pool has a lock that writers and readers (retrieval, snapshots) take, because the trie
is not thread-safe (retrieval re-sorts sibling lists lazily). Writers take pool locks in key
order, readers one at a time, so there is no lock cycle.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from adaccel.v1 import pool_pb2
from common.drafting.draft_tree import DraftTree
from common.drafting.pools import GLOBAL_POOL, POOL_KEY_SEPARATOR
from common.drafting.trie import TokenTrie, TrieSettings, ngram_prefix_counts
from services.pool import decay
from services.pool.layout import StoredSequence, node_bytes
from services.pool.ngram_records import InsertSequences, Mutation, NoChange, RemoveItem
from services.pool.pool_store import PoolStore, StoreBatch

log = logging.getLogger(__name__)

Offset = tuple[str, int, int]  # topic, partition, next offset
Path = tuple[int, ...]


@dataclass(slots=True, frozen=True)
class PoolLimits:
    ngram_length: int = 10
    capacity: int = 1 << 17  # trie nodes per pool
    max_pools: int = 64  # pools per service, the global pool not counted
    squeeze_to: float = 0.75
    input_weight: float = 0.5
    max_sequence_tokens: int = 1 << 21  # tokens remembered per pool for item removal

    def trie_settings(self) -> TrieSettings:
        return TrieSettings(ngram_length=self.ngram_length, capacity=self.capacity,
                            squeeze_to=self.squeeze_to, input_weight=self.input_weight)


@dataclass(slots=True)
class Snapshot:
    pool_key: str
    version: int
    nodes: int
    data: bytes


class _Pool:
    __slots__ = ("key", "trie", "info", "lock", "next_sequence_id", "snapshot", "has_input")

    def __init__(self, key: str, trie: TokenTrie, info: pool_pb2.PoolInfo, next_sequence_id: int,
                 has_input: bool = False):
        self.key = key
        self.trie = trie
        # Whether any node may have an input count (else reading them back is skipped: ingest's hot path).
        self.has_input = has_input
        self.info = info  # replaced, never mutated in place, so readers see a consistent one
        self.lock = threading.Lock()
        self.next_sequence_id = next_sequence_id
        self.snapshot: Snapshot | None = None  # the latest version's, built on demand


class UnknownPool(KeyError):
    pass


class PoolManager:
    def __init__(self, store: PoolStore, limits: PoolLimits):
        self.store = store
        self.limits = limits
        self.pools_evicted = 0
        self._write_lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        started = time.perf_counter()
        for info in store.pools():
            self._pools[info.pool_key] = self._load(info)
        if GLOBAL_POOL not in self._pools:
            self._pools[GLOBAL_POOL] = self._empty(GLOBAL_POOL)
        log.info("pools loaded", extra={"pools": len(self._pools),
                                        "nodes": sum(len(p.trie) for p in self._pools.values()),
                                        "load_s": round(time.perf_counter() - started, 3)})

    # ------------------------------------------------------------------ loading
    def _empty(self, key: str) -> _Pool:
        info = pool_pb2.PoolInfo(pool_key=key, capacity=self.limits.capacity)
        return _Pool(key, TokenTrie(self.limits.trie_settings()), info, 1)

    def _load(self, info: pool_pb2.PoolInfo) -> _Pool:
        """Rebuilds a pool's mirror from its rows (key order: a parent before its children, so
        each add_path only sets the last node of its path)."""
        trie = TokenTrie(self.limits.trie_settings())
        has_input = False
        for path, output, input_ in self.store.rows(info.pool_key):
            trie.add_path(path, "output", count=output, skip=len(path) - 1)
            if input_:
                trie.add_path(path, "input", count=input_, skip=len(path) - 1)
                has_input = True
        if len(trie) != info.nodes:
            log.warning("pool metadata disagrees with its rows; the rows win",
                        extra={"pool_key": info.pool_key, "meta_nodes": info.nodes, "rows": len(trie)})
            info.nodes = len(trie)
        return _Pool(info.pool_key, trie, info, self.store.last_sequence_id(info.pool_key) + 1, has_input)

    def _reload(self, keys: Iterable[str]) -> None:
        """After a failed write: the mirrors may be ahead of the store; the store wins."""
        for key in keys:
            info = self.store.pool_info(key)
            if info is not None:
                self._pools[key] = self._load(info)
            elif key == GLOBAL_POOL:
                self._pools[key] = self._empty(key)
            else:
                self._pools.pop(key, None)

    # ------------------------------------------------------------------ reads
    def __contains__(self, pool_key: str) -> bool:
        return pool_key in self._pools

    def infos(self) -> list[pool_pb2.PoolInfo]:
        """Every pool's figures (the global pool too, version 0 until written)."""
        return [p.info for p in list(self._pools.values())]

    def info(self, pool_key: str) -> pool_pb2.PoolInfo | None:
        pool = self._pools.get(pool_key)
        return None if pool is None else pool.info

    def resolve(self, pool_key: str, *, exact: bool = False) -> str:
        """The pool that serves `pool_key`: itself, else its parents ("a/b/c" -> "a/b" -> "a"),
        else the global pool (exact: itself or UnknownPool)."""
        key = pool_key or GLOBAL_POOL
        if exact:
            if key not in self._pools:
                raise UnknownPool(key)
            return key
        while key:
            if key in self._pools:
                return key
            key = key.rpartition(POOL_KEY_SEPARATOR)[0]
        return GLOBAL_POOL

    def retrieve(self, pool_key: str, context: Sequence[int], *, decoding_length: int, branch_length: int,
                 key_length: int = 2, exact: bool = False) -> tuple[str, int, DraftTree]:
        """(pool used, its version, draft tree) for the continuation of `context`."""
        pool = self._pool(self.resolve(pool_key, exact=exact))
        with pool.lock:
            tree = pool.trie.retrieve(context, decoding_length=decoding_length, branch_length=branch_length,
                                      key_length=key_length)
            return pool.key, pool.info.version, tree

    def snapshot(self, pool_key: str) -> Snapshot:
        """The pool's trie at its current version, serialized once per version."""
        pool = self._pool(pool_key)
        with pool.lock:
            cached = pool.snapshot
            if cached is None or cached.version != pool.info.version:
                cached = Snapshot(pool.key, pool.info.version, len(pool.trie), pool.trie.to_bytes())
                pool.snapshot = cached
            return cached

    def count(self, pool_key: str, path: Sequence[int], kind: str = "output") -> int:
        pool = self._pool(pool_key)
        with pool.lock:
            return pool.trie.count(path, kind)

    def _pool(self, pool_key: str) -> _Pool:
        pool = self._pools.get(pool_key)
        if pool is None:
            raise UnknownPool(pool_key)
        return pool

    # ------------------------------------------------------------------ writes
    def apply(self, mutation: Mutation, offset: Offset | None = None) -> list[pool_pb2.PoolInfo]:
        """Applies one record's mutation with its consumer offset; returns the changed pools."""
        if isinstance(mutation, InsertSequences):
            info = self.insert(mutation.pool_key, mutation.sequences, mutation.kind, item_ids=mutation.item_ids,
                               replace_item_input=mutation.replace_item_input, offset=offset)
            return [] if info is None else [info]
        if isinstance(mutation, RemoveItem):
            return self.remove_item(mutation.item_id, mutation.pool_key, offset=offset)
        assert isinstance(mutation, NoChange), mutation
        if offset is not None:
            self.store.store_offset(*offset)
        return []

    def insert(self, pool_key: str, sequences: Sequence[Sequence[int]], kind: str = "output", *,
               item_ids: Sequence[str] = (), replace_item_input: bool = False,
               offset: Offset | None = None) -> pool_pb2.PoolInfo | None:
        """Adds the n-grams of `sequences` (remembered under `item_ids`) in one batch.

        Text about an item already removed from the inventory is not inserted (None: nothing
        changed but the offset), so a generation that arrives after its item's removal - the
        two topics are not ordered with each other - cannot bring the item back into drafts.
        `replace_item_input` (the inventory added/changed an item) puts the item back.
        """
        assert kind in ("input", "output")
        with self._write_lock:
            if not replace_item_input and item_ids and self.store.removed_items(item_ids):
                if offset is not None:
                    self.store.store_offset(*offset)
                return None
            batch = self.store.batch()
            if replace_item_input:
                for item in self.store.removed_items(item_ids):
                    batch.delete_removed(item)
            pool = self._pools.get(pool_key)
            evicted = []
            if pool is None:
                evicted = self._evict_for_new_pool(batch)
                pool = self._empty(pool_key)
            try:
                with pool.lock:
                    info = self._insert_locked(pool, batch, sequences, kind, item_ids, replace_item_input)
                    if offset is not None:
                        batch.put_offset(*offset)
                    self.store.write(batch)
                    pool.info = info
            except BaseException:
                self._reload([pool_key])
                raise
            self._pools[pool_key] = pool
            for key in evicted:
                self._pools.pop(key, None)
                self.pools_evicted += 1
            return info

    def _insert_locked(self, pool: _Pool, batch: StoreBatch, sequences: Sequence[Sequence[int]], kind: str,
                       item_ids: Sequence[str], replace_item_input: bool) -> pool_pb2.PoolInfo:
        trie, info = pool.trie, _copy(pool.info)
        removed_paths: set[Path] = set()
        if replace_item_input:
            for item in item_ids:
                removed_paths |= self._take_back(pool, info, batch, item, kinds=("input",))
        increments: dict[Path, int] = {}
        for seq in sequences:
            for path, count in ngram_prefix_counts(seq, self.limits.ngram_length).items():
                increments[path] = increments.get(path, 0) + count
        add_path = trie.add_path
        for path in sorted(increments):  # parents first: each add_path then sets one node
            add_path(path, kind, count=increments[path], skip=len(path) - 1)
        pool.has_input = pool.has_input or kind == "input"
        # Removal never creates nodes: write the removal's paths that exist (on disk = in the mirror).
        touched = set(increments) | {p for p in removed_paths if p in increments or self._stored(pool.key, p)}
        pending = self._counts(pool, touched)
        squeezes_before = trie.squeeze_count
        trie.enforce_capacity()
        squeezes = trie.squeeze_count - squeezes_before
        if squeezes:
            self._write_decayed(pool, batch, pending, squeezes)
        else:
            batch.put_nodes(pool.key, ((path, output, input_) for path, (output, input_) in pending.items()))
        if item_ids:
            for seq in (tuple(int(t) for t in s) for s in sequences if len(s)):
                if decay.still_contributes(len(seq), squeezes):
                    record = StoredSequence(kind, info.squeezes, tuple(item_ids), seq)
                    batch.put_sequence(pool.key, pool.next_sequence_id, record)
                    pool.next_sequence_id += 1
                    info.sequences += 1
                    info.sequence_tokens += len(seq)
        info.squeezes += squeezes
        if squeezes:
            self._forget_spent_sequences(pool, info, batch)
        if info.sequence_tokens > self.limits.max_sequence_tokens:
            self._forget_oldest_sequences(pool, info, batch)
        return self._bump(pool, info, batch, nodes=len(trie))

    def remove_item(self, item_id: str, pool_key: str | None = None, *,
                    offset: Offset | None = None) -> list[pool_pb2.PoolInfo]:
        """Takes back every remembered sequence of the item (in one pool, or all), one batch."""
        with self._write_lock:
            by_pool: dict[str, list[int]] = {}
            for key, sequence_id in self.store.item_sequences(item_id):
                if pool_key is None or key == pool_key:
                    by_pool.setdefault(key, []).append(sequence_id)
            pools = [self._pools[k] for k in sorted(by_pool) if k in self._pools]
            batch = self.store.batch()
            if pool_key is None:  # gone from the inventory: later texts about it are ignored too
                batch.put_removed(item_id, time.time())
            infos = []
            try:
                with contextlib.ExitStack() as locks:
                    for pool in pools:
                        locks.enter_context(pool.lock)
                    for pool in pools:
                        info = _copy(pool.info)
                        paths = self._take_back(pool, info, batch, item_id, kinds=("input", "output"))
                        counts = self._counts(pool, [p for p in paths if self._stored(pool.key, p)])
                        batch.put_nodes(pool.key, ((p, out, in_) for p, (out, in_) in counts.items()))
                        infos.append(self._bump(pool, info, batch, nodes=len(pool.trie)))
                    if offset is not None:
                        batch.put_offset(*offset)
                    self.store.write(batch)
                    for pool, info in zip(pools, infos):
                        pool.info = info
            except BaseException:
                self._reload([p.key for p in pools])
                raise
            return infos

    # ------------------------------------------------------------------ mutation parts
    def _take_back(self, pool: _Pool, info: pool_pb2.PoolInfo, batch: StoreBatch, item_id: str,
                   kinds: tuple[str, ...]) -> set[Path]:
        """Removes the item's remembered sequences (of `kinds`) from the mirror and queues their
        deletion; returns the trie paths whose counts may have changed."""
        paths: set[Path] = set()
        for key, sequence_id in self.store.item_sequences(item_id):
            if key != pool.key:
                continue
            seq = self.store.sequence(key, sequence_id)
            if seq is None or seq.kind not in kinds:
                continue
            pool.trie.remove(seq.tokens, seq.kind, squeezes_since_insert=info.squeezes - seq.squeezes_at_insert)
            paths.update(ngram_prefix_counts(seq.tokens, self.limits.ngram_length))
            batch.delete_sequence(key, sequence_id, seq.item_ids)
            info.sequences -= 1
            info.sequence_tokens -= len(seq.tokens)
        return paths

    def _write_decayed(self, pool: _Pool, batch: StoreBatch, pending: dict[Path, tuple[int, int]],
                       squeezes: int) -> None:
        """Rewrites the pool's rows after `squeezes` decay passes (stored rows + this batch's)."""
        batch.delete_nodes(pool.key)
        survivors = 0
        for path, output, input_ in decay.squeezed_rows(decay.merged_rows(self.store.rows(pool.key), pending),
                                                         squeezes):
            batch.put_node(pool.key, path, output, input_)
            survivors += 1
        if survivors != len(pool.trie):
            raise RuntimeError(f"pool {pool.key!r}: decay kept {survivors} rows, the trie {len(pool.trie)} nodes")

    def _forget_spent_sequences(self, pool: _Pool, info: pool_pb2.PoolInfo, batch: StoreBatch) -> None:
        """Drops remembered sequences whose contribution decay has already taken to 0."""
        for sequence_id, seq in self.store.sequences(pool.key):
            if (pool.key, sequence_id) in batch.deleted_sequences:
                continue
            if not decay.still_contributes(len(seq.tokens), info.squeezes - seq.squeezes_at_insert):
                batch.delete_sequence(pool.key, sequence_id, seq.item_ids)
                info.sequences -= 1
                info.sequence_tokens -= len(seq.tokens)

    def _forget_oldest_sequences(self, pool: _Pool, info: pool_pb2.PoolInfo, batch: StoreBatch) -> None:
        """Bounds remembered tokens: the oldest records go (their n-grams stay and decay)."""
        target = self.limits.max_sequence_tokens // 2
        for sequence_id, seq in self.store.sequences(pool.key):
            if info.sequence_tokens <= target:
                break
            if (pool.key, sequence_id) in batch.deleted_sequences:
                continue
            batch.delete_sequence(pool.key, sequence_id, seq.item_ids)
            info.sequences -= 1
            info.sequence_tokens -= len(seq.tokens)

    def _evict_for_new_pool(self, batch: StoreBatch) -> list[str]:
        """Makes room for one more pool: drops the least recently updated ones (never global)."""
        others = [p for k, p in self._pools.items() if k != GLOBAL_POOL]
        excess = max(0, len(others) - self.limits.max_pools + 1)
        victims = sorted(others, key=lambda p: (p.info.updated_at, p.key))[:excess]
        for victim in victims:
            batch.delete_nodes(victim.key)
            for sequence_id, seq in self.store.sequences(victim.key):
                batch.delete_sequence(victim.key, sequence_id, seq.item_ids)
            batch.delete_meta(victim.key)
            log.info("pool evicted (max_pools)", extra={"pool_key": victim.key, "nodes": victim.info.nodes})
        return [v.key for v in victims]

    def _bump(self, pool: _Pool, info: pool_pb2.PoolInfo, batch: StoreBatch, *, nodes: int) -> pool_pb2.PoolInfo:
        info.version += 1
        info.nodes = nodes
        info.capacity = self.limits.capacity
        info.updated_at = time.time()
        # Approximate: rows of average depth, plus remembered tokens.
        info.bytes = nodes * node_bytes(pool.key, (self.limits.ngram_length + 1) // 2) + 4 * info.sequence_tokens
        batch.put_meta(info)
        return info

    @staticmethod
    def _counts(pool: _Pool, paths: Iterable[Path]) -> dict[Path, tuple[int, int]]:
        """The mirror's (output, input) counts of `paths`."""
        count = pool.trie.count
        if pool.has_input:
            return {p: (count(p, "output"), count(p, "input")) for p in paths}
        return {p: (count(p, "output"), 0) for p in paths}

    def _stored(self, pool_key: str, path: Path) -> bool:
        return self.store.has_node(pool_key, path)


def _copy(info: pool_pb2.PoolInfo) -> pool_pb2.PoolInfo:
    out = pool_pb2.PoolInfo()
    out.CopyFrom(info)
    return out
