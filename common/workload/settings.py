"""Sizes and knobs of the synthetic workload, validated once when built.

`WorkloadSettings()` is the default size (about 20k items / 5k users); `WorkloadSettings.quick()`
the size end-to-end tests use (about 2k / 500). Everything downstream is a pure function of
these settings, so equal settings give byte-identical workloads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.workload.lexicon import CATEGORIES


@dataclass(slots=True, frozen=True)
class WorkloadSettings:
    num_items: int = 20_000
    num_users: int = 5_000
    seed: int = 20_26
    # Zipf exponent of item popularity: popularity ~ 1 / rank**s.
    popularity_exponent: float = 1.05
    brands_per_category: int = 8
    # Held-out items and users never appear in a warm prompt or the training corpus.
    heldout_item_fraction: float = 0.03
    heldout_user_fraction: float = 0.05
    # Clicks per user (inclusive range); a prompt shows the newest `history_shown` of them.
    history_length: tuple[int, int] = (8, 24)
    history_shown: int = 10
    inventory_events: int = 2_000
    # Prompts per task and split.
    item_knowledge_warm: int = 6_000
    item_knowledge_heldout: int = 200
    user_summary_warm: int = 2_000
    user_summary_heldout: int = 100
    generative_rec_warm: int = 600
    generative_rec_heldout: int = 100
    # Candidates per generative-rec prompt (inclusive); 10-50 makes 1k-4k-token prompts.
    rec_candidates: tuple[int, int] = (10, 50)
    # Extra, shorter rec prompts for the training corpus only: training on 4k-token prompts
    # would eat the CPU budget, while the answer format is the same.
    train_rec_prompts: int = 1_200
    train_rec_candidates: tuple[int, int] = (3, 8)

    def __post_init__(self) -> None:
        # One item per category at least, so every category has something to write about.
        min_items = len(CATEGORIES)
        if self.num_items < min_items:
            raise ValueError(
                f"num_items must be >= {min_items} (one item per category), got {self.num_items}"
            )
        if self.num_users < 1:
            raise ValueError(f"num_users must be >= 1, got {self.num_users}")
        for name in ("heldout_item_fraction", "heldout_user_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for name in ("history_length", "rec_candidates", "train_rec_candidates"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range 1 <= low <= high, got {(low, high)}")
        if self.history_shown < 1:
            raise ValueError(f"history_shown must be >= 1, got {self.history_shown}")
        if self.brands_per_category < 1:
            raise ValueError(f"brands_per_category must be >= 1, got {self.brands_per_category}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{field.name} must be >= 0, got {value}")

    @classmethod
    def quick(cls, **overrides) -> "WorkloadSettings":
        """About 2k items / 500 users and a tenth of the prompts: for end-to-end tests."""
        values = dict(
            num_items=2_000,
            num_users=500,
            inventory_events=200,
            item_knowledge_warm=600,
            item_knowledge_heldout=40,
            user_summary_warm=200,
            user_summary_heldout=20,
            generative_rec_warm=60,
            generative_rec_heldout=20,
            train_rec_prompts=120,
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
