from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.drafting.geometry import DEFAULT_GEOMETRY
from common.settings import KafkaSettings, ServiceSettings


class PoolSettings(ServiceSettings, KafkaSettings):
    model_path: Path | None = Field(None, description="checkpoint whose tokenizer encodes inserted texts")
    vocab_size: int = Field(0, ge=0, description="token ids must be below this (0 = from the tokenizer, or unchecked)")
    ngram_length: int = Field(DEFAULT_GEOMETRY.ngram_length, ge=2, le=64,
                              description=f"tokens per stored n-gram (key_length {DEFAULT_GEOMETRY.key_length} "
                                          f"+ the decoders' branch_length {DEFAULT_GEOMETRY.branch_length})")
    max_tokens_per_insert: int = Field(65_536, ge=1, description="tokens one Insert (or one record) may carry")
    pool_capacity: int = Field(1 << 17, ge=16,
                               description="trie nodes per pool; above it the pool decays (halves counts, prunes)")
    max_pools: int = Field(64, ge=1,
                           description="pools per service (global not counted); a new one evicts the least recently updated")
    squeeze_to: float = Field(0.75, gt=0, lt=1, description="decay until nodes <= squeeze_to * pool_capacity")
    input_weight: float = Field(0.5, ge=0, description="weight of prompt/item-text n-grams against generated ones")
    max_sequence_tokens: int = Field(1 << 21, ge=1024,
                                     description="tokens per pool remembered for removal by item (oldest forgotten first)")
    snapshot_chunk_bytes: int = Field(1 << 20, ge=1024, description="bytes per GetSnapshot message")
