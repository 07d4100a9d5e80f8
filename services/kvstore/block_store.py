"""Block KV storage: an LRU memory tier with a byte budget over a RocksDB disk tier.

A block is (header, raw bytes). Every put is checked (dtype, shape, size, checksum) before it
is stored, and every read re-verifies the checksum, so a corrupted block is never served. The
checksum and the dtype sizes are the block codec's (common/blocks/kv_codec.py), shared with the
decoder that writes the blocks; the header stays the protobuf message here (it is stored
serialized, so rows already on disk keep reading).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from rocksdict import Options, Rdict

from adaccel.v1 import kvstore_pb2
from common.blocks.kv_codec import DTYPE_BYTES, checksum, non_finite_values
from common.rpc.errors import InvalidArgument, NotFound, ResourceExhausted

MAX_MODEL_ID_BYTES = 256


def storage_key(model_id: str, block_hash: bytes) -> bytes:
    model = model_id.encode()
    return len(model).to_bytes(2, "big") + model + block_hash


@dataclass(slots=True)
class StoredBlock:
    header: kvstore_pb2.KvHeader
    data: bytes


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
        raise ResourceExhausted(f"header.total_bytes: {header.total_bytes} bytes, limit is {max_block_bytes}")
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
    def __init__(self, path: Path, memory_budget_bytes: int, max_block_bytes: int):
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options)
        self._memory: OrderedDict[bytes, StoredBlock] = OrderedDict()
        self._memory_bytes = 0
        self.memory_budget_bytes = memory_budget_bytes
        self.max_block_bytes = max_block_bytes
        self._lock = threading.Lock()
        self.gets = 0
        self.hits = 0

    def put(self, header: kvstore_pb2.KvHeader, data: bytes) -> bool:
        """Stores a verified block; False when an equal block is already there."""
        validate_block(header, data, self.max_block_bytes)
        key = storage_key(header.model_id, header.block_hash)
        with self._lock:
            if key in self._memory or self._db.get(key) is not None:
                return False
            header_bytes = header.SerializeToString()
            self._db[key] = len(header_bytes).to_bytes(4, "big") + header_bytes + data
            self._remember(key, StoredBlock(header, data))
            return True

    def get(self, model_id: str, block_hash: bytes) -> StoredBlock:
        key = storage_key(model_id, block_hash)
        with self._lock:
            self.gets += 1
            block = self._memory.get(key)
            if block is not None:
                self._memory.move_to_end(key)
            else:
                raw = self._db.get(key)
                if raw is None:
                    raise NotFound(f"block {block_hash.hex()} of model {model_id!r} is not stored")
                n = int.from_bytes(raw[:4], "big")
                header = kvstore_pb2.KvHeader.FromString(raw[4:4 + n])
                block = StoredBlock(header, raw[4 + n:])
                self._remember(key, block)
            if checksum(block.data) != block.header.checksum:
                # Never serve a corrupted block: drop it so the caller recomputes and re-puts.
                self._forget(key)
                del self._db[key]
                raise NotFound(f"block {block_hash.hex()} failed its checksum and was dropped")
            self.hits += 1
            return block

    def contains(self, model_id: str, block_hashes: list[bytes]) -> list[bool]:
        with self._lock:
            out = []
            for h in block_hashes:
                key = storage_key(model_id, h)
                out.append(key in self._memory or self._db.get(key) is not None)
            return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            disk_blocks = sum(1 for _ in self._db.keys())
            return {"memory_blocks": len(self._memory), "memory_bytes": self._memory_bytes,
                    "disk_blocks": disk_blocks, "gets": self.gets, "hits": self.hits}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _remember(self, key: bytes, block: StoredBlock) -> None:
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
