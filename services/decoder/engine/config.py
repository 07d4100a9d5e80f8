"""Settings of the decoding engine and of one generation request, and the per-step record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.drafting.budget import DEFAULT_DRAFT_MARGIN
from common.drafting.confidence import DEFAULT_WEIGHTS
from common.drafting.geometry import DEFAULT_GEOMETRY

# The one draft geometry (common/drafting/geometry.py says why these sizes); the decoder's
# settings default to the same, and benches pass their own.
DEFAULT_DECODING_LENGTH = DEFAULT_GEOMETRY.decoding_length
DEFAULT_BRANCH_LENGTH = DEFAULT_GEOMETRY.branch_length
DEFAULT_KEY_LENGTH = DEFAULT_GEOMETRY.key_length
DEFAULT_KV_SPARE_COLUMNS = 128


@dataclass(slots=True, frozen=True)
class EngineSettings:
    decoding_length: int = DEFAULT_DECODING_LENGTH  # draft tokens per step and request
    branch_length: int = DEFAULT_BRANCH_LENGTH  # max draft depth
    key_length: int = DEFAULT_KEY_LENGTH  # context tokens matched in the trie
    device: str | None = None  # None: the model's device
    # Total draft tokens per forward across a batch, split evenly over active rows (PIA's
    # bat_get); None: each row drafts its own decoding_length.
    batch_draft_tokens: int | None = None
    # Insert each finished output into its pool ("output" n-grams, PIA's self-learning). Off by
    # default: in the stack, pools are fed by the pool service from the Kafka topic.
    learn_from_outputs: bool = False
    # Batched rows keep different numbers of columns per step; compact the cache once that
    # would free this share of it (down to its fullest row; a whole-cache copy, so rarely).
    compact_hole_fraction: float = 0.5
    # Cache columns reserved past each layer's end, so that a step writes its KV in place
    # instead of copying the whole cache (services/decoder/engine/spare_capacity.py); a row
    # then copies its cache once per this many new columns. Default model: 46 KB per column
    # and row in float32, so 128 columns are ~6 MB a row. 0: transformers' DynamicLayer.
    kv_spare_columns: int = DEFAULT_KV_SPARE_COLUMNS
    pad_token_id: int = 0
    # Adaptive drafting: each step's tree (per row, under batching per forward) is the one that
    # maximises expected accepted tokens per predicted second (common/drafting/budget.py);
    # decoding_length / branch_length then only cap the candidates it chooses from.
    adaptive: bool = False
    # Adaptive drafting's acceptance model (common/drafting/confidence.py FEATURES); None: the
    # trie's smoothed frequencies alone.
    confidence_weights: tuple[float, ...] | None = DEFAULT_WEIGHTS
    # Adaptive drafting at batch sizes its cost profile never reached: a drafting step is priced
    # this many one-token steps dearer (common/drafting/budget.py, plan_budget's draft_margin).
    adaptive_draft_margin: float = DEFAULT_DRAFT_MARGIN
    # Tree steps skip transformers' per-call plumbing (services/decoder/engine/lean_forward.py:
    # same logits, ~0.8 ms less per step on the default CPU model); off: the model's forward.
    lean_forward: bool = True

    def __post_init__(self) -> None:
        assert self.decoding_length >= 0 and self.branch_length >= 0 and self.key_length >= 1
        assert 0.0 < self.compact_hole_fraction <= 1.0
        assert self.kv_spare_columns >= 0


@dataclass(slots=True)
class GenerationConfig:
    max_new_tokens: int
    mode: Literal["strict", "relaxed"] = "strict"
    relaxed_top_k: int = 2  # DARE's run scripts: top-2, p >= 0.1
    relaxed_min_prob: float = 0.1
    temperature: float = 0.0  # > 0: speculative sampling (mode is then ignored)
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    drafting: bool = True  # False: plain decoding through the same loop ("engine_greedy")
    decoding_length: int | None = None  # None: EngineSettings.decoding_length
    branch_length: int | None = None  # None: EngineSettings.branch_length
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.mode not in ("strict", "relaxed"):
            raise ValueError(f"mode must be 'strict' or 'relaxed', got {self.mode!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if self.relaxed_top_k < 1 or not 0 <= self.relaxed_min_prob <= 1:
            raise ValueError("need relaxed_top_k >= 1 and 0 <= relaxed_min_prob <= 1")
        for name in ("decoding_length", "branch_length"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(slots=True)
class StepResult:
    token_ids: list[int] = field(default_factory=list)  # emitted this step, bonus token included
    drafted: int = 0  # draft tokens in this step's tree
    accepted: int = 0  # draft tokens among token_ids
