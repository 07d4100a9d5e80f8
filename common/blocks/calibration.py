"""Per-model accuracy gate for block KV reuse (LMCache #4666: re-rotation is fragile on some models).

At start-up, a calibration sample of prompts is run twice: full prefill, and assembly from blocks
cached standalone in the mode that will be served. The gate compares the next-token distribution
after the prompt: top-1 agreement (share of prompts where both argmaxes match) and KL(full ||
assembled) in nats. Reuse stays enabled for the model only when agreement >= the threshold;
otherwise the caller serves full prefill, and this is logged at ERROR level, once per decision.

Results are stored as JSON keyed by model id, so a restart can skip the measurement; a stored
result is only used when it was measured with the same mode and knobs, and the threshold is
re-applied to its stored agreement (changing the threshold needs no re-run).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.blocks.assembly import MODES, assemble, compute_block_kv
from common.blocks.rope import UnsupportedRopeError

log = logging.getLogger(__name__)

RESULTS_FORMAT_VERSION = 1


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
        }


@dataclass(frozen=True)
class CalibrationResult:
    model_id: str
    knobs: dict  # GateSettings.knobs() it was measured with
    prompts: int
    top1_agreement: float  # in [0, 1]
    mean_kl_nats: float  # mean over prompts of KL(full || assembled), next-token distribution
    max_kl_nats: float
    min_top1_agreement: float  # threshold the decision used
    enabled: bool
    reason: str  # why disabled ("" when enabled)


def _kl_nats(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    ref = reference_logits.float().log_softmax(-1)  # [1, V]
    other = other_logits.float().log_softmax(-1)
    return float((ref.exp() * (ref - other)).sum(-1).mean())


def _decide(
    model_id: str,
    knobs: dict,
    prompts: int,
    agreement: float,
    mean_kl: float,
    max_kl: float,
    threshold: float,
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
    agree, kls = 0, []
    try:
        for prompt in prompts:
            blocks = [(ids, compute_block_kv(model, ids)) for ids in prompt.blocks]
            full = assemble(model, blocks, prompt.tail, mode="full")
            blended = assemble(
                model,
                blocks,
                prompt.tail,
                mode=settings.mode,
                recompute_ratio=settings.recompute_ratio,
                check_layer=settings.check_layer,
                epic_tokens=settings.epic_tokens,
            )
            agree += int(full.last_logits.argmax(-1).item() == blended.last_logits.argmax(-1).item())
            kls.append(_kl_nats(full.last_logits, blended.last_logits))
    except UnsupportedRopeError as err:
        return _decide(
            model_id,
            settings.knobs(),
            0,
            0.0,
            float("nan"),
            float("nan"),
            settings.min_top1_agreement,
            unsupported=f"unsupported rope: {err}",
        )
    return _decide(
        model_id,
        settings.knobs(),
        len(prompts),
        agree / len(prompts),
        sum(kls) / len(kls),
        max(kls),
        settings.min_top1_agreement,
    )


def load_results(path: Path) -> dict[str, CalibrationResult]:
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    if raw.get("format") != RESULTS_FORMAT_VERSION:
        return {}  # an older layout is re-measured rather than misread
    return {model_id: CalibrationResult(**fields) for model_id, fields in raw["results"].items()}


def save_result(path: Path, result: CalibrationResult) -> None:
    """Merges `result` into the JSON file at `path` (written atomically: temp file + rename)."""
    results = load_results(path)
    results[result.model_id] = result
    payload = {
        "format": RESULTS_FORMAT_VERSION,
        "results": {k: asdict(v) for k, v in sorted(results.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, allow_nan=True)
    os.replace(tmp, path)


def gate(
    model,
    model_id: str,
    prompts: Sequence[CalibrationPrompt],
    settings: GateSettings,
    store_path: Path | None = None,
) -> CalibrationResult:
    """The start-up gate: a stored result measured with the same knobs, else a fresh measurement
    (stored when store_path is given). Logs the decision; ERROR when reuse is turned off."""
    stored = load_results(store_path).get(model_id) if store_path is not None else None
    if stored is not None and stored.knobs == settings.knobs() and stored.prompts > 0:
        result = _decide(
            model_id,
            stored.knobs,
            stored.prompts,
            stored.top1_agreement,
            stored.mean_kl_nats,
            stored.max_kl_nats,
            settings.min_top1_agreement,
        )
        source = f"stored in {store_path}"
    else:
        result = calibrate(model, model_id, prompts, settings)
        source = f"measured on {len(prompts)} prompts"
        if store_path is not None:
            save_result(store_path, result)
    if result.enabled:
        log.info(
            "KV block reuse enabled for %s (%s, %s): top-1 agreement %.3f, mean KL %.2e nats",
            model_id,
            settings.mode,
            source,
            result.top1_agreement,
            result.mean_kl_nats,
        )
    else:
        log.error(
            "KV block reuse DISABLED for %s, serving FULL PREFILL (%s, %s): %s; mean KL %.2e nats",
            model_id,
            settings.mode,
            source,
            result.reason,
            result.mean_kl_nats,
        )
    return result


def serving_mode(result: CalibrationResult, requested_mode: str) -> str:
    """The assembly mode to run: the requested one if the gate passed, else "full"."""
    return requested_mode if result.enabled else "full"
