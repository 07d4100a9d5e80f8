"""Customized retrieval pools (DARE): one trie per pool key, plus a per-request overlay.

- `PoolRegistry`: tries keyed by pool key ("vertical/category"), resolved most specific first
  ("ads/shoes/running" -> "ads/shoes" -> "ads") and then the global fallback pool, by the rule
  in `common.drafting.pool_keys`.
- `RequestDrafter`: what one request drafts from. Its overlay is a small private trie holding
  the request's own prompt ("input") and generated ("output") n-grams; it is dropped with the
  drafter, so one request's text never leaks into another's drafts (PIA instead zeroes prompt
  counts at request end). Drafts merge the overlay's and the pool's candidates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.drafting.draft_tree import DraftTree, merge_marked_drafts
from common.drafting.geometry import DEFAULT_GEOMETRY
from common.drafting.pool_keys import GLOBAL_POOL, resolve_pool_key
from common.drafting.trie import StreamingInserter, TokenTrie, TrieSettings


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
        pool: TokenTrie | None,
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
