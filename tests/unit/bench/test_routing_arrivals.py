"""bench-routing's open-loop stream: Poisson arrival times, the same for every policy (seeded)."""

from __future__ import annotations

import doctest

import numpy as np

import bench.routing
from bench.routing import poisson_arrivals


def test_the_docstring_example_holds():
    assert doctest.testmod(bench.routing).failed == 0


def test_arrivals_are_seeded_increasing_and_exponentially_spaced():
    arrivals = poisson_arrivals(4000, 0.5, seed=3)
    assert arrivals == poisson_arrivals(4000, 0.5, seed=3) != poisson_arrivals(4000, 0.5, seed=4)
    gaps = np.diff([0.0, *arrivals])
    assert (gaps > 0).all()
    # Exponential gaps: mean 1/rate = 2 s and a coefficient of variation of 1 (a fixed-rate
    # stream has 0, a bursty one more).
    assert abs(gaps.mean() - 2.0) < 0.1 and abs(gaps.std() / gaps.mean() - 1.0) < 0.05
