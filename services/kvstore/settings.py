from __future__ import annotations

from pydantic import Field

from common.settings import MiB, ServiceSettings

GiB = 1024 * MiB
DAY_S = 24 * 3600.0


class KvStoreSettings(ServiceSettings):
    memory_budget_bytes: int = Field(1024 * MiB, ge=0, description="memory tier size (LRU over the disk tier)")
    disk_budget_bytes: int = Field(
        32 * GiB, ge=0,
        description="disk tier size: bytes of blocks kept in RocksDB (keys, headers, data; not RocksDB's "
                    "own overhead, so leave the volume headroom); past it Put evicts least recently used "
                    "blocks (0 = unbounded)")
    model_idle_eviction_s: float = Field(
        7 * DAY_S, ge=0,
        description="blocks of a model id no Put/Get/Contains has named for this long are evicted first "
                    "(0 = off)")
    max_block_bytes: int = Field(256 * MiB, ge=1, description="largest block KV accepted by Put")
    chunk_bytes: int = Field(1 * MiB, ge=1024, description="data chunk size when streaming a block back")
    shard: int = Field(0, ge=0, description="this instance's shard ordinal")
