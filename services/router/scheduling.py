"""Replica choice (pure): cache affinity weighed against load, as RcLLM's global scheduler.

Policies:
  affinity      the replica where the request's first token comes soonest, by expected prefill
                work in prompt tokens: the prefill queued there before it (reported by the
                replica, plus what this router sent since), a per-request cost for each request
                running there (its decode steps share the model with the new prefill), and the
                request's own prompt minus what the replica holds (cacheable blocks reusable
                anywhere, or the exact prefix prefix caching keeps, whichever is more), less a
                bonus for holding the request's pool. Lowest work wins. Work, not a count of
                queued requests: on a real model a held 1,000-token prefix saves ~3 s of prefill
                while a queued 2,000-token prompt costs ~8 s, so locality and load are weighed in
                the same unit. A replica that reports nothing is scored on queued work alone.
  least_loaded  score = -load, load = queue_depth + tokens_in_flight / tokens_per_request.
  round_robin   the next healthy replica in address order, whatever it holds or carries.
The router has no tokenizer: prompt tokens are estimated as characters / chars_per_token. Exact
ties rotate with the caller's turn over the tied replicas in address order (turn 0: the smaller
address), so that under light load, every replica idle and none holding the request's blocks,
requests spread instead of all going to the first address (bench-routing, 3 decoders idle most
of the time: least loaded had sent 36 of 48 requests to one of them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from common.blocks.routing_keys import RequestBlocks
from common.drafting.pool_keys import fallback_chain

Policy = Literal["affinity", "least_loaded", "round_robin"]
POLICIES: tuple[str, ...] = ("affinity", "least_loaded", "round_robin")


@dataclass(slots=True, frozen=True)
class ReplicaView:
    address: str
    healthy: bool
    queue_depth: int
    tokens_in_flight: int
    block_keys: frozenset[int] = frozenset()  # routing keys of blocks whose KV it holds
    pool_keys: frozenset[str] = frozenset()  # pools whose snapshot it holds
    prefill_tokens_pending: int = 0  # prompt tokens admitted there and not prefilled yet


@dataclass(slots=True, frozen=True)
class Footprint:
    """What a request would reuse: its cacheable blocks and its pool."""

    blocks: RequestBlocks = field(default_factory=lambda: RequestBlocks({}))
    pool_key: str = ""


@dataclass(slots=True, frozen=True)
class AffinityWeights:
    block_weight: float = 1.0  # a held prompt token saves this many tokens of prefill (1: what it costs)
    pool_weight: float = 0.5  # holding the request's pool is worth this many running requests
    request_tokens: float = 40.0  # a running request delays a new one's first token this many prefill tokens
    chars_per_token: float = 4.0  # prompt characters per token (the router has no tokenizer)
    tokens_per_request: float = 4096.0  # least_loaded: tokens in flight counted as one queued request


def load(replica: ReplicaView, weights: AffinityWeights) -> float:
    return replica.queue_depth + replica.tokens_in_flight / weights.tokens_per_request


def held_share(replica: ReplicaView, blocks: RequestBlocks) -> float:
    """Share (0..1, by characters) of the request the replica can start from: of its cacheable
    blocks whose KV it holds (reused anywhere in a prompt), or of its prompt covered by the
    exact prefix it holds (the leading blocks whose prefix keys it reports), whichever is more."""
    if not replica.block_keys:
        return 0.0
    anywhere = 0.0
    if blocks.total_weight:
        anywhere = sum(w for key, w in blocks.weights.items() if key in replica.block_keys) / blocks.total_weight
    prefix = 0
    for key, weight in blocks.prefix:
        if key not in replica.block_keys:
            break
        prefix += weight
    return max(anywhere, prefix / blocks.prefix_weight if blocks.prefix_weight else 0.0)


def holds_pool(replica: ReplicaView, pool_key: str) -> bool:
    """The request's pool or one of its parents ("a/b" falls back to "a", as the decoder does).
    No last fallback to the global pool here: every replica drafts from it, so it earns no affinity."""
    return any(key in replica.pool_keys for key in fallback_chain(pool_key))


def uncached_tokens(replica: ReplicaView, footprint: Footprint, weights: AffinityWeights) -> float:
    """Estimated prompt tokens the replica must prefill for this request (what it does not hold)."""
    prompt = footprint.blocks.prefix_weight / weights.chars_per_token
    return prompt * max(0.0, 1.0 - weights.block_weight * held_share(replica, footprint.blocks))


def work_ahead(replica: ReplicaView, footprint: Footprint, weights: AffinityWeights) -> float:
    """Expected prefill-token work before this request's first token on the replica (lower is better)."""
    work = (replica.prefill_tokens_pending + weights.request_tokens * replica.queue_depth
            + uncached_tokens(replica, footprint, weights))
    if footprint.pool_key and holds_pool(replica, footprint.pool_key):
        work -= weights.pool_weight * weights.request_tokens
    return work


def affinity_score(replica: ReplicaView, footprint: Footprint, weights: AffinityWeights) -> float:
    """Higher is better: minus the work ahead."""
    return -work_ahead(replica, footprint, weights)


def _best(candidates: Sequence[ReplicaView], score: Callable[[ReplicaView], float], turn: int) -> ReplicaView:
    """The highest-scoring candidate; exact ties rotate by `turn` over the tied ones in address order."""
    scored = [(score(r), r) for r in candidates]
    top = max(value for value, _ in scored)
    tied = sorted((r for value, r in scored if value == top), key=lambda r: r.address)
    return tied[turn % len(tied)]


def choose_replica(
    replicas: Sequence[ReplicaView],
    exclude: frozenset[str] = frozenset(),
    *,
    policy: Policy = "least_loaded",
    footprint: Footprint | None = None,
    weights: AffinityWeights | None = None,
    turn: int = 0,
) -> ReplicaView | None:
    """The replica to send a request to, or None when no healthy one is left. `turn`: a counter
    the caller increments per request (round_robin's order, and which of several equally good
    replicas the other policies take).

    >>> idle = [ReplicaView("b", True, 0, 0), ReplicaView("a", True, 0, 0), ReplicaView("c", True, 1, 0)]
    >>> [choose_replica(idle, turn=t).address for t in range(3)]  # c is busier: a and b take turns
    ['a', 'b', 'a']
    """
    candidates = [r for r in replicas if r.healthy and r.address not in exclude]
    if not candidates:
        return None
    weights = weights or AffinityWeights()
    if policy == "round_robin":  # every replica ties: the turn walks them in address order
        return _best(candidates, lambda r: 0.0, turn)
    if policy == "affinity":
        footprint = footprint or Footprint()
        return _best(candidates, lambda r: affinity_score(r, footprint, weights), turn)
    if policy == "least_loaded":
        return _best(candidates, lambda r: -load(r, weights), turn)
    raise ValueError(f"unknown scheduling policy {policy!r}; expected one of {POLICIES}")
