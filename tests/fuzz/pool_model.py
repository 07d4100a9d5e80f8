"""What the pools must hold, computed independently of the pool service: a list of live sequences
per pool, and n-gram counts by brute force.

Rules modelled (services/pool/pool_manager.py states them): an insert about an item removed from
the inventory is ignored; an inventory added/changed event replaces the item's earlier input
sequences in its pool and brings the item back; removing an item takes back each live sequence
about it (in one pool, or in all pools, which also marks it removed). No decay: the fuzz pools
run with a capacity they never reach.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

Path = tuple[int, ...]


def naive_counts(sequences: Sequence[Sequence[int]], n: int) -> Counter:
    """Occurrences of every n-gram of length 1..n: what each trie node must count."""
    counts: Counter = Counter()
    for seq in sequences:
        for i in range(len(seq)):
            for j in range(i + 1, min(len(seq), i + n) + 1):
                counts[tuple(seq[i:j])] += 1
    return counts


@dataclass(slots=True)
class _Sequence:
    tokens: tuple[int, ...]
    kind: str
    item_ids: tuple[str, ...]
    live: bool = True


@dataclass
class PoolModel:
    ngram_length: int
    pools: dict[str, list[_Sequence]] = field(default_factory=dict)
    removed_items: set[str] = field(default_factory=set)

    def insert(self, pool_key: str, sequences: Sequence[Sequence[int]], kind: str, item_ids: Sequence[str] = (),
               replace_item_input: bool = False) -> None:
        if not replace_item_input and any(i in self.removed_items for i in item_ids):
            return
        pool = self.pools.setdefault(pool_key, [])
        if replace_item_input:
            self.removed_items.difference_update(item_ids)
            for seq in pool:
                if seq.live and seq.kind == "input" and set(seq.item_ids) & set(item_ids):
                    seq.live = False
        for tokens in sequences:
            pool.append(_Sequence(tuple(tokens), kind, tuple(item_ids)))

    def remove_item(self, item_id: str, pool_key: str | None = None) -> None:
        if pool_key is None:
            self.removed_items.add(item_id)
        for key, pool in self.pools.items():
            if pool_key is not None and key != pool_key:
                continue
            for seq in pool:
                if seq.live and item_id in seq.item_ids:
                    seq.live = False

    def expected_rows(self, pool_key: str) -> dict[Path, tuple[int, int]]:
        """{token path: (output count, input count)} for every node with a non-zero count."""
        pool = self.pools.get(pool_key, [])
        output = naive_counts([s.tokens for s in pool if s.live and s.kind == "output"], self.ngram_length)
        input_ = naive_counts([s.tokens for s in pool if s.live and s.kind == "input"], self.ngram_length)
        return {p: (output[p], input_[p]) for p in output.keys() | input_.keys() if output[p] or input_[p]}


def stored_rows(store, pool_key: str) -> dict[Path, tuple[int, int]]:
    """The same view of what a PoolStore holds (nodes emptied by removals stay with count 0)."""
    return {path: (out, in_) for path, out, in_ in store.rows(pool_key) if out or in_}


def mismatched_pools(pool_dir: Path, model: PoolModel) -> list[str]:
    """Pool keys whose stored counts (the RocksDB directory `pool_dir`, opened after the service
    stopped) differ from the model's; every pool either side knows is compared."""
    from services.pool.pool_store import PoolStore

    store = PoolStore(pool_dir)
    try:
        keys = {info.pool_key for info in store.pools()} | set(model.pools)
        return [k for k in sorted(keys) if stored_rows(store, k) != model.expected_rows(k)]
    finally:
        store.close()
