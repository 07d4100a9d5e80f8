from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.settings import KafkaSettings, ServiceSettings


class DecoderSettings(ServiceSettings, KafkaSettings):
    model_path: Path = Field(Path("data/models/default"), description="local Hugging Face checkpoint directory")
    decoder_id: str = Field("", description="replica id (default: decoder-<port>)")
    device: str = Field("cpu", description="torch device")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0 = torch default)")
    max_prompt_tokens: int = Field(4096, ge=16, description="longest prompt accepted, in tokens")
    max_new_tokens: int = Field(512, ge=1, description="largest max_new_tokens accepted")
    max_blocks: int = Field(256, ge=1, description="prompt blocks per request at most")
    max_queue: int = Field(16, ge=1, description="requests admitted (running + waiting); more -> RESOURCE_EXHAUSTED")
    decoding_length: int = Field(16, ge=1, description="default draft tokens per verification step")
    branch_length: int = Field(8, ge=1, description="default depth of a draft branch")
    pool_addr: str = Field("", description="retrieval-pool service host:port (empty = prompt overlay only)")
    pool_refresh_s: float = Field(2.0, gt=0, description="seconds between pool version checks (snapshots fetched when moved)")
    pool_cache_pools: int = Field(16, ge=1, description="pool snapshots held (LRU; the global pool not counted)")
