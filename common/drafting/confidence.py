"""How likely each draft node is to be accepted, and the expected accepted length of a tree.

A node's conditional acceptance probability (given its parent was accepted) starts from the
trie's relative frequencies: score(node) / score(parent), the share of the parent's
continuations that go through this token (for children of the root, score / the root's total,
since scores summed over several sources - request overlay + pool - can exceed 1). It is
smoothed towards a prior with a pseudo-count, so a continuation seen once ("1 of 1") is not
taken as certain while "200 of 200" nearly is:

    p = (p_raw * evidence + prior_weight * prior) / (evidence + prior_weight)

where evidence is the parent's count (score(parent) x the lookup key's weight in the tries).

Frequencies in text are not acceptance by the model. A small logistic model over each node's
features turns the smoothed frequency into an acceptance probability (FEATURES: the frequency's
log-odds, whether the node is its parent's most frequent child, its depth, whether the request's
own text proposed it rather than the pool, and its context support: how many context tokens
before the key the stored text it continues shares with the request, TokenTrie.context_support,
SuffixDecoding's match length); its weights are fitted offline by replaying greedy outputs
(bench/draft_replay.py). Replayed on SmolLM2's held-out prompts, it predicts acceptance with a
log-loss of 0.36 against 0.43 for the frequency alone (0.38 without context support): frequencies
under-state the top child (accepted 83% of the times it was tested, against 71% predicted) and
over-state what the prompt proposes. The estimate is then calibrated online: per
depth, a multiplicative correction observed / predicted over the nodes that were actually put
to the test (those whose parent was accepted). Corrections are hierarchical: a pool-wide one
(shared by the requests drafting from one pool, with a neutral prior) is the prior of each
request's own one, so a request starts from what its pool has shown and drifts to its own
behaviour as evidence accumulates.

A node is accepted only if its whole path is, so its expected contribution is the product of
conditional probabilities along its path (its "gain"); the expected accepted length of a tree
is the sum of its nodes' gains. Gains never increase down a path, so taking nodes in
descending gain order always yields a tree (best-first growth).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.drafting.draft_tree import ROOT_PARENT, DraftTree
from common.drafting.pools import DraftSource, RequestDrafter

MAX_PROBABILITY = 0.98  # nothing drafted from n-gram counts is certain

FEATURES = ("bias", "log_odds", "top_sibling", "depth", "from_overlay", "context_support")
# Fitted by `python -m bench.draft_replay --fit` on the default workload's warm-split prompts
# (never the held-out ones the benchmarks decode), pools holding corpus texts and served answers,
# for the default model (SmolLM2-135M-Instruct: 48 prompts, 4,500 tested nodes, 2026-12-04; before
# context support it was (-1.33, 1.01, 0.68, 2.03, 0.32), the 2.7M model's (0.12, 1.56, 0.47, 0.65,
# -1.42)). Another model or workload: fit again and set ADACCEL_ADAPTIVE_CONFIDENCE_WEIGHTS.
DEFAULT_WEIGHTS = (-1.88, 0.97, 0.60, 1.75, 0.12, 2.62)
MAX_FEATURE_DEPTH = 10  # deeper nodes share the depth feature's last value
MAX_FEATURE_SUPPORT = 8  # context tokens of support (TokenTrie.context_support) the feature tells apart


@dataclass(slots=True, frozen=True)
class ConfidenceSettings:
    # Defaults chosen by replaying the default workload's greedy outputs (exact acceptance,
    # modelled cost): a sceptical prior and fast-moving corrections did best.
    prior: float = 0.3  # acceptance assumed for a continuation with no evidence
    prior_weight: float = 2.0  # its pseudo-count
    pool_prior_weight: float = 5.0  # predicted-acceptance mass that the neutral pool prior is worth
    request_prior_weight: float = 3.0  # ... and that the pool's correction is worth to a request
    max_depth: int = 32  # depths beyond share the last one's correction
    decay: float = 0.995  # pool statistics: older steps weigh less (the traffic shifts)
    # Logistic weights over FEATURES (None: the smoothed frequency is the probability).
    weights: tuple[float, ...] | None = DEFAULT_WEIGHTS


class AcceptanceCalibration:
    """Per-depth correction observed / predicted, with a prior: a parent calibration's
    correction (a pool's) or 1.0."""

    def __init__(self, prior_weight: float, parent: AcceptanceCalibration | None = None, *,
                 max_depth: int = 32, decay: float = 1.0) -> None:
        assert prior_weight > 0 and 0 < decay <= 1 and max_depth >= 1
        self.prior_weight = prior_weight
        self.parent = parent
        self.decay = decay
        self.max_depth = max_depth
        self.predicted = [0.0] * (max_depth + 1)
        self.observed = [0.0] * (max_depth + 1)

    def _slot(self, depth: int) -> int:
        return min(max(depth, 1), self.max_depth)

    def scale(self, depth: int) -> float:
        slot = self._slot(depth)
        prior = self.parent.scale(depth) if self.parent is not None else 1.0
        return (self.prior_weight * prior + self.observed[slot]) / (self.prior_weight + self.predicted[slot])

    def record(self, outcomes: Sequence[tuple[int, float, bool]]) -> None:
        """outcomes: (depth, predicted probability, accepted) of each node put to the test."""
        if self.decay < 1.0 and outcomes:
            self.predicted = [v * self.decay for v in self.predicted]
            self.observed = [v * self.decay for v in self.observed]
        for depth, predicted, accepted in outcomes:
            slot = self._slot(depth)
            self.predicted[slot] += predicted
            self.observed[slot] += float(accepted)
        if self.parent is not None:
            self.parent.record(outcomes)

    def scales(self) -> list[float]:
        return [self.scale(d) for d in range(1, self.max_depth + 1)]


def raw_probabilities(tree: DraftTree, evidence: float | None, settings: ConfidenceSettings) -> list[float]:
    """Smoothed conditional acceptance probability of each node from the tree's scores.

    `evidence`: the lookup key's weight in the tries (a count); None means unlimited evidence
    (no smoothing), e.g. for a source whose scores are already probabilities.
    """
    root_mass = max(1.0, sum(s for s, p in zip(tree.scores, tree.parents) if p == ROOT_PARENT))
    probabilities = []
    for score, parent in zip(tree.scores, tree.parents):
        parent_score = root_mass if parent == ROOT_PARENT else tree.scores[parent]
        raw = min(1.0, score / parent_score) if parent_score > 0 else 0.0
        if evidence is not None:
            support = evidence * parent_score / root_mass
            raw = (raw * support + settings.prior * settings.prior_weight) / (support + settings.prior_weight)
        probabilities.append(raw)
    return probabilities


def node_features(tree: DraftTree, raw: Sequence[float], from_overlay: Sequence[bool] | None,
                  support: Sequence[int] | None = None) -> np.ndarray:
    """[N, len(FEATURES)] features of the tree's nodes (see FEATURES); `from_overlay` and
    `support` (context tokens after which the node's path is stored) None: unknown (0)."""
    seen: set[int] = set()
    top = []
    for parent in tree.parents:  # siblings are laid out best first: the first one seen is the top
        top.append(parent not in seen)
        seen.add(parent)
    clipped = np.clip(np.asarray(raw, dtype=np.float64), 0.01, 0.99)
    features = np.empty((len(tree), len(FEATURES)))
    features[:, 0] = 1.0
    features[:, 1] = np.log(clipped / (1.0 - clipped))
    features[:, 2] = top
    features[:, 3] = np.minimum(tree.depths(), MAX_FEATURE_DEPTH) / MAX_FEATURE_DEPTH
    features[:, 4] = from_overlay if from_overlay is not None else 0.0
    features[:, 5] = (np.minimum(support, MAX_FEATURE_SUPPORT) / MAX_FEATURE_SUPPORT
                      if support is not None else 0.0)
    return features


def acceptance_probabilities(tree: DraftTree, raw: Sequence[float], from_overlay: Sequence[bool] | None,
                             settings: ConfidenceSettings, support: Sequence[int] | None = None) -> list[float]:
    """Each node's conditional acceptance probability before online calibration: the logistic
    model over its features (node_features), or the smoothed frequency itself when no weights
    are set."""
    if settings.weights is None or not len(tree):
        return list(raw)
    logits = node_features(tree, raw, from_overlay, support) @ np.asarray(settings.weights, dtype=np.float64)
    return (1.0 / (1.0 + np.exp(-logits))).tolist()


def calibrated(tree: DraftTree, raw: Sequence[float], calibration: AcceptanceCalibration | None) -> list[float]:
    """Conditional probabilities after the per-depth correction, capped so that siblings'
    probabilities sum to at most MAX_PROBABILITY (at most one of them can be accepted)."""
    depths = tree.depths()
    if calibration is not None:
        scales = [calibration.scale(d) for d in range(1, max(depths) + 1)]
        scaled = [p * scales[d - 1] for p, d in zip(raw, depths)]
    else:
        scaled = list(raw)
    sibling_mass: dict[int, float] = {}
    for p, parent in zip(scaled, tree.parents):
        sibling_mass[parent] = sibling_mass.get(parent, 0.0) + p
    return [p * min(1.0, MAX_PROBABILITY / sibling_mass[parent]) if sibling_mass[parent] > 0 else 0.0
            for p, parent in zip(scaled, tree.parents)]


def path_gains(tree: DraftTree, conditional: Sequence[float]) -> list[float]:
    """Probability that each node is accepted: the product of conditionals along its path."""
    gains: list[float] = []
    for p, parent in zip(conditional, tree.parents):
        gains.append(p * (gains[parent] if parent != ROOT_PARENT else 1.0))
    return gains


def expected_accepted(tree: DraftTree, conditional: Sequence[float]) -> float:
    """Expected number of accepted draft tokens when verifying `tree` (bonus not counted)."""
    return sum(path_gains(tree, conditional))


def tested_outcomes(tree: DraftTree, raw: Sequence[float], emitted: Sequence[int]) -> list[tuple[int, float, bool]]:
    """(depth, predicted, accepted) of every node whose parent was accepted, given the tokens
    a step emitted (accepted drafts then the bonus): the accepted nodes are the tree path
    spelled by a prefix of `emitted`."""
    children: dict[int, list[int]] = {}
    for index, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(index)
    outcomes = []
    node, depth = ROOT_PARENT, 1
    for token in list(emitted) + [None]:
        below = children.get(node, [])
        match = None
        for child in below:
            accepted = token is not None and tree.tokens[child] == token and match is None
            outcomes.append((depth, raw[child], accepted))
            if accepted:
                match = child
        if match is None:
            break
        node, depth = match, depth + 1
    return outcomes


@dataclass(slots=True, frozen=True)
class ScoredCandidates:
    """A candidate tree and each node's estimates, from evidence to the calibrated probability."""

    tree: DraftTree
    raw: list[float]  # smoothed relative frequencies
    from_overlay: list[bool] | None  # proposed by the request's own text (None: unknown source)
    support: list[int] | None  # context tokens after which the node's path is stored (None: unknown)
    base: list[float]  # acceptance model's conditional probabilities (= raw without weights)
    conditional: list[float]  # after the online per-depth calibration


class ConfidentDrafter:
    """A request's draft source with acceptance estimates: proposes a candidate tree with each
    node's gain, remembers the draft finally verified, and calibrates on what was accepted.

    Wraps any DraftSource; a RequestDrafter also gives the lookup key's weight (the evidence
    for smoothing). The engine asks `candidates`, chooses a subset (budget.py), `commit`s it.
    """

    def __init__(self, inner: DraftSource, calibration: AcceptanceCalibration,
                 settings: ConfidenceSettings | None = None) -> None:
        self.inner = inner
        self.calibration = calibration
        self.settings = settings or ConfidenceSettings()
        self._pending: tuple[DraftTree, list[float]] | None = None
        self.emitted = 0  # tokens emitted so far (the budget chooser measures its rate with it)

    def evidence(self, context: Sequence[int]) -> float | None:
        """The lookup key's weight in the tries (None: a source without counts)."""
        if not isinstance(self.inner, RequestDrafter):
            return None
        key = context[-self.inner.settings.key_length:]
        pool = self.inner.pool
        return self.inner.overlay.key_weight(key) + (pool.key_weight(key) if pool is not None else 0.0)

    def scored(self, context: Sequence[int], max_tokens: int, max_depth: int) -> ScoredCandidates:
        support = None
        if isinstance(self.inner, RequestDrafter):
            tree, from_overlay = self.inner.draft_with_origin(context, max_tokens, max_depth)
            support = self.inner.context_support(context, tree)
        else:
            tree, from_overlay = self.inner.draft(context, max_tokens, max_depth), None
        if not len(tree):
            return ScoredCandidates(tree, [], from_overlay, support, [], [])
        raw = raw_probabilities(tree, self.evidence(context), self.settings)
        base = acceptance_probabilities(tree, raw, from_overlay, self.settings, support)
        return ScoredCandidates(tree, raw, from_overlay, support, base, calibrated(tree, base, self.calibration))

    def candidates(self, context: Sequence[int], max_tokens: int, max_depth: int
                   ) -> tuple[DraftTree, list[float], list[float]]:
        """(candidate tree, conditional probabilities before calibration, gains after it)."""
        found = self.scored(context, max_tokens, max_depth)
        return found.tree, found.base, path_gains(found.tree, found.conditional)

    def commit(self, tree: DraftTree, raw: list[float]) -> None:
        self._pending = (tree, raw)

    def draft(self, context: Sequence[int], decoding_length: int, branch_length: int) -> DraftTree:
        """Plain DraftSource use (fixed budget): the inner draft, still calibrated on."""
        tree, raw, _ = self.candidates(context, decoding_length, branch_length)
        self.commit(tree, raw)
        return tree

    def observe(self, accepted_tokens: Sequence[int]) -> None:
        self.emitted += len(accepted_tokens)
        if self._pending is not None:
            tree, raw = self._pending
            self._pending = None
            if len(tree):
                self.calibration.record(tested_outcomes(tree, raw, accepted_tokens))
        self.inner.observe(accepted_tokens)


def pool_calibration(settings: ConfidenceSettings) -> AcceptanceCalibration:
    return AcceptanceCalibration(settings.pool_prior_weight, max_depth=settings.max_depth, decay=settings.decay)


def request_calibration(pool: AcceptanceCalibration | None, settings: ConfidenceSettings) -> AcceptanceCalibration:
    return AcceptanceCalibration(settings.request_prior_weight, pool, max_depth=settings.max_depth)
