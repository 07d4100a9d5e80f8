"""SuffixDecoding (arctic-inference's `SuffixDecodingCache`) as a draft source for the replay.

The peer's own suffix trees, our verification: a global tree of earlier responses (here the
model's served answers, the same ones our pools hold) and a tree per request over its prompt and
what it has generated so far. Each step it drafts what the tree's match supports, at most
`max_spec_factor` x the match length and `max_tokens` tokens, dropping nodes below
`min_token_prob` (vLLM's defaults: tree depth 24, factor 1.0, probability 0.1, one chain);
`tree=True` asks for its tree drafts (ArcticInference's own mode) instead of one chain.

Optional: `arctic-inference` has no CPU wheel on the registry (`make suffix-peer` builds one);
`available()` says whether it imports, and bench-draft-replay leaves the peer out, saying so,
when it does not. A held-out
request's response is evicted when it ends, so later prompts do not draft from held-out answers
(our pools never see them in the replay either).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count

import numpy as np

from common.drafting.draft_tree import ROOT_PARENT, DraftTree

INSTALL_HINT = "`make suffix-peer` builds it from its sdist on CPU and installs it into the venv"


def available() -> str | None:
    """None when the package imports, else why not."""
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import means the peer is left out
        return f"{type(exc).__name__}: {exc}"
    return None


def _ids(tokens: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(tokens, dtype=np.int32))


class SuffixDecodingSource:
    """The peer as one request's DraftSource in our engine's loop (bench-decode): drafts of at
    most the step's decoding_length; `close()` when the request is done (evicts its response)."""

    def __init__(self, peer: SuffixDecodingPolicy, prompt_ids: Sequence[int]) -> None:
        self.peer, self.prompt_length = peer, len(prompt_ids)
        self.request_id = peer.start_ids(prompt_ids)
        self._seen = self.prompt_length  # context tokens already fed to the peer

    def draft(self, context: Sequence[int], decoding_length: int, branch_length: int) -> DraftTree:
        context = list(context)
        if len(context) > self._seen:  # the step's root and what was accepted before it
            self.peer.observe(self.request_id, context[self._seen:])
            self._seen = len(context)
        return self.peer.speculate(self.request_id, context, decoding_length)

    def observe(self, accepted_tokens: Sequence[int]) -> None:
        pass  # the peer learns emitted tokens from the next step's context (it holds the root too)

    def close(self) -> None:
        self.peer.finish(self.request_id)


class SuffixDecodingPolicy:
    """A bench.draft_replay Policy (start / draft / observe / finish) backed by the peer's cache."""

    def __init__(self, served_answers: Sequence[Sequence[int]], *, max_tokens: int = 24, max_depth: int = 24,
                 max_spec_factor: float = 1.0, min_token_prob: float = 0.1, tree: bool = False) -> None:
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.cache = SuffixDecodingCache(max_tree_depth=max_depth, max_cached_requests=-1)
        self.max_tokens, self.max_depth = max_tokens, max_depth
        self.max_spec_factor, self.min_token_prob, self.tree = max_spec_factor, min_token_prob, tree
        self._ids = count()
        for answer in served_answers:  # the global tree: earlier responses, kept after they end
            request_id = f"served-{next(self._ids)}"
            self.cache.start_request(request_id, _ids([]))
            self.cache.add_active_response(request_id, _ids(answer))
            self.cache.stop_request(request_id)

    def start(self, case) -> str:
        return self.start_ids(case.prompt)

    def start_ids(self, prompt_ids: Sequence[int]) -> str:
        request_id = f"request-{next(self._ids)}"
        self.cache.start_request(request_id, _ids(prompt_ids))
        return request_id

    def draft(self, state: str, case, context: list[int], room: int) -> DraftTree:
        return self.speculate(state, context, min(self.max_tokens, room - 1))

    def speculate(self, state: str, context: Sequence[int], budget: int) -> DraftTree:
        budget = min(self.max_tokens, budget)
        if budget <= 0:
            return DraftTree()
        draft = self.cache.speculate(state, _ids(context[-self.max_depth:]), max_spec_tokens=budget,
                                     max_spec_factor=self.max_spec_factor, min_token_prob=self.min_token_prob,
                                     use_tree_spec=self.tree)
        parents = [ROOT_PARENT if p < 0 else int(p) for p in draft.parents]
        return DraftTree(tokens=[int(t) for t in draft.token_ids], parents=parents,
                         scores=[float(p) for p in draft.probs])

    def observe(self, state: str, emitted: list[int]) -> None:
        self.cache.add_active_response(state, _ids(emitted))

    def finish(self, state: str) -> None:
        self.cache.stop_request(state)
        self.cache.evict_cached_response(state)
