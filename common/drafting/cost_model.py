"""Predicted cost of one verification step: a small fit over (tree width, batch size, cache length).

Measured on the device in use (services/decoder/cost_profile.py), then used every step by the
draft budget chooser (budget.py) to price one more draft token. Pure numpy, no torch.

Model (why this shape): a batched tree step runs one forward over B rows padded to the widest
row's W tokens. Time is flat-ish for small W (fixed per-forward cost: Python, kernel launches,
weight reads) and grows roughly linearly once the matmuls saturate the device; attention adds
terms in the cache length L. How steeply it grows depends on B (per-row work: masks,
verification, attention over each row's cache), so each profiled batch size gets its own fit,

    t_B(W, L) = a + b * W + sum_k h_k * max(0, W - knot_k) + c * L + d * W * L

(hinge knots at the profiled widths where the curve bends most: a piecewise-linear curve in W
whose slope may change at each knot). A batch size in between two profiled ones is priced from
both at the same total tokens W x B and interpolated linearly in B (beyond the largest
profiled one, extrapolated from the last two). Pricing B rows from a profile of B0 rows also
scales the cache term c * L by B / B0: every row's attention reads its own cache (the W x L term
scales with the widths already). Without that, 16 rows x 3,400 cached tokens priced from a
1-row profile came out at ~0.45 of what they took on the default CPU model. Least squares on
relative error; predictions never decrease with W (noise must not make a bigger tree look
cheaper).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(slots=True, frozen=True)
class StepTiming:
    """One measured step: `width` tokens per row (root + drafts), `batch` rows, `cache_length`
    cached tokens per row, `seconds` the median wall time."""

    width: int
    batch: int
    cache_length: int
    seconds: float


@dataclass(slots=True)
class StepCostModel:
    batches: list[int]  # profiled batch sizes, ascending
    knots: list[list[float]]  # per batch: hinge widths
    coefficients: list[list[float]]  # per batch: [a, b, *h, c, d]
    max_width: int  # widest profiled tree: wider ones extrapolate the last slope
    model_id: str = ""
    device: str = ""
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        timings: Sequence[StepTiming],
        *,
        knots: int = 3,
        model_id: str = "",
        device: str = "",
        meta: dict | None = None,
    ) -> StepCostModel:
        """Least-squares fit per profiled batch size, with `knots` hinge points (fewer when
        there are few distinct widths) at the profiled widths that fit best."""
        if len(timings) < 2:
            raise ValueError("need at least two timings to fit a step cost model")
        by_batch: dict[int, list[StepTiming]] = {}
        for timing in timings:
            by_batch.setdefault(timing.batch, []).append(timing)
        model = cls(batches=[], knots=[], coefficients=[], max_width=max(t.width for t in timings),
                    model_id=model_id, device=device, meta=meta or {})
        for batch in sorted(by_batch):
            rows = by_batch[batch]
            widths = np.unique([t.width for t in rows]).astype(float)
            if len(widths) < 2:
                continue  # a single width says nothing about the slope
            seconds = np.array([t.seconds for t in rows], dtype=float)
            # Relative error is what matters (10% off a 3 ms step is as bad as off a 30 ms one).
            weight = 1.0 / np.maximum(seconds, 1e-9)
            count = min(knots, max(0, len(widths) - 3))
            best: tuple[float, list[float], np.ndarray] | None = None
            # Knots where the curve bends: the best-fitting choice among the inner profiled
            # widths (a handful of small least-squares problems).
            for chosen in itertools.combinations(widths[1:-1].tolist(), count):
                features = np.stack([_features(t.width, t.cache_length, chosen) for t in rows])
                solution, *_ = np.linalg.lstsq(features * weight[:, None], seconds * weight, rcond=None)
                error = float(np.sum((features @ solution * weight - seconds * weight) ** 2))
                if best is None or error < best[0] - 1e-12:
                    best = (error, list(chosen), solution)
            assert best is not None
            _, chosen, solution = best
            model.batches.append(batch)
            model.knots.append(chosen)
            model.coefficients.append([float(c) for c in solution])
        if not model.batches:
            raise ValueError("need at least two widths for some batch size to fit a step cost model")
        return model

    # ------------------------------------------------------------------ predict
    def _batch_curve(self, index: int, widths: np.ndarray, cache_length: float, rows_scale: float = 1.0
                     ) -> np.ndarray:
        """Profiled batch `index`'s curve at `widths` (already scaled to its batch size), its
        per-row cache term scaled by rows_scale (priced batch / profiled batch)."""
        c = np.asarray(self.coefficients[index])
        knots = np.asarray(self.knots[index], dtype=float)
        raw = c[0] + c[1] * widths + c[-2] * cache_length * rows_scale + c[-1] * widths * cache_length
        if len(knots):
            raw = raw + np.maximum(0.0, widths[:, None] - knots[None, :]) @ c[2:2 + len(knots)]
        return raw

    def predict_curve(self, max_width: int, batch: int = 1, cache_length: int = 0) -> list[float]:
        """Cost at widths 1..max_width (index 0 is width 1), non-decreasing (vectorized: the
        budget chooser asks for a whole curve every step)."""
        assert max_width >= 1 and batch >= 1 and cache_length >= 0
        widths = np.arange(1, max_width + 1, dtype=float)
        position = int(np.searchsorted(self.batches, batch))
        if position < len(self.batches) and self.batches[position] == batch:
            raw = self._batch_curve(position, widths, cache_length)
        elif len(self.batches) == 1:  # one profiled batch size: same tokens per step, per row scaled
            b0 = self.batches[0]
            raw = self._batch_curve(0, widths * batch / b0, cache_length, batch / b0)
        else:
            # Between two profiled batch sizes, compare steps of the same total tokens (W x B,
            # what the matmuls see) and interpolate linearly in B (the per-row work).
            low = min(max(position - 1, 0), len(self.batches) - 2)
            b0, b1 = self.batches[low], self.batches[low + 1]
            t = (batch - b0) / (b1 - b0)
            raw = (1 - t) * self._batch_curve(low, widths * batch / b0, cache_length, batch / b0) + t * self._batch_curve(
                low + 1, widths * batch / b1, cache_length, batch / b1)
        return np.maximum(np.maximum.accumulate(raw), 1e-6).tolist()

    def extrapolates(self, batch: int) -> bool:
        """Whether `batch` rows lie beyond every profiled batch size (priced from smaller batches'
        curves at the same total tokens: on a CPU that under-states wide batched steps)."""
        return batch > self.batches[-1]

    def predict(self, width: int, batch: int = 1, cache_length: int = 0) -> float:
        """Seconds for one step of `batch` rows padded to `width` tokens (root included) over
        `cache_length` cached tokens per row."""
        return self.predict_curve(width, batch, cache_length)[-1]

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StepCostModel:
        data = json.loads(text)
        return cls(**data)

    def matches(self, model_id: str, device: str) -> bool:
        return self.model_id == model_id and self.device == device


def inverted_widths(seconds_by_width: Mapping[int, float], tolerance: float = 0.15) -> list[int]:
    """Widths measured dearer than some wider width at the same batch and cache length, by more
    than `tolerance`: a step with more tokens is never cheaper, so the narrower point was hit by
    something else (another process, a stall) in every round and is worth measuring again. The
    profile takes the minimum over rounds, which only a disturbance of all of them defeats.

    >>> inverted_widths({1: 0.10, 2: 0.16, 4: 0.12, 8: 0.20})
    [2]
    >>> inverted_widths({1: 0.10, 2: 0.105, 4: 0.10, 8: 0.20})  # within noise
    []
    """
    widths = sorted(seconds_by_width)
    inverted = []
    for i, width in enumerate(widths[:-1]):
        cheapest_wider = min(seconds_by_width[w] for w in widths[i + 1:])
        if seconds_by_width[width] > (1.0 + tolerance) * cheapest_wider:
            inverted.append(width)
    return inverted


def _features(width: float, cache_length: float, knots: Sequence[float]) -> np.ndarray:
    hinges = [max(0.0, width - k) for k in knots]
    return np.array([1.0, width, *hinges, cache_length, width * cache_length], dtype=float)


def linear_cost_model(fixed_s: float, per_token_s: float, *, per_row_s: float = 0.0, max_width: int = 64
                      ) -> StepCostModel:
    """A cost model from a few numbers: `fixed_s` per step, `per_token_s` per token in the
    padded batch, `per_row_s` per row (e.g. when profiling is off, or in tests)."""
    def coefficients(batch: int) -> list[float]:
        return [fixed_s + per_row_s * (batch - 1), per_token_s * batch, 0.0, 0.0]

    return StepCostModel(batches=[1, 2], knots=[[], []], coefficients=[coefficients(1), coefficients(2)],
                         max_width=max_width, meta={"source": "linear"})
