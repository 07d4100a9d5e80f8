"""A pool's metadata as a value: version, sizes, decay and ledger tallies (pure, no protobuf).

Frozen so that a write builds the next one and swaps it in: a reader holding a PoolMeta (a
retrieval reporting its version, a snapshot) never sees it change under it. The store keeps it
next to the pool's rows, the servicer turns it into the PoolInfo message; nothing here reads a
clock, the writer passes the time in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class PoolMeta:
    pool_key: str
    version: int = 0  # writes applied to the pool; 0 until its first (the global pool starts so)
    nodes: int = 0  # trie nodes, counts emptied by item removal included
    capacity: int = 0  # nodes above which the pool decays
    updated_at: float = 0.0  # unix seconds of the last write, as the writer's clock said
    squeezes: int = 0  # decay passes since the pool was created
    sequences: int = 0  # sequences remembered for removal by item
    sequence_tokens: int = 0  # their tokens
    size_bytes: int = 0  # approximate stored bytes: rows plus remembered tokens

    def next_version(self, *, nodes: int, squeezes: int, sequences: int, sequence_tokens: int, capacity: int,
                     row_bytes: int, updated_at: float) -> PoolMeta:
        """The metadata after one more write; `row_bytes` is the approximate size of one stored node.

        >>> meta = PoolMeta("p").next_version(nodes=3, squeezes=0, sequences=1, sequence_tokens=2,
        ...                                   capacity=8, row_bytes=10, updated_at=5.0)
        >>> meta.version, meta.updated_at, meta.size_bytes  # 3 rows of 10 bytes, 2 tokens of 4
        (1, 5.0, 38)
        """
        return PoolMeta(pool_key=self.pool_key, version=self.version + 1, nodes=nodes, capacity=capacity,
                        updated_at=updated_at, squeezes=squeezes, sequences=sequences,
                        sequence_tokens=sequence_tokens,
                        size_bytes=nodes * row_bytes + 4 * sequence_tokens)  # 4 bytes per remembered token
