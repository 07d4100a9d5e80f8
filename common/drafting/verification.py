"""Verification of a draft tree against the target model's logits (torch, no transformers).

Input: the logits of one forward pass over a `FlatTree` row, logits[i] being the model's
prediction for the token after node i's branch. Output: a `Verdict`, the accepted path (node
indices whose KV is kept) and the tokens to emit (accepted drafts + one bonus token).

Three rules:
- strict: walk from the root, follow the child equal to the argmax, stop when none matches;
  the bonus is the argmax at the last accepted node. Emits exactly greedy decoding's tokens.
- relaxed (DARE): a child is acceptable when it is the argmax, or when it is among the top-k
  AND has probability >= min_prob; the longest acceptable branch wins (ties: the earlier,
  i.e. higher-scored, branch); the bonus is the argmax. Lossy: output may differ from greedy.
- sampling: speculative sampling for a deterministic draft. At a node with target distribution
  p, try the children in order: accept child x with probability p(x); on rejection set
  p(x) = 0 and renormalize, then try the next child. If every child is rejected (or there are
  none) sample the bonus from what is left of p. Each emitted token is then distributed
  exactly as p (the target after temperature/top-k/top-p), whatever the draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.drafting.draft_tree import FlatTree


@dataclass(slots=True)
class Verdict:
    path: list[int] = field(default_factory=list)  # row indices kept: root (0), then accepted nodes
    tokens: list[int] = field(default_factory=list)  # emitted: accepted draft tokens, then the bonus

    @property
    def accepted(self) -> int:
        """Draft tokens accepted (the bonus is not a draft token)."""
        return len(self.path) - 1


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off


def _check_logits(logits: torch.Tensor, tree: FlatTree) -> None:
    assert logits.dim() == 2 and logits.shape[0] == len(tree), (tuple(logits.shape), len(tree))  # [Q, V]


def verify_strict(logits: torch.Tensor, tree: FlatTree) -> Verdict:
    _check_logits(logits, tree)
    best = logits.argmax(dim=-1).tolist()  # [Q]
    node, verdict = 0, Verdict(path=[0])
    while True:
        target = best[node]
        match = next((c for c in tree.children[node] if tree.tokens[c] == target), None)
        if match is None:
            verdict.tokens.append(target)
            return verdict
        verdict.path.append(match)
        verdict.tokens.append(target)
        node = match


def relaxed_acceptable(top_tokens: Sequence[int], top_probs: Sequence[float], token: int, min_prob: float) -> bool:
    """DARE's rule for one draft token, given the target's top-k tokens (most likely first) and
    their probabilities: the argmax is always acceptable (so relaxed never rejects what strict
    accepts); any other token must be among the top-k with probability >= min_prob."""
    if token == top_tokens[0]:
        return True
    return any(t == token and p >= min_prob for t, p in zip(top_tokens, top_probs))


def verify_relaxed(logits: torch.Tensor, tree: FlatTree, *, top_k: int = 2, min_prob: float = 0.1) -> Verdict:
    _check_logits(logits, tree)
    probs = torch.softmax(logits.float(), dim=-1)  # [Q, V]
    top_values, top_indices = torch.topk(probs, max(top_k, 1), dim=-1)  # [Q, k]
    top_tokens, top_probs = top_indices.tolist(), top_values.tolist()

    # Depth-first over acceptable children only; keep the longest path (first found on ties).
    best_path: list[int] = [0]
    stack: list[list[int]] = [[0]]
    while stack:
        path = stack.pop()
        if len(path) > len(best_path):
            best_path = path
        node = path[-1]
        for child in reversed(tree.children[node]):  # reversed: pop the best child first
            if relaxed_acceptable(top_tokens[node], top_probs[node], tree.tokens[child], min_prob):
                stack.append(path + [child])
    tokens = [tree.tokens[i] for i in best_path[1:]] + [top_tokens[best_path[-1]][0]]
    return Verdict(path=best_path, tokens=tokens)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution [N, V] from logits [N, V]: temperature, then top-k, then top-p
    (the order transformers' generate applies its warpers in)."""
    assert params.temperature > 0, "greedy decoding has no sampling distribution"
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop the low tail whose mass is <= 1 - top_p; always keep the most likely token.
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


def speculative_choice(
    probs: torch.Tensor, candidates: list[int], generator: torch.Generator | None
) -> tuple[int | None, int]:
    """One node of speculative sampling. `probs` [V] is the target distribution; `candidates`
    the draft tokens to try in order. Returns (index of the accepted candidate or None, token).

    Instead of renormalizing p after each rejection, the removed mass is tracked: candidate x
    is accepted with probability p(x) / (total - removed), which is p'(x) of the renormalized
    residual. One uniform per candidate is drawn up front, so a request's random stream is
    consumed the same way whatever is accepted.
    """
    assert probs.dim() == 1
    masses = probs[candidates].double().tolist() if candidates else []
    uniforms = torch.rand(len(candidates), generator=generator, dtype=torch.float64).tolist()
    total = float(probs.double().sum())
    removed = 0.0
    for index, (token, mass, uniform) in enumerate(zip(candidates, masses, uniforms)):
        remaining = total - removed
        if mass > 0 and uniform * remaining < mass:
            return index, token
        removed += mass
    residual = probs.double().clone()  # [V]
    if candidates:
        residual[candidates] = 0.0
    if float(residual.sum()) <= 0:  # the candidates covered all mass; cannot happen in exact arithmetic
        return None, int(probs.argmax())
    return None, int(torch.multinomial(residual, 1, generator=generator))


def verify_sampling(
    logits: torch.Tensor, tree: FlatTree, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    _check_logits(logits, tree)
    probs = target_probs(logits, params).cpu()  # [Q, V]
    node, verdict = 0, Verdict(path=[0])
    while True:
        children = tree.children[node]
        picked, token = speculative_choice(probs[node], [tree.tokens[c] for c in children], generator)
        verdict.tokens.append(token)
        if picked is None:
            return verdict
        node = children[picked]
        verdict.path.append(node)
