from __future__ import annotations

from pydantic import Field

from common.settings import MiB, ServiceSettings


class KvStoreSettings(ServiceSettings):
    memory_budget_bytes: int = Field(1024 * MiB, ge=0, description="memory tier size (LRU over the disk tier)")
    max_block_bytes: int = Field(256 * MiB, ge=1, description="largest block KV accepted by Put")
    chunk_bytes: int = Field(1 * MiB, ge=1024, description="data chunk size when streaming a block back")
    shard: int = Field(0, ge=0, description="this instance's shard ordinal")
