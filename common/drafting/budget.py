"""Each step's draft budget: the tree (per row of a batch) that maximises expected tokens per second.

Inputs: every row's candidate nodes with their gains (probability of being accepted,
confidence.py), sorted best first, and the predicted cost of one step as a function of the
padded tree width (cost_model.py, for this batch size and cache length).

A step of width W (root + W-1 drafts per row) emits per row 1 + the accepted drafts, so its
expected rate is  sum_rows (1 + E_row) / (cost(W) + overhead).  Rows are padded to the widest
tree, so a node that fits under the current width costs nothing more in the forward, and one
that widens the tree costs cost(W+1) - cost(W). Growth therefore goes width by width: widening
by one adds, for every row, its next best node (through one priority queue over all rows'
candidates when a per-forward token cap makes rows compete: the best nodes anywhere in the
batch win), and the chosen width is the one with the best expected rate. For one row this is
exactly best-first growth node by node, stopping where the next node's gain no longer pays
for its cost. Taking the best width rather than stopping at the first one that does not pay
keeps a flat stretch of the cost curve (a GPU, where 1 and 32 tokens cost the same) from
ending growth early, and equals "stop when the next node no longer pays" where the rate is
unimodal. Nodes of negligible gain are never drafted (verifying them is not quite free).
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.drafting.confidence import (
    AcceptanceCalibration,
    ConfidenceSettings,
    ConfidentDrafter,
    pool_calibration,
    request_calibration,
)
from common.drafting.cost_correction import StepCostCorrection
from common.drafting.cost_model import StepCostModel
from common.drafting.draft_tree import DraftTree
from common.drafting.pools import DraftSource, TieredPool

DEFAULT_DRAFT_MARGIN = 0.15  # one-token steps a drafting step is priced dearer where the cost model extrapolates
MAX_CURVE_WIDTH = 256  # draft tokens per row priced at most (a tree is never wider in practice)


@dataclass(slots=True, frozen=True)
class BudgetPlan:
    counts: list[int]  # draft tokens per row
    width: int  # padded tree width (root included)
    expected_tokens: float  # sum over rows of 1 + expected accepted drafts
    predicted_s: float  # predicted step seconds (cost + overhead)

    @property
    def expected_rate(self) -> float:
        return self.expected_tokens / self.predicted_s


def plan_budget(
    gains: Sequence[Sequence[float]],
    cost_by_width: Sequence[float],
    *,
    overhead_s: float = 0.0,
    max_total: int | None = None,
    fill_min_gain: float = 0.02,
    rate: float | None = None,
    draft_margin: float = 0.0,
) -> BudgetPlan:
    """Draft tokens per row.

    gains[r]: row r's candidate gains in best-first order (non-increasing, each node's parent
    before it); nodes below `fill_min_gain` are never drafted (verifying them costs a little
    and returns nothing). cost_by_width[w - 1]: predicted step seconds at padded width w
    (non-decreasing; its length bounds the width). max_total: draft tokens per forward across
    all rows. rate: the long-run tokens per second this decoder achieves (the step's own
    rate when None): a width is then worth expected_tokens - rate * seconds. draft_margin: a
    step that drafts is priced `draft_margin` one-token steps dearer, so drafting must promise
    that much more than not drafting (predictions err, and a marginal gain is within their error).
    """
    rows = len(gains)
    assert len(cost_by_width) >= 1
    usable = []
    for row in gains:
        assert all(a >= b for a, b in zip(row, row[1:])), "gains must be sorted best first"
        kept = 0
        while kept < len(row) and row[kept] >= fill_min_gain and row[kept] > 0:
            kept += 1
        usable.append(row[:kept])
    total = sum(map(len, usable))
    cap = max_total if max_total is not None else total
    longest = max(map(len, usable), default=0)
    prefix = [list(itertools.accumulate(row, initial=0.0)) for row in usable]
    # Runs every step: plain floats per width, one BudgetPlan at the end. Without a binding
    # token cap every row simply fills up to the width.
    competing = cap < total
    best_value, best = -math.inf, (1, None, float(rows), cost_by_width[0] + overhead_s)
    for width in range(1, min(len(cost_by_width), longest + 1) + 1):
        counts = _best_under_width(usable, width - 1, cap) if competing else None
        if counts is None:
            expected = rows + sum(p[min(width - 1, len(p) - 1)] for p in prefix)
        else:
            expected = rows + sum(p[k] for p, k in zip(prefix, counts))
        seconds = cost_by_width[width - 1] + overhead_s
        priced = seconds + (draft_margin * (cost_by_width[0] + overhead_s) if width > 1 else 0.0)
        value = expected / priced if rate is None else expected - rate * priced
        if value > best_value:
            best_value, best = value, (width, counts, expected, seconds)
    width, counts, expected, seconds = best
    if counts is None:
        counts = [min(width - 1, len(row)) for row in usable]
    return BudgetPlan(counts, 1 + max(counts, default=0), expected, seconds)


def _best_under_width(gains: Sequence[Sequence[float]], per_row: int, cap: int) -> list[int]:
    """Per-row counts taking the best nodes anywhere in the batch (one priority queue over
    all rows), at most `per_row` in a row and `cap` in all; optimal for a fixed width."""
    counts = [0] * len(gains)
    if per_row <= 0 or cap <= 0:
        return counts
    if cap >= sum(min(per_row, len(row)) for row in gains):  # no competition: every row fills up
        return [min(per_row, len(row)) for row in gains]
    heap = [(-row[0], r) for r, row in enumerate(gains) if row]
    heapq.heapify(heap)
    taken = 0
    while heap and taken < cap:
        _, r = heapq.heappop(heap)
        counts[r] += 1
        taken += 1
        if counts[r] < min(per_row, len(gains[r])):
            heapq.heappush(heap, (-gains[r][counts[r]], r))
    return counts


def best_first_order(gains: Sequence[float]) -> list[int]:
    """Node indices by descending gain (ties: lower index, so a parent - listed before its
    children, with a gain at least theirs - always comes before them)."""
    return sorted(range(len(gains)), key=lambda i: (-gains[i], i))


def select_nodes(tree: DraftTree, chosen: Sequence[int]) -> DraftTree:
    """The subtree of the `chosen` node indices (closed under parents), keeping the tree's
    depth-first layout, so its best branch stays the contiguous run at the front."""
    keep = sorted(chosen)
    position = {node: i for i, node in enumerate(keep)}
    parents = []
    for node in keep:
        parent = tree.parents[node]
        assert parent < 0 or parent in position, "chosen nodes must include their parents"
        parents.append(position[parent] if parent >= 0 else parent)
    return DraftTree(tokens=[tree.tokens[i] for i in keep], parents=parents, scores=[tree.scores[i] for i in keep])


class AdaptiveDrafting:
    """The engine's adaptive drafting: wraps each request's draft source with confidence
    estimates, keeps one calibration per pool, and plans every step's trees (one batch at a
    time) from the cost model, corrected by what the steps took (cost_correction.py, when the
    caller reports `step_finished`). Fixed budgets need none of this (the engine's plain path)."""

    def __init__(self, cost_model: StepCostModel, settings: ConfidenceSettings | None = None, *,
                 clock: Callable[[], float], fill_min_gain: float = 0.02, rate_decay: float = 0.02,
                 rate_min_steps: float = 8.0, correction: StepCostCorrection | None = None,
                 draft_margin: float = DEFAULT_DRAFT_MARGIN) -> None:
        """clock: seconds of a monotonic clock (the caller's `time.perf_counter`, a fake in
        tests); it times the candidate retrieval, a fixed cost of every step. draft_margin
        (plan_budget's) applies to batch sizes the cost model extrapolates: there its error
        is largest (16 rows on 2 CPU cores, profiled at 1 row: bench-decode's adaptive drafting
        ran at 0.94x no drafting before the correction and this margin, 1.01x with both; the
        README's batched figures), and where every batch size was profiled it is 0."""
        self.cost_model = cost_model
        self.correction = correction or StepCostCorrection()
        self.draft_margin = draft_margin
        self._planned: tuple[int, int, float] | None = None  # last plan: rows, width, uncorrected seconds
        self.clock = clock
        self.settings = settings or ConfidenceSettings()
        self.fill_min_gain = fill_min_gain
        self._pool_calibrations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._unpooled = pool_calibration(self.settings)
        self.rate_min_steps = rate_min_steps
        self._curves: dict[tuple[int, int, int], list[float]] = {}
        self.draft_seconds = 0.0  # running mean of candidate retrieval per step (a fixed cost)
        self.size_counts: Counter[int] = Counter()  # draft tokens chosen per row and step
        self.width_counts: Counter[int] = Counter()  # padded widths chosen per step
        self.predicted_accepted = 0.0  # sum over rows and steps of the chosen trees' expected accepted
        # Long-run tokens per predicted second, per batch size: sums decayed per step (about
        # the last 1 / rate_decay steps count).
        self.rate_decay = rate_decay
        self._rate_sums: dict[int, list[float]] = {}
        self._last_step: tuple[int, float, list[tuple[ConfidentDrafter, int]]] | None = None

    def calibration_for(self, pool: object | None) -> AcceptanceCalibration:
        if pool is None:
            return self._unpooled
        if isinstance(pool, TieredPool):  # made per request: its pool key's trie is what lasts
            pool = pool.key_pool
        found = self._pool_calibrations.get(pool)
        if found is None:
            found = self._pool_calibrations[pool] = pool_calibration(self.settings)
        return found

    def wrap(self, drafter: DraftSource, pool: object | None) -> ConfidentDrafter:
        calibration = request_calibration(self.calibration_for(pool), self.settings)
        return ConfidentDrafter(drafter, calibration, self.settings)

    def _curve(self, max_width: int, batch: int, cache_length: int) -> list[float]:
        key = (max_width, batch, cache_length // 64)  # cache length in buckets: the curve moves slowly
        curve = self._curves.get(key)
        if curve is None:
            if len(self._curves) > 4096:
                self._curves.clear()
            curve = self._curves[key] = self.cost_model.predict_curve(max_width, batch, (cache_length // 64) * 64 + 32)
        return curve

    def step_finished(self, seconds: float) -> None:
        """The step planned last took `seconds` (drafting, forward, verification, bookkeeping):
        the cost correction learns from it against the model's uncorrected prediction."""
        if self._planned is not None:
            rows, width, predicted_s = self._planned
            self._planned = None
            self.correction.record(rows, width, predicted_s, seconds)

    def rate(self, batch: int) -> float | None:
        """Tokens per predicted second achieved with `batch` rows lately (None: too few steps)."""
        sums = self._rate_sums.get(batch)
        if sums is None or sums[2] < self.rate_min_steps:
            return None
        return sums[0] / sums[1]

    def _record_last_step(self) -> None:
        """What the previous step emitted (drafters count their tokens) over its predicted time.
        A row that finished in that step is not seen again and is left out on both sides."""
        if self._last_step is None:
            return
        batch, predicted_s, before = self._last_step
        self._last_step = None
        emitted = [drafter.emitted - count for drafter, count in before]
        seen = [e for e in emitted if e > 0]
        if not seen:
            return
        sums = self._rate_sums.setdefault(batch, [0.0, 0.0, 0.0])
        keep = 1.0 - self.rate_decay
        sums[0] = sums[0] * keep + sum(seen)
        sums[1] = sums[1] * keep + predicted_s * len(seen) / len(emitted)
        sums[2] = sums[2] * keep + 1.0

    def draft_rows(self, rows: Sequence[tuple[ConfidentDrafter | None, Sequence[int], int, int]],
                   cache_length: int, max_total: int | None) -> list[DraftTree]:
        """rows: (drafter, context, max draft tokens, max depth) per batch row.

        The step's value is its expected tokens minus the long-run rate times its predicted
        time (renewal reward: maximising each step's own tokens per second would draft most
        when drafts are least likely to be accepted). Until the rate is known, each step's
        own rate is maximised."""
        started = self.clock()
        self._record_last_step()
        found = []
        for drafter, context, max_tokens, depth in rows:
            if drafter is None or max_tokens <= 0 or depth <= 0:
                found.append(None)
                continue
            tree, raw, gains = drafter.candidates(context, max_tokens, depth)
            order = best_first_order(gains)
            found.append((drafter, tree, raw, order, [gains[i] for i in order]))
        self.draft_seconds += 0.1 * (self.clock() - started - self.draft_seconds)
        # The curve up to the widest tree the rows may ask for (not this step's widest candidate
        # tree, which changes every step and would miss the curve cache nearly every time).
        max_width = 1 + min(MAX_CURVE_WIDTH, max((row[2] for row in rows if row[0] is not None), default=0))
        predicted = [c + self.draft_seconds for c in self._curve(max_width, len(rows), cache_length)]
        plan = plan_budget([f[4] if f is not None else [] for f in found],
                           self.correction.apply(predicted, len(rows)),
                           max_total=max_total, fill_min_gain=self.fill_min_gain, rate=self.rate(len(rows)),
                           draft_margin=self.draft_margin if self.cost_model.extrapolates(len(rows)) else 0.0)
        self._planned = (len(rows), plan.width, predicted[plan.width - 1])
        self._last_step = (len(rows), plan.predicted_s,
                           [(f[0], f[0].emitted) for f in found if f is not None])
        self.width_counts[plan.width] += 1
        self.predicted_accepted += plan.expected_tokens - len(rows)
        drafts = []
        for f, count in zip(found, plan.counts):
            if f is None:
                drafts.append(DraftTree())
                continue
            drafter, tree, raw, order, _ = f
            chosen = sorted(order[:count])
            selected = select_nodes(tree, chosen)
            drafter.commit(selected, [raw[i] for i in chosen])
            self.size_counts[count] += 1
            drafts.append(selected)
        return drafts
