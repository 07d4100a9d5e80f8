"""Block KV storage: an LRU memory tier with a byte budget over a RocksDB disk tier with its own.

A block is (header, raw bytes). Every put is checked (dtype, shape, size, checksum) before it
is stored, and every read re-verifies the checksum, so a corrupted block is never served. The
checksum and the dtype sizes are the block codec's (common/blocks/kv_codec.py), shared with the
decoder that writes the blocks; the header stays the protobuf message here (it is stored
serialized, so rows already on disk keep reading).

The disk tier is a cache too: it has a byte budget (`disk_budget_bytes`) and evicts, so a Get
may answer NOT_FOUND for a block stored earlier and the caller recomputes it. See `BlockStore`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError
from rocksdict import Options, Rdict, ReadOptions, WriteBatch

from adaccel.v1 import kvstore_pb2
from common.blocks.kv_codec import DTYPE_BYTES, checksum, non_finite_values
from common.rpc.errors import InvalidArgument, NotFound, Reason, ResourceExhausted

MAX_MODEL_ID_BYTES = 256
# Why a block left the disk tier (the stats name the counters after these).
EVICT_LRU = "lru"
EVICT_IDLE_MODEL = "idle_model"

log = logging.getLogger(__name__)


def storage_key(model_id: str, block_hash: bytes) -> bytes:
    model = model_id.encode()
    return len(model).to_bytes(2, "big") + model + block_hash


def _model_of(key: bytes) -> str:
    """The model id a storage key names (rows are only written by `storage_key`; a malformed key
    still gets a name, so it is indexed and evictable like any other)."""
    n = int.from_bytes(key[:2], "big")
    return key[2:2 + n].decode("utf-8", "replace")


@dataclass(slots=True)
class StoredBlock:
    header: kvstore_pb2.KvHeader
    data: bytes


def _encode_row(header_bytes: bytes, data: bytes) -> bytes:
    return len(header_bytes).to_bytes(4, "big") + header_bytes + data


def _decode_row(raw: bytes) -> StoredBlock | None:
    """The block a row holds; None when the row is too short or its header does not parse."""
    if len(raw) < 4:
        return None
    n = int.from_bytes(raw[:4], "big")
    if 4 + n > len(raw):
        return None
    try:
        header = kvstore_pb2.KvHeader.FromString(raw[4:4 + n])
    except DecodeError:
        return None
    return StoredBlock(header, raw[4 + n:])


@dataclass(slots=True, eq=False)
class _ModelState:
    """One model id with blocks on disk: when it was last named by a Put, Get or Contains, and its keys."""

    model_id: str
    last_asked: float
    keys: set[bytes] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _DiskEntry:
    """One row of the disk tier. A new object per write of the key: a reader that saw this object
    and still finds it in the index knows the row it read is the one the index describes."""

    size: int  # stored bytes: key + row (length prefix, header, data)
    model: _ModelState
    last_access: float  # clock() of the last Put or Get of this block


def validate_block(header: kvstore_pb2.KvHeader, data: bytes, max_block_bytes: int) -> None:
    if not header.block_hash or len(header.block_hash) > 64:
        raise InvalidArgument("header.block_hash: 1-64 bytes required")
    if not header.model_id or len(header.model_id.encode()) > MAX_MODEL_ID_BYTES:
        raise InvalidArgument(f"header.model_id: 1-{MAX_MODEL_ID_BYTES} bytes required")
    if header.dtype not in DTYPE_BYTES:
        raise InvalidArgument(f"header.dtype: {header.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if not header.shape or any(d <= 0 for d in header.shape):
        raise InvalidArgument(f"header.shape: positive dimensions required, got {list(header.shape)}")
    if header.total_bytes > max_block_bytes:
        raise ResourceExhausted(f"header.total_bytes: {header.total_bytes} bytes, limit is {max_block_bytes}",
                                field="header.total_bytes", limit=max_block_bytes)
    expected = DTYPE_BYTES[header.dtype]
    for d in header.shape:
        expected *= d
    if expected != header.total_bytes:
        raise InvalidArgument(
            f"header.total_bytes: {header.total_bytes} does not match shape {list(header.shape)} of {header.dtype}"
        )
    if len(data) != header.total_bytes:
        raise InvalidArgument(f"data: received {len(data)} bytes, header says {header.total_bytes}")
    if checksum(data) != header.checksum:
        raise InvalidArgument("header.checksum: does not match the data received")
    # A NaN or Inf in cached keys/values would poison every attention that reads the block.
    bad = non_finite_values(header.dtype, data)
    if bad:
        raise InvalidArgument(f"data: {bad} Inf/NaN values in a {header.dtype} block; KV must be finite")


class BlockStore:
    """Blocks in RocksDB (the disk tier) with an LRU memory tier over it.

    Disk index: `_disk` maps every stored key to (stored size, model, last access), in LRU
    order (an OrderedDict, least recently used first). It is built once, in the constructor, by
    iterating the DB: that is the one scan, at start-up, before the server serves and outside
    any serving lock. It reads every row once (sequentially, without filling the block cache);
    sizes count the key and the whole row (length prefix, serialized header, data), i.e. what
    Put wrote, not RocksDB's on-disk overhead or compression. After it, `stats()` and
    `contains()` answer from the index in O(1) per figure or key, and Put never reads the DB to
    find duplicates.

    Eviction (in `put`, before the new block is written; RocksDB deletes, one WriteBatch when
    there are several; evicted blocks leave the memory tier too):
      1. idle models first: when `model_idle_eviction_s` > 0, every block of a model id that no
         Put, Get or Contains has named for that long goes, on the next Put, whether or not space
         is needed. Models are kept in last-asked order, so the check is one look at the oldest.
      2. then least recently used: while the stored bytes plus the new block would exceed
         `disk_budget_bytes` (> 0), the least recently Put or Get block goes. A Contains
         refreshes its model's stamp, not the blocks' LRU positions (it reads nothing).
    A block whose stored size alone exceeds `disk_budget_bytes` is refused (ResourceExhausted,
    naming the limit) and nothing is evicted for it. A Get of an evicted block is NOT_FOUND,
    as for any block never stored: callers recompute and re-put.

    Restart: LRU order and the stamps live in memory only (a Get never writes to RocksDB). At
    open the order is the DB's iteration order (key order: grouped by model, then block hash),
    and every model present is stamped "asked now", so idle eviction counts from the open. If
    the DB holds more than the budget at open (the budget was lowered), blocks are evicted in
    that order until it fits.

    Locking: one lock guards the index, the memory tier and the counters. Put builds the row and
    Get reads and checksums it outside the lock; writes and deletes happen under it, index
    updated only after RocksDB accepted them, so index and DB agree at every lock release.

    `clock` gives the stamps (seconds; must not go backwards: default time.monotonic); tests pass
    a fake one. `disk_budget_bytes=0` is unbounded and `model_idle_eviction_s=0` turns idle
    eviction off (the constructor's defaults; the service's come from KvStoreSettings).
    """

    def __init__(self, path: Path, memory_budget_bytes: int, max_block_bytes: int, *,
                 disk_budget_bytes: int = 0, model_idle_eviction_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options)
        self._memory: OrderedDict[bytes, StoredBlock] = OrderedDict()
        self._memory_bytes = 0
        self.memory_budget_bytes = memory_budget_bytes
        self.max_block_bytes = max_block_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.model_idle_eviction_s = model_idle_eviction_s
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._disk: OrderedDict[bytes, _DiskEntry] = OrderedDict()
        self._disk_bytes = 0
        self._models: OrderedDict[str, _ModelState] = OrderedDict()  # least recently asked first
        self.gets = 0
        self.hits = 0
        self.evicted_blocks = {EVICT_LRU: 0, EVICT_IDLE_MODEL: 0}
        self.evicted_bytes = {EVICT_LRU: 0, EVICT_IDLE_MODEL: 0}
        self.dropped_corrupt_blocks = 0
        self._load_index()

    def _load_index(self) -> None:
        """The one scan of the DB: at open, before anything else can reach the store."""
        now = self._clock()
        read_opt = ReadOptions()
        read_opt.fill_cache(False)
        for key, raw in self._db.items(read_opt=read_opt):
            self._index(key, len(key) + len(raw), _model_of(key), now)
        with self._lock:
            victims = self._plan_evictions(0, now)
            if victims:
                log.warning("kvstore: %d bytes on disk at open, over disk_budget_bytes=%d; "
                            "evicting %d blocks",
                            self._disk_bytes, self.disk_budget_bytes, len(victims))
            self._evict(victims)

    def put(self, header: kvstore_pb2.KvHeader, data: bytes) -> bool:
        """Stores a verified block; False when an equal block is already there (that Put counts
        as a use of the block and of its model)."""
        validate_block(header, data, self.max_block_bytes)
        key = storage_key(header.model_id, header.block_hash)
        header_bytes = header.SerializeToString()
        size = len(key) + 4 + len(header_bytes) + len(data)
        if self.disk_budget_bytes and size > self.disk_budget_bytes:
            raise ResourceExhausted(f"block: {size} bytes stored (key, header and data), "
                                    f"limit is disk_budget_bytes={self.disk_budget_bytes}",
                                    field="data", limit=self.disk_budget_bytes)
        with self._lock:
            if self._touch_stored(key):
                return False
        row = _encode_row(header_bytes, data)  # up to max_block_bytes copied: outside the lock
        with self._lock:
            if self._touch_stored(key):
                return False
            now = self._clock()
            state = self._models.get(header.model_id)
            if state is not None:
                self._touch_model(state, now)  # so its own Put never finds it idle
            self._evict(self._plan_evictions(size, now))
            self._db[key] = row
            self._index(key, size, header.model_id, now)
            self._remember(key, StoredBlock(header, data))
            return True

    def get(self, model_id: str, block_hash: bytes) -> StoredBlock:
        key = storage_key(model_id, block_hash)
        with self._lock:
            self.gets += 1
            now = self._clock()
            state = self._models.get(model_id)
            if state is not None:
                self._touch_model(state, now)
            entry = self._disk.get(key)
            if entry is None:
                raise NotFound(f"block {block_hash.hex()} of model {model_id!r} is not stored",
                               reason=Reason.BLOCK_NOT_FOUND)
            entry.last_access = now
            self._disk.move_to_end(key)
            block = self._memory.get(key)
            if block is not None:
                self._memory.move_to_end(key)
        from_disk = block is None
        raw = None
        if from_disk:  # the read and the checksum, up to max_block_bytes each, outside the lock
            raw = self._db.get(key)
            block = _decode_row(raw) if raw is not None else None
        ok = block is not None and checksum(block.data) == block.header.checksum
        with self._lock:
            current = self._disk.get(key) is entry  # else evicted meanwhile: the row we read is gone
            if not ok:
                if from_disk and raw is None:
                    if current:  # deleted behind the index's back: the index follows the DB
                        self._unindex(key)
                    raise NotFound(f"block {block_hash.hex()} of model {model_id!r} is not stored",
                                   reason=Reason.BLOCK_NOT_FOUND)
                if current:
                    # Never serve a corrupted block: drop it so the caller recomputes and re-puts.
                    del self._db[key]
                    self._unindex(key)
                    self.dropped_corrupt_blocks += 1
                what = "failed its checksum" if block is not None else "is malformed (its row does not parse)"
                raise NotFound(f"block {block_hash.hex()} {what} and was dropped",
                               reason=Reason.BLOCK_NOT_FOUND)
            self.hits += 1
            if from_disk and current:
                self._remember(key, block)
            return block

    def contains(self, model_id: str, block_hashes: list[bytes]) -> list[bool]:
        """From the index, no DB reads; refreshes the model's stamp, not the blocks' LRU order."""
        with self._lock:
            state = self._models.get(model_id)
            if state is not None:
                self._touch_model(state, self._clock())
            return [storage_key(model_id, h) in self._disk for h in block_hashes]

    def stats(self) -> dict[str, int]:
        """Figures from the index and counters (no scan), plus RocksDB's own estimates: keys
        (which counts rows not yet compacted away, so may exceed disk_blocks), SST bytes and live
        data bytes (0 while everything is still in the memtable, or when RocksDB has no figure)."""
        with self._lock:
            if self._closed:
                rocks = {}
            else:  # in-memory properties, microseconds: under the lock only so close() cannot race
                rocks = {name: self._db.property_int_value(prop) for name, prop in (
                    ("disk_estimated_keys", "rocksdb.estimate-num-keys"),
                    ("disk_sst_bytes", "rocksdb.total-sst-files-size"),
                    ("disk_live_data_bytes", "rocksdb.estimate-live-data-size"))}
            out = {"memory_blocks": len(self._memory), "memory_bytes": self._memory_bytes,
                   "disk_blocks": len(self._disk), "disk_bytes": self._disk_bytes,
                   "disk_budget_bytes": self.disk_budget_bytes, "models": len(self._models),
                   "gets": self.gets, "hits": self.hits,
                   "evicted_lru_blocks": self.evicted_blocks[EVICT_LRU],
                   "evicted_lru_bytes": self.evicted_bytes[EVICT_LRU],
                   "evicted_idle_model_blocks": self.evicted_blocks[EVICT_IDLE_MODEL],
                   "evicted_idle_model_bytes": self.evicted_bytes[EVICT_IDLE_MODEL],
                   "dropped_corrupt_blocks": self.dropped_corrupt_blocks}
        for name in ("disk_estimated_keys", "disk_sst_bytes", "disk_live_data_bytes"):
            value = rocks.get(name)
            out[name] = value if isinstance(value, int) else 0
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # ---- under the lock --------------------------------------------------------------------

    def _touch_stored(self, key: bytes) -> bool:
        """Whether key is stored; if so, refreshes it and its model (a duplicate Put is a use)."""
        entry = self._disk.get(key)
        if entry is None:
            return False
        now = self._clock()
        entry.last_access = now
        self._disk.move_to_end(key)
        self._touch_model(entry.model, now)
        return True

    def _touch_model(self, state: _ModelState, now: float) -> None:
        state.last_asked = now
        self._models.move_to_end(state.model_id)

    def _index(self, key: bytes, size: int, model_id: str, now: float) -> None:
        state = self._models.get(model_id)
        if state is None:
            state = self._models[model_id] = _ModelState(model_id, now)
        state.keys.add(key)
        self._disk[key] = _DiskEntry(size, state, now)
        self._disk_bytes += size

    def _unindex(self, key: bytes) -> _DiskEntry:
        """Forgets a key the DB no longer holds: index, its model's keys, the memory tier."""
        entry = self._disk.pop(key)
        self._disk_bytes -= entry.size
        entry.model.keys.discard(key)
        if not entry.model.keys:
            del self._models[entry.model.model_id]
        self._forget(key)
        return entry

    def _plan_evictions(self, incoming: int, now: float) -> list[tuple[bytes, str]]:
        """Keys to evict, and why, so that `incoming` more bytes fit; mutates nothing."""
        victims: list[tuple[bytes, str]] = []
        chosen: set[bytes] = set()
        freed = 0
        if self.model_idle_eviction_s > 0:
            cutoff = now - self.model_idle_eviction_s
            for state in self._models.values():  # least recently asked first: stops at the first live one
                if state.last_asked > cutoff:
                    break
                for key in state.keys:
                    victims.append((key, EVICT_IDLE_MODEL))
                    chosen.add(key)
                    freed += self._disk[key].size
        if self.disk_budget_bytes > 0:
            excess = self._disk_bytes - freed + incoming - self.disk_budget_bytes
            if excess > 0:
                for key, entry in self._disk.items():  # least recently used first
                    if key in chosen:
                        continue
                    victims.append((key, EVICT_LRU))
                    excess -= entry.size
                    if excess <= 0:
                        break
        return victims

    def _evict(self, victims: list[tuple[bytes, str]]) -> None:
        """Deletes the rows (one batch), then, once RocksDB took it, the index entries."""
        if not victims:
            return
        if len(victims) == 1:
            del self._db[victims[0][0]]
        else:
            batch = WriteBatch(raw_mode=True)
            for key, _ in victims:
                batch.delete(key)
            self._db.write(batch)
        for key, reason in victims:
            entry = self._unindex(key)
            self.evicted_blocks[reason] += 1
            self.evicted_bytes[reason] += entry.size

    def _remember(self, key: bytes, block: StoredBlock) -> None:
        if key in self._memory:  # another Get put it there while this one read the disk
            self._memory.move_to_end(key)
            return
        size = len(block.data)
        if size > self.memory_budget_bytes:
            return  # lives on disk only
        self._memory[key] = block
        self._memory_bytes += size
        while self._memory_bytes > self.memory_budget_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._memory_bytes -= len(evicted.data)

    def _forget(self, key: bytes) -> None:
        block = self._memory.pop(key, None)
        if block is not None:
            self._memory_bytes -= len(block.data)
