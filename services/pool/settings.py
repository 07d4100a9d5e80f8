from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.settings import KafkaSettings, ServiceSettings


class PoolSettings(ServiceSettings, KafkaSettings):
    model_path: Path | None = Field(None, description="checkpoint whose tokenizer encodes inserted texts")
    vocab_size: int = Field(0, ge=0, description="token ids must be below this (0 = from the tokenizer, or unchecked)")
    ngram_length: int = Field(9, ge=2, le=64, description="tokens per inserted n-gram (branch_length + 1)")
    max_tokens_per_insert: int = Field(65_536, ge=1, description="tokens one Insert may carry")
    consumer_group: str = Field("adaccel-pool", description="Kafka consumer group of the updater")
