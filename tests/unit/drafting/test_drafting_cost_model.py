"""Step cost model: fits synthetic timings of known shape, stays monotone, round-trips as JSON."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from common.drafting import cost_model as cost_model_module
from common.drafting.cost_model import StepCostModel, StepTiming, inverted_widths, linear_cost_model

WIDTHS = (1, 2, 4, 8, 16, 24, 32, 48, 65)
BATCHES = (1, 2, 4, 8, 16)
CACHE_LENGTHS = (32, 256, 1024)


def true_cost(width: int, batch: int, cache_length: int) -> float:
    """A device-like curve in the step's total tokens n = W x B: nearly flat up to 64 (fixed
    cost), then linear; attention grows with tokens x cache length; each row adds bookkeeping.
    Batch sizes 3 and 12 are never profiled: the model interpolates them."""
    n = width * batch
    return 2.5e-3 + 0.1e-3 * batch + 0.01e-3 * n + 0.09e-3 * max(0, n - 64) + 2e-9 * n * cache_length


def synthetic(noise: float, seed: int = 0) -> list[StepTiming]:
    rng = np.random.default_rng(seed)
    return [
        StepTiming(w, b, c, true_cost(w, b, c) * float(1 + noise * rng.standard_normal()))
        for w in WIDTHS
        for b in BATCHES
        for c in CACHE_LENGTHS
    ]


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_fit_recovers_a_piecewise_linear_curve(noise: float) -> None:
    model = StepCostModel.fit(synthetic(noise), knots=4)
    errors = []
    for w in range(1, 66, 3):
        for b in (1, 3, 4, 12, 16):
            for c in (32, 500, 1024):
                errors.append(abs(model.predict(w, b, c) / true_cost(w, b, c) - 1))
    # Knots sit at profiled widths: one row's true kink (width 64) falls between two of them.
    assert np.median(errors) < 0.005 + noise / 2
    assert max(errors) < 0.03 + 1.5 * noise


def test_predictions_never_decrease_with_width_and_curve_matches_predict() -> None:
    # Noisy, non-monotone measurements: the raw fit may dip; predictions must not.
    timings = [StepTiming(w, 1, 64, s) for w, s in [(1, 3e-3), (2, 2.6e-3), (4, 3.1e-3), (8, 2.9e-3), (16, 4e-3),
                                                   (32, 6e-3), (64, 9e-3)]]
    model = StepCostModel.fit(timings, knots=2)
    curve = model.predict_curve(64, 1, 64)
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    assert all(c > 0 for c in curve)
    assert [model.predict(w, 1, 64) for w in (1, 7, 33, 64)] == pytest.approx([curve[0], curve[6], curve[32], curve[63]])


def test_batch_cost_is_priced_by_padded_tokens() -> None:
    model = StepCostModel.fit(synthetic(0.0), knots=4)
    # 16 rows x 8 tokens is past the flat region; 1 row x 8 tokens is not.
    assert model.predict(8, 16, 32) > 1.5 * model.predict(8, 1, 32)
    assert model.predict(8, 1, 32) < 1.1 * model.predict(1, 1, 32)


def test_json_round_trip_and_identity() -> None:
    model = StepCostModel.fit(synthetic(0.01), model_id="m-1", device="cpu:1t", meta={"points": 1})
    loaded = StepCostModel.from_json(model.to_json())
    assert loaded == model
    assert loaded.matches("m-1", "cpu:1t") and not loaded.matches("m-1", "cuda:H100")
    assert loaded.predict(9, 3, 100) == pytest.approx(model.predict(9, 3, 100))


def test_linear_model_and_bad_input() -> None:
    model = linear_cost_model(3e-3, 1e-4)
    assert model.predict(1) == pytest.approx(3.1e-3)
    assert model.predict(11) == pytest.approx(4.1e-3)
    with pytest.raises(ValueError):
        StepCostModel.fit([StepTiming(1, 1, 0, 1e-3)])


def rows_read_their_caches(width: int, batch: int, cache_length: int) -> float:
    """Each row's attention reads its own cache once per step (the 5e-6 s per cached token and
    row term): at 16 rows over long caches that dominates, as it does on a CPU."""
    n = width * batch
    return 3e-3 + 0.05e-3 * n + 5e-6 * cache_length * batch + 1e-8 * n * cache_length


@pytest.mark.parametrize("profiled", [(1,), (1, 4)])
def test_a_batch_beyond_the_profile_pays_every_rows_cache(profiled: tuple[int, ...]) -> None:
    # The decoder's 5 s start-up profile reaches batch 1 only on a CPU: 16 rows must still be
    # priced with 16 caches' reads, not one.
    timings = [StepTiming(w, b, c, rows_read_their_caches(w, b, c))
               for w in WIDTHS for b in profiled for c in CACHE_LENGTHS]
    model = StepCostModel.fit(timings, knots=2)
    for batch in (2, 16):
        for width in (1, 4):
            for cache_length in (500, 3000):
                predicted = model.predict(width, batch, cache_length)
                assert predicted == pytest.approx(rows_read_their_caches(width, batch, cache_length), rel=0.05)


def test_doctests() -> None:
    assert doctest.testmod(cost_model_module).failed == 0


def test_inverted_widths_are_the_narrow_points_dearer_than_a_wider_one() -> None:
    clean = {w: true_cost(w, 1, 1024) for w in WIDTHS}
    assert inverted_widths(clean) == []  # a monotone curve has none
    stalled = {**clean, 1: clean[65] * 1.5, 8: clean[16] * 1.2}
    assert inverted_widths(stalled) == [1, 8]
    assert inverted_widths(stalled, tolerance=0.25) == [1]  # 8 is within a 25% tolerance of 16
    assert inverted_widths({1: 0.2}) == []  # nothing wider to compare with
