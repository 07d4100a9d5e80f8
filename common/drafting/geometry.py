"""The draft geometry: how long the lookup key is, how deep the pools store n-grams, how big a
draft tree is by default, and how big adaptive drafting may grow one. Defined once, here; the
engine, the decoder's and the pool's settings and the trie take their defaults from
`DEFAULT_GEOMETRY`, the pool service advertises its geometry (`Pool.Info`), and a decoder
compares it with its own when it first reaches the pool (`pool_mismatches`).

What each number means, and why it is what it is (figures: `bench/results/decode.json`,
SmolLM2-135M-Instruct on 2 CPU cores, 2026-12-02):

- `key_length` (2): context tokens matched in a trie before its continuations are drafted; a
  key that is not stored falls back to shorter suffixes. Lookahead's `max_query_length` (PIA's
  code and DARE's runs).
- `decoding_length` (16) x `branch_length` (8): the draft tree a step verifies when a request
  names no size: at most 16 draft tokens, no branch deeper than 8. On CPU a tree is not free:
  a 16 x 8 step (12.7 draft tokens on average) costs 2.5x a one-token step and emits 2.5
  tokens, and a 64-token tree costs ~3.8x (the design notes' table, a 134M Llama). The budget
  sweep found 16 x 8 the best fixed tree (1.18x greedy, paired median; 8 x 4 1.04x, 32 x 8
  0.95x): hence 16 x 8, not Lookahead's GPU defaults (64 x 12, where a tree costs about one
  step).
- `ngram_length` (10 = key_length + branch_length): tokens per stored n-gram, so the deepest
  branch a pool drafts after a full key is `ngram_length - key_length`. Each inserted token
  starts a path of `ngram_length` nodes (the deep ones mostly new) and pool capacity counts
  nodes, so the pools store just what the default tree can reach; a deeper trie would not
  change a fixed tree's draft (the counts of its prefixes stay the same).
- `adaptive_max_tokens` (20), `adaptive_max_depth` (12): with adaptive drafting each step's
  tree is sized by expected tokens per second (`budget.py`); these only cap the candidates it
  chooses from. 20 does not bind on this model (its trees stayed at 17 tokens or fewer).
  Deeper than `ngram_length - key_length`, candidates come only from the request's own text
  (its overlay, whose n-grams the engine sizes key + depth), not from the pool.
  `bench.decode` runs adaptive with depth 16 and pools deep enough for it: a bench setting, not
  this default.

The pool uses `key_length`, `ngram_length` and the tree size (RetrieveDrafts' defaults); the
decoder uses all of them; the router uses none (it forwards a request's sizes untouched and
validates them against `common.requests.RequestLimits`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class DraftGeometry:
    key_length: int = 2  # context tokens matched in a trie
    ngram_length: int = 10  # tokens per stored n-gram (key_length + branch_length)
    decoding_length: int = 16  # draft tokens per step, when a request names none
    branch_length: int = 8  # deepest draft branch, when a request names none
    adaptive_max_tokens: int = 20  # adaptive drafting: candidate draft tokens per request and step at most
    adaptive_max_depth: int = 12  # adaptive drafting: deepest candidate branch

    def __post_init__(self) -> None:
        for name in ("key_length", "ngram_length", "decoding_length", "branch_length",
                     "adaptive_max_tokens", "adaptive_max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ngram_length < 2:
            raise ValueError(f"ngram_length must be >= 2 (a key token and a draft token), "
                             f"got {self.ngram_length}")

    @property
    def pool_depth(self) -> int:
        """Deepest branch a trie of `ngram_length`-token n-grams drafts after the longest key it
        matches (keys are cut to ngram_length - 1 tokens, so at least 1).

        >>> DraftGeometry().pool_depth
        8
        >>> DraftGeometry(key_length=3).pool_depth, DraftGeometry(ngram_length=2).pool_depth
        (7, 1)
        """
        return self.ngram_length - min(self.key_length, self.ngram_length - 1)

    def tree_caps(self, adaptive: bool) -> tuple[int, int]:
        """(draft tokens, depth) the engine is built with: the default tree, or with adaptive
        drafting the caps of its candidates.

        >>> DraftGeometry().tree_caps(adaptive=False), DraftGeometry().tree_caps(adaptive=True)
        ((16, 8), (20, 12))
        """
        if adaptive:
            return self.adaptive_max_tokens, self.adaptive_max_depth
        return self.decoding_length, self.branch_length


DEFAULT_GEOMETRY = DraftGeometry()


def pool_mismatches(decoder: DraftGeometry, pool: DraftGeometry) -> list[str]:
    """What a decoder drafting with `decoder` loses on the snapshots of a pool built with `pool`,
    one sentence each (empty: nothing). Neither stops drafting: a trie answers any key shorter
    than its n-grams, so a mismatch makes drafts shallower, never wrong.

    - key lengths differ: the pool's n-gram length was sized for another key;
    - the decoder's default tree is deeper than the pool's n-grams reach after its key.
    Adaptive caps deeper than the pool are by design (see the module docstring): not reported.

    >>> pool_mismatches(DraftGeometry(), DraftGeometry())
    []
    >>> pool_mismatches(DraftGeometry(branch_length=12), DraftGeometry())  # doctest: +NORMALIZE_WHITESPACE
    ['branch_length 12 is deeper than the pool drafts: its n-grams of 10 tokens reach depth 8
      after a 2-token key (pool ngram_length >= 14 would reach it)']
    """
    problems = []
    key, depth, ngram = decoder.key_length, decoder.branch_length, pool.ngram_length
    if key != pool.key_length:
        problems.append(f"key_length {key} differs from the pool's {pool.key_length} "
                        f"(its n-grams of {ngram} tokens were sized for that key)")
    reach = DraftGeometry(key_length=key, ngram_length=ngram).pool_depth
    if depth > reach:
        problems.append(f"branch_length {depth} is deeper than the pool drafts: its n-grams of {ngram} "
                        f"tokens reach depth {reach} after a {key}-token key "
                        f"(pool ngram_length >= {key + depth} would reach it)")
    return problems
