"""Per-model accuracy gate for block KV reuse (LMCache #4666: re-rotation is fragile on some models).

At start-up, a calibration sample of prompts is run twice: full prefill, and assembly from blocks
cached standalone in the mode that will be served. The gate compares next-token distributions at
the first generated position and along the greedy continuation of full prefill (teacher-forced
through the assembled cache, `continuation_tokens` positions): top-1 agreement (share of compared
positions whose argmaxes match) and KL(full || assembled) in nats. Counting the continuation's
positions, not only the first token's, gives the estimate 1 + continuation_tokens times as many
comparisons per prompt: with first tokens only, 12 prompts decided in steps of 1/12, and each build
of the same model landed on another side of the threshold. The continuation is what a request
generates from the reused cache, not the prompt's template text, so it does not flatter reuse.
Reuse stays enabled for the model only when agreement >= the threshold; otherwise the caller serves
full prefill, and this is logged at ERROR level, once per decision.

Results can be stored as JSON keyed by model id (`encode_results` / `decode_results`; the caller
reads and writes the file, services/decoder/reuse_setup.py), so a restart can skip the measurement;
a stored result is only used when it was measured with the same mode and knobs, and the threshold
is re-applied to its stored agreement (`stored_decision`: changing the threshold needs no re-run).
No file I/O here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from common.blocks.assembly import MODES, assemble, compute_block_kv
from common.blocks.rope import UnsupportedRopeError

log = logging.getLogger(__name__)

RESULTS_FORMAT_VERSION = 2  # 2: agreement over first token + continuation


@dataclass(frozen=True)
class CalibrationPrompt:
    blocks: tuple[tuple[int, ...], ...]  # token ids of each block, all cached for the measurement
    tail: tuple[int, ...]  # token ids always computed (the question)


@dataclass(frozen=True)
class GateSettings:
    mode: str = "cacheblend"  # the mode to be served, measured against full prefill
    recompute_ratio: float = 0.15
    check_layer: int = 1
    epic_tokens: int = 16
    continuation_tokens: int = 8  # greedy tokens after the first, compared teacher-forced
    min_top1_agreement: float = 0.9  # below this, serve full prefill

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.mode == "full":
            raise ValueError(
                f"gate mode must be one of {[m for m in MODES if m != 'full']}, got {self.mode!r}"
            )

    def knobs(self) -> dict:
        """What a stored measurement depends on (the threshold is not: it is re-applied)."""
        return {
            "mode": self.mode,
            "recompute_ratio": self.recompute_ratio,
            "check_layer": self.check_layer,
            "epic_tokens": self.epic_tokens,
            "continuation_tokens": self.continuation_tokens,
        }


@dataclass(frozen=True)
class CalibrationResult:
    model_id: str
    knobs: dict  # GateSettings.knobs() it was measured with
    prompts: int
    top1_agreement: float  # in [0, 1], over every compared position (first token + continuation)
    mean_kl_nats: float  # mean over compared positions of KL(full || assembled)
    max_kl_nats: float
    first_token_agreement: float  # over first tokens only (one per prompt)
    positions: int  # compared positions in all
    min_top1_agreement: float  # threshold the decision used
    enabled: bool
    reason: str  # why disabled ("" when enabled)


def kl_nats(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of [P, V] logits -> [P]."""
    ref = reference_logits.float().log_softmax(-1)
    other = other_logits.float().log_softmax(-1)
    return (ref.exp() * (ref - other)).sum(-1)


@torch.no_grad()
def continuation_logits(model, cache, first_logits: torch.Tensor, start: int, tokens: int,
                         forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the first generated position and `tokens` more: greedy from `cache` when `forced`
    is None (one token per step), else teacher-forced with `forced` in one forward pass. Returns
    ([1 + tokens, V] logits, [tokens] the continuation's token ids)."""
    if tokens == 0:
        return first_logits, first_logits.new_zeros(0, dtype=torch.int64)
    if forced is None:
        rows, ids, token = [first_logits], [], first_logits.argmax(-1)
        for step in range(tokens):
            ids.append(token)
            out = model(input_ids=token[None], position_ids=torch.tensor([[start + step]], device=model.device),
                        past_key_values=cache, use_cache=True)
            rows.append(out.logits[:, -1].float())
            token = rows[-1].argmax(-1)
        return torch.cat(rows), torch.cat(ids)
    positions = torch.arange(start, start + tokens, device=model.device)[None]
    out = model(input_ids=forced[None], position_ids=positions, past_key_values=cache, use_cache=True)
    return torch.cat([first_logits, out.logits[0].float()]), forced


def _decide(
    model_id: str,
    knobs: dict,
    prompts: int,
    agreement: float,
    mean_kl: float,
    max_kl: float,
    threshold: float,
    first_agreement: float,
    positions: int,
    unsupported: str = "",
) -> CalibrationResult:
    if unsupported:
        reason = unsupported
    elif agreement < threshold:
        reason = f"top-1 agreement {agreement:.3f} < {threshold:.3f}"
    else:
        reason = ""
    return CalibrationResult(
        model_id=model_id,
        knobs=knobs,
        prompts=prompts,
        top1_agreement=agreement,
        mean_kl_nats=mean_kl,
        max_kl_nats=max_kl,
        first_token_agreement=first_agreement,
        positions=positions,
        min_top1_agreement=threshold,
        enabled=not reason,
        reason=reason,
    )


def calibrate(
    model, model_id: str, prompts: Sequence[CalibrationPrompt], settings: GateSettings
) -> CalibrationResult:
    """Measures `settings.mode` against full prefill on `prompts` and decides (no I/O, no logging)."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    matches, firsts, kls = [], 0, []
    try:
        for prompt in prompts:
            blocks = [(ids, compute_block_kv(model, ids)) for ids in prompt.blocks]
            start = sum(len(ids) for ids in prompt.blocks) + len(prompt.tail)
            full = assemble(model, blocks, prompt.tail, mode="full")
            reference, continuation = continuation_logits(
                model, full.cache, full.last_logits, start, settings.continuation_tokens)
            blended = assemble(
                model,
                blocks,
                prompt.tail,
                mode=settings.mode,
                recompute_ratio=settings.recompute_ratio,
                check_layer=settings.check_layer,
                epic_tokens=settings.epic_tokens,
            )
            assembled, _ = continuation_logits(model, blended.cache, blended.last_logits, start,
                                                settings.continuation_tokens, forced=continuation)
            same = reference.argmax(-1) == assembled.argmax(-1)  # [1 + continuation_tokens]
            matches.extend(same.tolist())
            firsts += int(same[0])
            kls.extend(kl_nats(reference, assembled).tolist())
    except UnsupportedRopeError as err:
        return _decide(
            model_id,
            settings.knobs(),
            0,
            0.0,
            float("nan"),
            float("nan"),
            settings.min_top1_agreement,
            0.0,
            0,
            unsupported=f"unsupported rope: {err}",
        )
    return _decide(
        model_id,
        settings.knobs(),
        len(prompts),
        sum(matches) / len(matches),
        sum(kls) / len(kls),
        max(kls),
        settings.min_top1_agreement,
        firsts / len(prompts),
        len(matches),
    )


def encode_results(results: Mapping[str, CalibrationResult]) -> str:
    """The JSON text of stored gate results (keyed by model id; the caller writes it)."""
    payload = {
        "format": RESULTS_FORMAT_VERSION,
        "results": {k: asdict(v) for k, v in sorted(results.items())},
    }
    return json.dumps(payload, indent=2, allow_nan=True)


def decode_results(text: str) -> dict[str, CalibrationResult]:
    """Gate results from `encode_results` text; empty when it holds another format version."""
    raw = json.loads(text)
    if raw.get("format") != RESULTS_FORMAT_VERSION:
        return {}  # an older layout is re-measured rather than misread
    return {model_id: CalibrationResult(**fields) for model_id, fields in raw["results"].items()}


def stored_decision(stored: CalibrationResult | None, settings: GateSettings) -> CalibrationResult | None:
    """A stored measurement decided again under `settings`' threshold, or None when there is
    none usable (absent, measured with other knobs, or on no prompts): then measure."""
    if stored is None or stored.knobs != settings.knobs() or stored.prompts <= 0:
        return None
    return _decide(
        stored.model_id,
        stored.knobs,
        stored.prompts,
        stored.top1_agreement,
        stored.mean_kl_nats,
        stored.max_kl_nats,
        settings.min_top1_agreement,
        stored.first_token_agreement,
        stored.positions,
    )


def log_decision(result: CalibrationResult, settings: GateSettings, source: str) -> None:
    """Logs the gate's decision once: INFO when reuse stays on, ERROR when it is turned off.
    source: where the measurement came from ("stored in ...", "measured on ...")."""
    if result.enabled:
        log.info(
            "KV block reuse enabled for %s (%s, %s): top-1 agreement %.3f (first tokens %.3f), "
            "mean KL %.2e nats",
            result.model_id,
            settings.mode,
            source,
            result.top1_agreement,
            result.first_token_agreement,
            result.mean_kl_nats,
        )
    else:
        log.error(
            "KV block reuse DISABLED for %s, serving FULL PREFILL (%s, %s): %s (first tokens %.3f); "
            "mean KL %.2e nats",
            result.model_id,
            settings.mode,
            source,
            result.reason,
            result.first_token_agreement,
            result.mean_kl_nats,
        )


def serving_mode(result: CalibrationResult, requested_mode: str) -> str:
    """The assembly mode to run: the requested one if the gate passed, else "full"."""
    return requested_mode if result.enabled else "full"
