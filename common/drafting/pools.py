"""Customized retrieval pools (DARE): one trie per pool key, plus a per-request overlay.

- `PoolRegistry`: tries keyed by pool key ("vertical/category"), resolved most specific first
  ("ads/shoes/running" -> "ads/shoes" -> "ads") and then the global fallback pool, by the rule
  in `common.drafting.pool_keys`.
- `RequestDrafter`: what one request drafts from. Its overlay is a small private trie holding
  the request's own prompt ("input") and generated ("output") n-grams; it is dropped with the
  drafter, so one request's text never leaks into another's drafts (PIA instead zeroes prompt
  counts at request end). Drafts merge the overlay's and the pool's candidates.
- `TieredPool`: the pool key's trie with the task's trie beneath it (pool_keys.task_pool_key),
  drafted from as one pool; the engine and the drafters see a trie.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.drafting.draft_tree import DraftTree, merge_marked_drafts
from common.drafting.geometry import DEFAULT_GEOMETRY
from common.drafting.pool_keys import GLOBAL_POOL, resolve_pool_key, task_pool_key
from common.drafting.trie import StreamingInserter, TokenTrie, TrieSettings

# The task pool's candidates weigh this much against the pool key's (chosen by bench-draft-replay
# --task-pool-weights; see TieredPool).
DEFAULT_TASK_POOL_WEIGHT = 1.0


@dataclass(frozen=True, slots=True)
class TieredPool:
    """A pool key's trie and its task's trie, read as one pool.

    Candidates are both tries' (scores are relative frequencies given the lookup key in each),
    mixed by evidence: each trie's scores are scaled by its share of the key's weight, the
    task's weight counted `task_weight` times, so a path's summed score is its relative
    frequency in one trie holding both (at `task_weight` 1) and a key the pool key's trie has
    seen often is not drowned by the task's. The budget chooser calibrates acceptance per pool
    key's trie (budget.py), tiered or not.

    >>> key, task = TokenTrie(TrieSettings(ngram_length=4)), TokenTrie(TrieSettings(ngram_length=4))
    >>> key.insert([1, 2, 3]); task.insert([1, 2, 5]); task.insert([1, 2, 3]); task.insert([1, 2, 5])
    >>> pool = TieredPool(key, task, task_weight=1.0)
    >>> [(t.tokens, [round(s, 2) for s in t.scores])
    ...  for t in pool.candidates([1, 2], decoding_length=2, branch_length=1)]
    [([3], [0.25]), ([5, 3], [0.5, 0.25])]
    >>> pool.key_weight([1, 2]), pool.stored_depth([1, 2], [5])
    (4.0, 1)
    """

    key_pool: TokenTrie
    task_pool: TokenTrie
    task_weight: float = DEFAULT_TASK_POOL_WEIGHT

    @property
    def settings(self) -> TrieSettings:
        return self.key_pool.settings

    def candidates(self, context: Sequence[int], *, decoding_length: int, branch_length: int,
                   key_length: int = 2) -> list[DraftTree]:
        args = dict(decoding_length=decoding_length, branch_length=branch_length, key_length=key_length)
        key_evidence, task_evidence = self._evidence(context[-key_length:])
        total = key_evidence + task_evidence
        if total <= 0:
            return []
        found = []
        for trie, share in ((self.key_pool, key_evidence / total), (self.task_pool, task_evidence / total)):
            if share <= 0:
                continue
            for tree in trie.candidates(context, **args):
                tree.scores = [score * share for score in tree.scores]
                found.append(tree)
        return found

    def context_support(self, context: Sequence[int], tree: DraftTree) -> list[int]:
        return [max(a, b) for a, b in zip(self.key_pool.context_support(context, tree),
                                          self.task_pool.context_support(context, tree))]

    def key_weight(self, key: Sequence[int]) -> float:
        return sum(self._evidence(key))

    def _evidence(self, key: Sequence[int]) -> tuple[float, float]:
        """The key's weight in the pool key's trie and, times task_weight, in the task's."""
        return self.key_pool.key_weight(key), self.task_weight * self.task_pool.key_weight(key)

    def stored_depth(self, context: Sequence[int], continuation: Sequence[int], **kwargs) -> int:
        return max(self.key_pool.stored_depth(context, continuation, **kwargs),
                   self.task_pool.stored_depth(context, continuation, **kwargs))

    def insert(self, token_ids: Sequence[int], kind: str = "output") -> None:
        """Learning from an output locally (EngineSettings.learn_from_outputs): both tiers, as
        the pool updater does with a published answer that names its task."""
        self.key_pool.insert(token_ids, kind)
        self.task_pool.insert(token_ids, kind)


DraftPool = TokenTrie | TieredPool


def tiered(key_pool: TokenTrie, task_pool: TokenTrie | None, task_weight: float) -> DraftPool:
    """The pool a request drafts from: its pool key's, over its task's when there is one."""
    if task_pool is None or task_pool is key_pool or task_weight <= 0:
        return key_pool
    return TieredPool(key_pool, task_pool, task_weight)


class PoolRegistry:
    """Pool tries by key, with a global fallback pool that always exists."""

    def __init__(self, trie_settings: TrieSettings | None = None, *, global_key: str = GLOBAL_POOL) -> None:
        self.trie_settings = trie_settings or TrieSettings()
        self.global_key = global_key
        self._pools: dict[str, TokenTrie] = {global_key: TokenTrie(self.trie_settings)}

    def __contains__(self, pool_key: str) -> bool:
        return pool_key in self._pools

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    @property
    def global_pool(self) -> TokenTrie:
        return self._pools[self.global_key]

    def get_or_create(self, pool_key: str) -> TokenTrie:
        if pool_key not in self._pools:
            self._pools[pool_key] = TokenTrie(self.trie_settings)
        return self._pools[pool_key]

    def put(self, pool_key: str, trie: TokenTrie) -> None:
        """Installs or replaces a pool, e.g. a new snapshot version from the pool service."""
        self._pools[pool_key] = trie

    def load_snapshot(self, pool_key: str, snapshot: bytes) -> TokenTrie:
        trie = TokenTrie.from_bytes(snapshot)
        self.put(pool_key, trie)
        return trie

    def drop(self, pool_key: str) -> None:
        if pool_key == self.global_key:
            raise ValueError("the global fallback pool cannot be dropped")
        self._pools.pop(pool_key, None)

    def resolve(self, pool_key: str | None) -> TokenTrie:
        """The most specific existing pool for `pool_key`, else the global pool (pool_keys.py)."""
        return self._pools[self.resolve_key(pool_key)]

    def resolve_key(self, pool_key: str | None) -> str:
        """The key of the pool `resolve` returns (what a request's stats report it drafted from)."""
        return resolve_pool_key(pool_key, self._pools, self.global_key)

    def __getitem__(self, pool_key: str) -> TokenTrie:
        """The pool held under exactly this key (a `resolve_key` result); KeyError otherwise."""
        return self._pools[pool_key]

    def get(self, pool_key: str | None) -> TokenTrie | None:
        """The pool held under exactly this key, else None (no fallback: a task's pool)."""
        return self._pools.get(pool_key) if pool_key is not None else None

    def drafting_pool(self, pool_key: str | None, task: str | None, task_weight: float) -> DraftPool:
        """What a request with this pool key and task drafts from: the pool `resolve` gives,
        over the task's pool when this registry holds one."""
        return tiered(self.resolve(pool_key), self.get(task_pool_key(task)), task_weight)


@dataclass(slots=True, frozen=True)
class DraftSettings:
    key_length: int = DEFAULT_GEOMETRY.key_length  # lookup key: last tokens matched in the trie
    # The overlay only ever holds one request's text; a small capacity bounds a pathological one.
    overlay_capacity: int = 1 << 16


class DraftSource(Protocol):
    """What the engine drafts from: RequestDrafter in serving; benchmarks plug in others (an
    oracle that knows the greedy continuation)."""

    def draft(self, context: Sequence[int], decoding_length: int, branch_length: int) -> DraftTree: ...

    def observe(self, accepted_tokens: Sequence[int]) -> None: ...


class RequestDrafter:
    """Draft source of one request: request-local overlay + (optionally) a shared pool.

    The overlay uses the pool's n-gram length so that both answer the same key lengths. Scores
    are relative frequencies given the key in each trie, so a small overlay and a big pool
    carry comparable weight; the same path proposed by both gets the sum.
    """

    def __init__(
        self,
        pool: DraftPool | None,
        prompt_ids: Sequence[int],
        settings: DraftSettings | None = None,
        *,
        ngram_length: int | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings or DraftSettings()
        defaults = pool.settings if pool is not None else TrieSettings()
        self.overlay = TokenTrie(
            TrieSettings(
                ngram_length=ngram_length or defaults.ngram_length,
                capacity=self.settings.overlay_capacity,
                input_weight=defaults.input_weight,
            )
        )
        self._writer = StreamingInserter(self.overlay)
        self._writer.extend(list(prompt_ids), "input")

    def observe(self, accepted_tokens: Sequence[int]) -> None:
        """Adds newly emitted tokens to the overlay (as "output" n-grams)."""
        self._writer.extend(list(accepted_tokens), "output")

    def draft(self, context: Sequence[int], decoding_length: int, branch_length: int) -> DraftTree:
        """Draft tree continuing `context` (prompt + generated so far, root token last)."""
        return self.draft_with_origin(context, decoding_length, branch_length)[0]

    def draft_with_origin(
        self, context: Sequence[int], decoding_length: int, branch_length: int
    ) -> tuple[DraftTree, list[bool]]:
        """The draft, and for each node whether the request's own text (its prompt or output
        so far, the overlay) proposed it: such nodes are accepted less often than the pool's
        (on the default workload, 38% against 60% of those tested), which confidence.py uses."""
        if decoding_length <= 0 or branch_length <= 0:
            return DraftTree(), []
        key = context[-self.settings.key_length :]
        args = dict(
            decoding_length=decoding_length, branch_length=branch_length, key_length=self.settings.key_length
        )
        found = self.overlay.candidates(key, **args)
        from_overlay = len(found)
        if self.pool is not None:
            found += self.pool.candidates(key, **args)
        return merge_marked_drafts(found, from_overlay, decoding_length, branch_length)

    def context_support(self, context: Sequence[int], tree: DraftTree) -> list[int]:
        """Each draft node's context support (TokenTrie.context_support), the longer of the
        overlay's and the pool's."""
        support = self.overlay.context_support(context, tree)
        if self.pool is not None:
            support = [max(a, b) for a, b in zip(support, self.pool.context_support(context, tree))]
        return support
