"""Replica choice (pure): the healthy replica with the lowest load, ties broken by address.

Cache-affinity scoring (blocks and pools a replica already holds) extends `score` later; the
rest of the router only calls `choose_replica`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ReplicaView:
    address: str
    healthy: bool
    queue_depth: int
    tokens_in_flight: int


def score(replica: ReplicaView) -> float:
    """Higher is better."""
    return -(replica.queue_depth + replica.tokens_in_flight / 4096)


def choose_replica(replicas: Sequence[ReplicaView], exclude: frozenset[str] = frozenset()) -> ReplicaView | None:
    candidates = [r for r in replicas if r.healthy and r.address not in exclude]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (score(r), [-ord(c) for c in r.address]))
