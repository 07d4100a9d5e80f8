"""Figures read from GenerationStats (common/generation_stats.py)."""

from __future__ import annotations

import pytest

from adaccel.v1 import common_pb2
from common.generation_stats import accepted_drafts


@pytest.mark.parametrize(("emitted", "drafted", "accepted"), [
    ([3, 1, 2], [8, 8, 0], [2, 0, 1]),
    ([1, 1], [0, 0], [0, 0]),  # drafting off: nothing proposed, nothing accepted
    ([], [], []),  # cut before the first step
])
def test_accepted_drafts_are_the_decoders_per_step_counts(emitted, drafted, accepted):
    stats = common_pb2.GenerationStats(accepted_per_step=emitted, drafted_per_step=drafted,
                                       accepted_drafts_per_step=accepted)
    assert accepted_drafts(stats) == accepted
