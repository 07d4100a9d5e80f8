from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    decoder_addrs: Annotated[list[str], NoDecode] = Field(default_factory=list, description="decoder replicas host:port, comma-separated")
    heartbeat_s: float = Field(1.0, gt=0, description="seconds between replica reports")
    default_deadline_s: float = Field(120.0, gt=0, description="deadline when the caller sets none")
    max_new_tokens: int = Field(512, ge=1, description="largest max_new_tokens accepted")
    max_blocks: int = Field(256, ge=1, description="prompt blocks per request at most")
    scheduling_policy: Literal["affinity", "least_loaded", "round_robin"] = Field(
        "affinity", description="replica choice: cache affinity weighed against load, least loaded, or round robin")
    affinity_block_weight: float = Field(1.0, ge=0, description="affinity: a held prompt token saves this many tokens of "
                                         "prefill (1: what it costs; more favours locality over load)")
    affinity_pool_weight: float = Field(0.5, ge=0, description="affinity: a held pool is worth this many running requests")
    affinity_request_tokens: float = Field(40.0, ge=0, description="affinity: a running request delays a new one's "
                                           "first token as much as this many prompt tokens of prefill (one decode step: ~0.12 s on the "
                                           "reference CPU, ~3 ms a prefill token; larger on a GPU, where steps cost more prefill)")
    chars_per_token: float = Field(4.0, gt=0, description="affinity: prompt characters per token (the router has no tokenizer)")
    tokens_per_request: float = Field(4096.0, gt=0, description="least_loaded: tokens in flight counted as one queued request")
    max_streams: int = Field(0, ge=0, description="concurrent Generate streams; past it RESOURCE_EXHAUSTED with a retry "
                             "hint (0: workers - 2, leaving threads for health and Info)")

    @property
    def stream_cap(self) -> int:
        return self.max_streams or max(1, self.workers - 2)

    @field_validator("decoder_addrs", mode="before")
    @classmethod
    def split_commas(cls, value):
        # Env vars and k8s ConfigMaps carry "host:port,host:port", not JSON.
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value
