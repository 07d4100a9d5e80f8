"""Pools: RocksDB is the source of truth, an in-memory trie per pool (its mirror) serves reads.

Every mutation (insert, item removal, decay, pool eviction) is applied to the mirror with the
trie's own logic (mirror.py), the item-sequence ledger decides what to remember and forget
(sequence_ledger.py), and the batch writer puts the touched nodes with their new counts - plus
metadata (version bump), remembered sequences and the consumer offset - into one RocksDB
WriteBatch (batch_writer.py). On start each mirror is rebuilt by a prefix scan in key order
(parents before children), so a restart after kill -9 serves exactly the pools of the last
acknowledged write. This module only orders those steps, keeps the pools and their locks, and
puts the mirrors back as the store has them when a write fails.

Decay: when a pool passes `capacity` nodes, the mirror squeezes (halve all counts, drop nodes at
0 with their subtrees) until it is under `squeeze_to * capacity`; the batch then rewrites the
pool's rows as `decay.squeezed_rows` computes them from the stored rows merged with this
mutation's new values (the same rule, checked against the mirror's size). So a pool over its
bound never grows without limit, and the state on disk never lags its decay.

Item removal: sequences inserted on behalf of items are remembered (column family
`sequences`, indexed by item in `items`); removing an item takes each of its sequences back
with TokenTrie.remove, halved once per squeeze since the insert. A sequence about several
items goes with the first of them removed. Nodes emptied by a removal stay (count 0, invisible
to retrieval) until the next decay, on disk as in memory. Text about an item removed from the
inventory is not inserted, until an inventory added/changed event brings the item back (it
replaces the item's earlier input sequences in its pool).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from common.drafting.draft_tree import DraftTree
from common.drafting.geometry import DEFAULT_GEOMETRY
from common.drafting.pool_keys import GLOBAL_POOL, resolve_pool_key
from common.drafting.trie import TrieSettings
from services.pool.batch_writer import BatchWriter, Offset
from services.pool.layout import KINDS, node_bytes
from services.pool.mirror import PoolMirror
from services.pool.ngram_records import InsertSequences, Mutation, NoChange, RemoveItem
from services.pool.pool_meta import PoolMeta
from services.pool.pool_store import PoolStore
from services.pool.sequence_ledger import LedgerEdit, Record

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class PoolLimits:
    ngram_length: int = DEFAULT_GEOMETRY.ngram_length
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
    __slots__ = ("key", "lock", "meta", "mirror", "next_sequence_id", "snapshot")

    def __init__(self, key: str, mirror: PoolMirror, meta: PoolMeta, next_sequence_id: int):
        self.key = key
        self.mirror = mirror
        self.meta = meta  # swapped after each acknowledged write, never changed in place
        self.lock = threading.Lock()
        self.next_sequence_id = next_sequence_id
        self.snapshot: Snapshot | None = None  # the latest version's, built on demand


class UnknownPool(KeyError):
    pass


class PoolManager:
    def __init__(self, store: PoolStore, limits: PoolLimits, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.limits = limits
        self.pools_evicted = 0
        self._clock = clock  # unix seconds: a pool's updated_at, an item's removal time
        # Approximate size of one stored node, for PoolMeta.size_bytes: a row of average depth.
        self._row_depth = (limits.ngram_length + 1) // 2
        self._write_lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        started = time.perf_counter()
        for meta in store.pools():
            self._pools[meta.pool_key] = self._load(meta)
        if GLOBAL_POOL not in self._pools:
            self._pools[GLOBAL_POOL] = self._empty(GLOBAL_POOL)
        log.info("pools loaded", extra={"pools": len(self._pools),
                                        "nodes": sum(len(p.mirror) for p in self._pools.values()),
                                        "load_s": round(time.perf_counter() - started, 3)})

    # ------------------------------------------------------------------ loading
    def _empty(self, key: str) -> _Pool:
        meta = PoolMeta(key, capacity=self.limits.capacity)
        return _Pool(key, PoolMirror(self.limits.trie_settings()), meta, next_sequence_id=1)

    def _load(self, meta: PoolMeta) -> _Pool:
        mirror = PoolMirror.from_rows(self.limits.trie_settings(), self.store.rows(meta.pool_key))
        if len(mirror) != meta.nodes:
            log.warning("pool metadata disagrees with its rows; the rows win",
                        extra={"pool_key": meta.pool_key, "meta_nodes": meta.nodes, "rows": len(mirror)})
            meta = replace(meta, nodes=len(mirror))
        return _Pool(meta.pool_key, mirror, meta, self.store.last_sequence_id(meta.pool_key) + 1)

    def _reload(self, keys: Iterable[str]) -> None:
        """After a failed write: the mirrors may be ahead of the store; the store wins."""
        for key in keys:
            meta = self.store.pool_info(key)
            if meta is not None:
                self._pools[key] = self._load(meta)
            elif key == GLOBAL_POOL:
                self._pools[key] = self._empty(key)
            else:
                self._pools.pop(key, None)

    # ------------------------------------------------------------------ reads
    def __contains__(self, pool_key: str) -> bool:
        return pool_key in self._pools

    def metas(self) -> list[PoolMeta]:
        """Every pool's metadata (the global pool too, version 0 until written)."""
        return [p.meta for p in list(self._pools.values())]

    def meta(self, pool_key: str) -> PoolMeta | None:
        pool = self._pools.get(pool_key)
        return None if pool is None else pool.meta

    def resolve(self, pool_key: str, *, exact: bool = False) -> str:
        """The pool that serves `pool_key` (common.drafting.pool_keys: itself, else its parents,
        else the global pool); exact: itself or UnknownPool."""
        if not exact:
            return resolve_pool_key(pool_key, self._pools)
        key = pool_key or GLOBAL_POOL
        if key not in self._pools:
            raise UnknownPool(key)
        return key

    def retrieve(self, pool_key: str, context: Sequence[int], *, decoding_length: int, branch_length: int,
                 key_length: int = 2, exact: bool = False) -> tuple[str, int, DraftTree]:
        """(pool used, its version, draft tree) for the continuation of `context`."""
        pool = self._pool(self.resolve(pool_key, exact=exact))
        with pool.lock:
            tree = pool.mirror.retrieve(context, decoding_length=decoding_length, branch_length=branch_length,
                                        key_length=key_length)
            return pool.key, pool.meta.version, tree

    def snapshot(self, pool_key: str) -> Snapshot:
        """The pool's trie at its current version, serialized once per version."""
        pool = self._pool(pool_key)
        with pool.lock:
            cached = pool.snapshot
            if cached is None or cached.version != pool.meta.version:
                cached = Snapshot(pool.key, pool.meta.version, len(pool.mirror), pool.mirror.to_bytes())
                pool.snapshot = cached
            return cached

    def count(self, pool_key: str, path: Sequence[int], kind: str = "output") -> int:
        pool = self._pool(pool_key)
        with pool.lock:
            return pool.mirror.count(path, kind)

    def _pool(self, pool_key: str) -> _Pool:
        pool = self._pools.get(pool_key)
        if pool is None:
            raise UnknownPool(pool_key)
        return pool

    # ------------------------------------------------------------------ writes
    def apply(self, mutation: Mutation, offset: Offset | None = None) -> list[PoolMeta]:
        """Applies one record's mutation with its consumer offset; returns the changed pools."""
        if isinstance(mutation, InsertSequences):
            return self.insert_into([mutation.pool_key, *mutation.also_into], mutation.sequences, mutation.kind,
                                    item_ids=mutation.item_ids, replace_item_input=mutation.replace_item_input,
                                    offset=offset)
        if isinstance(mutation, RemoveItem):
            return self.remove_item(mutation.item_id, mutation.pool_key, offset=offset)
        assert isinstance(mutation, NoChange), mutation
        if offset is not None:
            self.store.store_offset(*offset)
        return []

    def insert(self, pool_key: str, sequences: Sequence[Sequence[int]], kind: str = "output", *,
               item_ids: Sequence[str] = (), replace_item_input: bool = False,
               offset: Offset | None = None) -> PoolMeta | None:
        """Adds the n-grams of `sequences` (remembered under `item_ids`) in one batch.

        Text about an item already removed from the inventory is not inserted (None: nothing
        changed but the offset), so a generation that arrives after its item's removal - the
        two topics are not ordered with each other - cannot bring the item back into drafts.
        `replace_item_input` (the inventory added/changed an item) puts the item back.
        """
        metas = self.insert_into([pool_key], sequences, kind, item_ids=item_ids,
                                 replace_item_input=replace_item_input, offset=offset)
        return metas[0] if metas else None

    def insert_into(self, pool_keys: Sequence[str], sequences: Sequence[Sequence[int]], kind: str = "output", *,
                    item_ids: Sequence[str] = (), replace_item_input: bool = False,
                    offset: Offset | None = None) -> list[PoolMeta]:
        """`insert` into several pools (a record's pool and its task's) in one batch with one
        offset: a crash leaves both or neither. Returns the changed pools' metadata, in order."""
        assert kind in KINDS
        keys = list(dict.fromkeys(pool_keys))
        with self._write_lock:
            if not replace_item_input and item_ids and self.store.removed_items(item_ids):
                if offset is not None:
                    self.store.store_offset(*offset)
                return []
            writer = BatchWriter(self.store)
            if replace_item_input:
                for item in self.store.removed_items(item_ids):
                    writer.unmark_removed(item)
            new = [key for key in keys if key not in self._pools]
            evicted = self._evict_for_new_pools(writer, len(new), keep=keys) if new else []
            pools = {key: self._pools.get(key) or self._empty(key) for key in keys}
            try:
                with contextlib.ExitStack() as locks:
                    for key in sorted(pools):  # writers lock in key order (module docstring)
                        locks.enter_context(pools[key].lock)
                    edits = [self._insert_locked(pools[key], writer, sequences, kind, item_ids, replace_item_input)
                             for key in keys]
                    writer.put_offset(offset)
                    writer.write()
                    for key, (meta, edit) in zip(keys, edits):
                        pools[key].meta, pools[key].next_sequence_id = meta, edit.next_sequence_id
            except BaseException:
                self._reload(keys)
                raise
            self._pools.update(pools)
            for key in evicted:
                self._pools.pop(key, None)
                self.pools_evicted += 1
            return [meta for meta, _ in edits]

    def _insert_locked(self, pool: _Pool, writer: BatchWriter, sequences: Sequence[Sequence[int]], kind: str,
                       item_ids: Sequence[str], replace_item_input: bool) -> tuple[PoolMeta, LedgerEdit]:
        edit = self._ledger_edit(pool)
        retract = []
        if replace_item_input:
            for item in item_ids:
                records = self._item_records(item, pool.key).get(pool.key, [])
                retract += edit.take_back(records, kinds=("input",))
        change = pool.mirror.insert(sequences, kind, retract=retract)
        writer.put_nodes(pool.key, change)
        edit.remember(sequences, kind, item_ids)
        squeezes = pool.meta.squeezes + change.squeezes
        if change.squeezes:
            edit.forget_spent(lambda: self.store.sequences(pool.key), squeezes_now=squeezes)
        edit.forget_oldest(self.store.sequences(pool.key), max_tokens=self.limits.max_sequence_tokens)
        writer.put_ledger(pool.key, edit)
        meta = self._next_meta(pool, edit, nodes=change.nodes, squeezes=squeezes)
        writer.put_meta(meta)
        return meta, edit

    def remove_item(self, item_id: str, pool_key: str | None = None, *,
                    offset: Offset | None = None) -> list[PoolMeta]:
        """Takes back every remembered sequence of the item (in one pool, or all), one batch."""
        with self._write_lock:
            by_pool = self._item_records(item_id, pool_key)
            pools = [self._pools[k] for k in sorted(by_pool) if k in self._pools]
            writer = BatchWriter(self.store)
            if pool_key is None:  # gone from the inventory: later texts about it are ignored too
                writer.mark_removed(item_id, self._clock())
            metas = []
            try:
                with contextlib.ExitStack() as locks:
                    for pool in pools:
                        locks.enter_context(pool.lock)
                    for pool in pools:
                        edit = self._ledger_edit(pool)
                        change = pool.mirror.remove(edit.take_back(by_pool[pool.key], kinds=KINDS))
                        writer.put_nodes(pool.key, change)
                        writer.put_ledger(pool.key, edit)
                        meta = self._next_meta(pool, edit, nodes=change.nodes, squeezes=pool.meta.squeezes)
                        writer.put_meta(meta)
                        metas.append(meta)
                    writer.put_offset(offset)
                    writer.write()
                    for pool, meta in zip(pools, metas):
                        pool.meta = meta  # a removal remembers nothing: next_sequence_id stays
            except BaseException:
                self._reload([p.key for p in pools])
                raise
            return metas

    # ------------------------------------------------------------------ mutation parts
    def _item_records(self, item_id: str, pool_key: str | None) -> dict[str, list[Record]]:
        """The item's remembered sequences by pool (in `pool_key` only, unless None)."""
        by_pool: dict[str, list[Record]] = {}
        for key, sequence_id in self.store.item_sequences(item_id):
            if pool_key is not None and key != pool_key:
                continue
            records = by_pool.setdefault(key, [])
            seq = self.store.sequence(key, sequence_id)
            if seq is not None:
                records.append((sequence_id, seq))
        return by_pool

    @staticmethod
    def _ledger_edit(pool: _Pool) -> LedgerEdit:
        meta = pool.meta
        return LedgerEdit(next_sequence_id=pool.next_sequence_id, squeezes=meta.squeezes,
                          sequences=meta.sequences, sequence_tokens=meta.sequence_tokens)

    def _next_meta(self, pool: _Pool, edit: LedgerEdit, *, nodes: int, squeezes: int) -> PoolMeta:
        return pool.meta.next_version(
            nodes=nodes, squeezes=squeezes, sequences=edit.sequences, sequence_tokens=edit.sequence_tokens,
            capacity=self.limits.capacity, row_bytes=node_bytes(pool.key, self._row_depth),
            updated_at=self._clock())

    def _evict_for_new_pools(self, writer: BatchWriter, count: int, *, keep: Sequence[str] = ()) -> list[str]:
        """Makes room for `count` more pools: drops the least recently updated ones (never global,
        never one in `keep`, which this write is about to change)."""
        others = [p for k, p in self._pools.items() if k != GLOBAL_POOL and k not in keep]
        excess = max(0, len(self._pools) - 1 - self.limits.max_pools + count)
        victims = sorted(others, key=lambda p: (p.meta.updated_at, p.key))[:excess]
        for victim in victims:
            writer.drop_pool(victim.key)
            log.info("pool evicted (max_pools)",
                     extra={"pool_key": victim.key, "nodes": victim.meta.nodes})
        return [v.key for v in victims]
