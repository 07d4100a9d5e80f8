"""In-process lookahead decoding engine (the decoder service wraps it; no gRPC here)."""

from common.drafting.trie import TokenTrie
from services.decoder.engine.config import EngineSettings, GenerationConfig, StepResult
from services.decoder.engine.engine import (
    STEP_PARTS,
    BatchSession,
    DecodingEngine,
    PendingPrefill,
    RequestState,
    StepTimer,
)

__all__ = [
    "STEP_PARTS", "BatchSession", "DecodingEngine", "PendingPrefill", "EngineSettings", "GenerationConfig", "RequestState",
    "StepResult", "StepTimer", "TokenTrie",
]
