from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    decoder_addrs: Annotated[list[str], NoDecode] = Field(default_factory=list, description="decoder replicas host:port, comma-separated")
    heartbeat_s: float = Field(1.0, gt=0, description="seconds between replica reports")
    default_deadline_s: float = Field(120.0, gt=0, description="deadline when the caller sets none")
    max_new_tokens: int = Field(512, ge=1, description="largest max_new_tokens accepted")
    max_blocks: int = Field(256, ge=1, description="prompt blocks per request at most")

    @field_validator("decoder_addrs", mode="before")
    @classmethod
    def split_commas(cls, value):
        # Env vars and k8s ConfigMaps carry "host:port,host:port", not JSON.
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value
