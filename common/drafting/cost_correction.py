"""What steps really cost against what the step-cost model predicted: a correction learnt online.

The start-up profile (services/decoder/cost_profile.py) is cut at a time limit. On a CPU with a
real model it reaches only one row per step, and larger batches are then priced from that
curve at the same total tokens. Measured in the engine, that under-states a batch of 16 rows:
SmolLM2-135M on 2 cores, 16 rows of 1 token took 1.34x the prediction, and 16 rows of 3-4 took
1.8-1.9x. Drafting at 16 rows then looked ~1.4x cheaper, relative to a plain step, than it was,
and adaptive drafting ran at 0.94x no drafting. (Pricing from a smaller batch now scales each
row's cache term, cost_model.py; at 16 rows the corrections fell from 2.2-2.7 to 0.9-1.4.) The
profile also ages: the machine's speed drifts, and other work shares it.

So every step's measured seconds are compared with the model's prediction for that step, by
batch size and tree width (each bucketed by powers of two: 1, 2, 3-4, 5-8, ...). The budget
chooser multiplies its predicted curve by the correction of each width's bucket. Only ratios
between widths move the choice, so a correction common to all widths changes nothing.

A bucket with few measurements leans on a prior: the nearest narrower measured bucket of the
same batch size (else 1.0, the model's own prediction), worth `prior_steps` steps. An
unmeasured wider tree is priced like the narrower one it extends, tried when that pays, and
then priced by what it took. Old measurements fade (`decay` per step of the bucket), so the
correction follows drift.

>>> correction = StepCostCorrection(prior_steps=2.0, decay=1.0)
>>> for _ in range(6):
...     correction.record(batch=16, width=1, predicted_s=0.09, measured_s=0.12)
...     correction.record(batch=16, width=4, predicted_s=0.16, measured_s=0.30)
>>> round(correction.scale(16, 1), 3), round(correction.scale(16, 4), 3)
(1.25, 1.719)

A width of 8 was never measured: it takes width 4's correction as its prior.

>>> round(correction.scale(16, 8), 3), correction.scale(1, 8)
(1.719, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_RATIO, MAX_RATIO = 0.25, 4.0  # a single step's measured / predicted is clipped to this (a pause, a stall)


def size_bucket(size: int) -> int:
    """Powers-of-two bucket of a width or a batch size: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...

    >>> [size_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)]
    [0, 1, 2, 2, 3, 3, 4, 4, 5]
    """
    return max(size - 1, 0).bit_length()


class StepCostCorrection:
    """Measured / predicted step seconds per (batch bucket, width bucket), decayed sums."""

    def __init__(self, *, prior_steps: float = 4.0, decay: float = 0.98) -> None:
        assert prior_steps > 0 and 0 < decay <= 1
        self.prior_steps = prior_steps
        self.decay = decay
        # (batch bucket, width bucket) -> [measured seconds, predicted seconds, steps], decayed
        self._sums: dict[tuple[int, int], list[float]] = {}

    def record(self, batch: int, width: int, predicted_s: float, measured_s: float) -> None:
        """One step of `batch` rows padded to `width` tokens: what the cost model said, what it took."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        measured_s = min(max(measured_s, MIN_RATIO * predicted_s), MAX_RATIO * predicted_s)
        sums = self._sums.setdefault((size_bucket(batch), size_bucket(width)), [0.0, 0.0, 0.0])
        sums[0] = sums[0] * self.decay + measured_s
        sums[1] = sums[1] * self.decay + predicted_s
        sums[2] = sums[2] * self.decay + 1.0

    def scale(self, batch: int, width: int) -> float:
        """The factor to multiply the model's prediction by for such a step."""
        return self._scale(size_bucket(batch), size_bucket(width))

    def _scale(self, batch_bucket: int, width_bucket: int) -> float:
        prior = 1.0
        for narrower in range(width_bucket - 1, -1, -1):
            if (batch_bucket, narrower) in self._sums:
                prior = self._scale(batch_bucket, narrower)
                break
        sums = self._sums.get((batch_bucket, width_bucket))
        if sums is None or sums[2] <= 0:
            return prior
        measured, predicted, steps = sums
        mean_predicted = predicted / steps
        pseudo = self.prior_steps * mean_predicted
        return (measured + pseudo * prior) / (predicted + pseudo)

    def apply(self, curve: Sequence[float], batch: int) -> list[float]:
        """curve[w - 1]: predicted seconds at width w; the corrected curve, kept non-decreasing
        (a bucket's correction must not make a wider tree look cheaper than a narrower one)."""
        batch_bucket = size_bucket(batch)
        scales: dict[int, float] = {}
        corrected, running = [], 0.0
        for index, seconds in enumerate(curve):
            bucket = size_bucket(index + 1)
            if bucket not in scales:
                scales[bucket] = self._scale(batch_bucket, bucket)
            running = max(running, seconds * scales[bucket])
            corrected.append(running)
        return corrected

    def summary(self) -> dict[str, float]:
        """"batch bucket x width bucket" -> correction, for stats and benchmarks."""
        return {f"b{1 << b if b else 1}w{1 << w if w else 1}": round(self._scale(b, w), 3)
                for b, w in sorted(self._sums)}
