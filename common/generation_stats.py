"""Figures read from a request's GenerationStats, shared by the decoder's metrics and the main job.

Pure: takes the stats message (or anything with its repeated fields), imports no protobuf code.
"""

from __future__ import annotations


def accepted_drafts(stats) -> list[int]:
    """Accepted draft tokens of each step, in step order: the step's emitted tokens
    (`accepted_per_step`) less its bonus token, as the decoder reports them for every step."""
    return list(stats.accepted_drafts_per_step)
