"""Fuzz fixtures: a seeded RNG per test, hypothesis settings for CI, a tally per boundary."""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.wire import Outcome

# Deterministic and database-free: the same inputs on every run, nothing written under .hypothesis.
FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=list(HealthCheck))


class Tally:
    """Inputs tried and outcomes at one boundary; crashes and hangs carry their input for the message."""

    def __init__(self, boundary: str):
        self.boundary = boundary
        self.inputs = 0
        self.ok = 0
        self.codes: dict[str, int] = {}
        self.crashes: list[tuple[bytes | list[bytes], str]] = []
        self.hangs = 0

    def record(self, request, outcome: Outcome) -> Outcome:
        self.inputs += 1
        self.ok += outcome.ok
        self.codes[outcome.code.name] = self.codes.get(outcome.code.name, 0) + 1
        if outcome.crashed:
            self.crashes.append((request, f"{outcome.code.name}: {outcome.details}"))
        self.hangs += outcome.hung
        return outcome

    def check(self) -> None:
        assert not self.crashes, f"{self.boundary}: {len(self.crashes)} crashes, first: {self.crashes[0]!r}"
        assert self.hangs == 0, f"{self.boundary}: {self.hangs} calls ran past their deadline"


@pytest.fixture
def rng(request) -> random.Random:
    # One stream per test, stable across runs and independent of test order.
    return random.Random(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def tally(reliability_report):
    tallies: list[Tally] = []

    def make(boundary: str) -> Tally:
        tallies.append(Tally(boundary))
        return tallies[-1]

    yield make
    for t in tallies:
        reliability_report.fuzzed(t.boundary, t.inputs, len(t.crashes) + t.hangs)
