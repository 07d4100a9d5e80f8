"""Measures what one verification step costs on this model and device, and fits the cost model.

Each probe is what the engine does per step minus drafting: build tree inputs for B rows of
width W over a cache of L tokens, one forward pass, strict verification of every row, and
cropping the cache back (the KV bookkeeping). The probes cover widths 1..max, batch sizes
1..max and cache lengths from short to long (64, 512, 2,048: with only 64 and 512, the fit
overstated a step over a 2,500-token cache by up to 74% on the default CPU model); the median of a few repeats per point goes into the fit
(common/drafting/cost_model.py). Kept as JSON under the decoder's data dir with the model id
and device, and reused while both match (a profile takes seconds; a restart should not).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import DynamicCache

from common.drafting.cost_model import StepCostModel, StepTiming, inverted_widths, linear_cost_model
from common.drafting.draft_tree import chain_tree
from common.drafting.verification import verify_strict
from services.decoder.engine.config import DEFAULT_KV_SPARE_COLUMNS
from services.decoder.engine.lean_forward import LeanForward
from services.decoder.engine.spare_capacity import with_spare_capacity
from services.decoder.engine.tree_inputs import build_tree_inputs

log = logging.getLogger(__name__)

# Bumped whenever a step's cost changes shape, so a stored profile of the older path is
# measured again: 2 = grouped-query tree attention without repeat_kv and KV appended in place
# (lean_forward.py, spare_capacity.py); the older path priced tree steps and long caches dearer.
STEP_PATH_REVISION = 2
QUICK_WIDTHS = (1, 2, 4, 8, 16, 32, 65)
QUICK_BATCHES = (1, 4, 16)
QUICK_CACHE_LENGTHS = (64, 512, 2048)  # ads prompts run from ~100 to ~2,500 tokens: attention must be seen at both ends
RECHECK_ROUNDS = 2  # extra probes of a width measured dearer than a wider one (inverted_widths)


def device_string(model: torch.nn.Module) -> str:
    """Where and how steps run: the device, the dtype unless float32 (a bfloat16 step costs what
    it costs), and "+lean" when tree steps take the lean forward (a profile of the plain forward
    would overstate their cost), with the revision of the step path (STEP_PATH_REVISION)."""
    parameter = next(model.parameters())
    device = parameter.device
    forward = f"+lean{STEP_PATH_REVISION}" if LeanForward.for_model(model) is not None else ""
    dtype = "" if parameter.dtype == torch.float32 else f":{str(parameter.dtype).removeprefix('torch.')}"
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}{dtype}{forward}"
    return f"cpu:{torch.get_num_threads()}t{dtype}{forward}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def profile_step_costs(
    model: torch.nn.Module,
    *,
    widths: Sequence[int] = QUICK_WIDTHS,
    batches: Sequence[int] = QUICK_BATCHES,
    cache_lengths: Sequence[int] = QUICK_CACHE_LENGTHS,
    repeats: int = 4,
    max_seconds: float | None = None,
    seed: int = 0,
) -> list[StepTiming]:
    """Step time per (width, batch, cache length), the minimum over `repeats` interleaved
    rounds (a width still dearer than a wider one is probed again, up to RECHECK_ROUNDS times);
    stops early past `max_seconds`, keeping what it has (at least one round of every width of
    the configurations reached). Larger batches come last, so a cut keeps the common
    ones (the cost model extrapolates the rest)."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(seed)
    forward = _step_forward(model)
    started = time.perf_counter()
    timings: list[StepTiming] = []
    remeasured = 0
    max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    for batch in sorted(batches):
        for cache_length in sorted(cache_lengths):
            if cache_length + max(widths) > max_positions:
                continue
            # the engine's own cache layers, so that a step is priced with in-place KV appends
            cache = with_spare_capacity(DynamicCache(config=model.config), DEFAULT_KV_SPARE_COLUMNS)
            prefix = torch.randint(0, vocab, (batch, cache_length), generator=generator).to(device)
            model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
            key_valid = torch.ones((batch, cache_length), dtype=torch.bool, device=device)
            samples: dict[int, list[float]] = {width: [] for width in widths}
            # Widths interleaved, in a rotated order each round, so that a drift of the machine's
            # speed hits all of them alike; the first round only warms up (allocations, kernels).
            for round_ in range(repeats + 1):
                order = list(widths[round_ % len(widths):]) + list(widths[:round_ % len(widths)])
                for width in order:
                    seconds = _probe(forward, model.dtype, cache, key_valid, width, batch, cache_length, vocab,
                                     generator, device)
                    if round_:
                        samples[width].append(seconds)
                if max_seconds is not None and time.perf_counter() - started > max_seconds and round_:
                    break
            # A width dearer than a wider one was disturbed in every round (a stall, another
            # process): measure it again while this cache is at hand; the minimum keeps the
            # undisturbed figure. A disturbed profile misprices drafting until the online
            # correction (cost_correction.py) catches up.
            for _ in range(RECHECK_ROUNDS):
                inverted = inverted_widths({w: min(s) for w, s in samples.items() if s})
                if not inverted or (max_seconds is not None and time.perf_counter() - started > max_seconds):
                    break
                remeasured += len(inverted)
                for width in inverted:
                    samples[width].append(_probe(forward, model.dtype, cache, key_valid, width, batch, cache_length,
                                                 vocab, generator, device))
            # The minimum: the step's own cost, without other processes' interference.
            timings.extend(StepTiming(w, batch, cache_length, min(samples[w])) for w in widths)
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                log.info("cost profile cut at its time limit", extra={"timings": len(timings), "remeasured": remeasured})
                return timings
    if remeasured:
        log.info("cost profile: points dearer than wider ones measured again", extra={"remeasured": remeasured})
    return timings


def _step_forward(model: torch.nn.Module):
    """The forward the engine's tree steps take (lean when the model allows it)."""
    lean = LeanForward.for_model(model)
    if lean is not None:
        return lean

    def plain(input_ids, position_ids, attention_mask, cache):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True).logits

    return plain


def _probe(forward, dtype, cache, key_valid, width, batch, cache_length, vocab, generator, device) -> float:
    tokens = torch.randint(0, vocab, (width,), generator=generator).tolist()
    trees = [chain_tree(tokens)] * batch
    _sync(device)
    t0 = time.perf_counter()
    inputs = build_tree_inputs(trees, [cache_length] * batch, key_valid, dtype=dtype)
    logits = forward(inputs.input_ids, inputs.position_ids, inputs.attention_mask, cache)
    for row in range(batch):
        verify_strict(logits[row], trees[row])
    cache.crop(-width)  # transformers 5.x: a negative count removes that many columns
    _sync(device)
    return time.perf_counter() - t0


def profile_cost_model(model: torch.nn.Module, model_id: str, **kwargs) -> StepCostModel:
    started = time.perf_counter()
    timings = profile_step_costs(model, **kwargs)
    fitted = StepCostModel.fit(timings, model_id=model_id, device=device_string(model),
                               meta={"profiled_s": time.perf_counter() - started, "points": len(timings),
                                     "timings": [[t.width, t.batch, t.cache_length, t.seconds] for t in timings]})
    return fitted


def load_or_profile(model: torch.nn.Module, model_id: str, path: Path | None, *, refresh: bool = False,
                    **kwargs) -> StepCostModel:
    """The stored profile at `path` when it was made for this model id and device; else a new
    one (stored at `path` when given)."""
    device = device_string(model)
    if path is not None and path.exists() and not refresh:
        try:
            stored = StepCostModel.from_json(path.read_text())
            if stored.matches(model_id, device):
                return stored
            log.info("stored cost profile is for another model or device; profiling again",
                     extra={"stored_model": stored.model_id, "stored_device": stored.device})
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("unreadable cost profile; profiling again", extra={"path": str(path), "error": repr(exc)})
    fitted = profile_cost_model(model, model_id, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(fitted.to_json())
        tmp.replace(path)
    return fitted


def profile_path(data_dir: Path, model_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id) or "model"
    return data_dir / "decoder" / f"cost_profile-{safe}.json"


def builtin_cost_model() -> StepCostModel:
    """When profiling is off and nothing is stored: the shape measured on CPU for small models
    (about 2.5-3 ms fixed per forward, 0.1 ms per extra token); a rough prior, not a measurement."""
    return linear_cost_model(2.8e-3, 1e-4, max_width=65)


def conservative_cost_model() -> StepCostModel:
    """When a profile cannot be measured: each extra token costs 10% of a one-token step, the
    steepest curve measured here (SmolLM2-135M on a 2-core CPU: 16 tokens ~2.7x one), so drafting
    pays only where drafts are likely accepted; on a GPU (a flat curve) it leaves speed unused but
    never makes a request slower."""
    return linear_cost_model(1.0, 0.1, max_width=65)


def startup_cost_model(settings, loaded) -> StepCostModel:
    """The decoder's cost model at start-up: the stored profile for this model and device, else
    a profile of at most settings.cost_profile_s seconds (stored for the next start), else
    (cost_profile_s = 0) the built-in estimate."""
    path = profile_path(settings.data_dir, loaded.model_id)
    if settings.cost_profile_s <= 0:
        try:
            stored = StepCostModel.from_json(path.read_text())
            if stored.matches(loaded.model_id, device_string(loaded.model)):
                return stored
        except (OSError, ValueError, TypeError, KeyError):
            pass
        log.info("step-cost profiling off and no stored profile: using the built-in estimate")
        return builtin_cost_model()
    try:
        fitted = load_or_profile(loaded.model, loaded.model_id, path, max_seconds=settings.cost_profile_s,
                                 batches=tuple(b for b in (1, 2, 4, 8, 16) if b <= max(1, settings.max_batch_size)))
    except Exception as exc:  # noqa: BLE001 - out of memory, a forward that fails, an unwritable data dir ...
        log.warning("step-cost profile could not be measured: adaptive drafting uses the conservative "
                    "built-in curve (each draft token 10%% of a step), so it drafts only confident trees",
                    extra={"error": repr(exc), "path": str(path)})
        return conservative_cost_model()
    log.info("step-cost model ready", extra={"path": str(path), "device": fitted.device,
                                             "profiled_s": fitted.meta.get("profiled_s")})
    return fitted


def main(argv: list[str] | None = None) -> None:
    """On demand: python -m services.decoder.cost_profile [--model-path P] [--data-dir D] [--seconds S]
    profiles again and stores the result where the decoder looks for it at start-up."""
    import argparse

    from common.modeling.dtypes import DTYPE_CHOICES, serving_dtype
    from common.modeling.loading import load_model

    parser = argparse.ArgumentParser(prog="python -m services.decoder.cost_profile", description=main.__doc__)
    parser.add_argument("--model-path", type=Path, default=Path("data/models/smollm2-135m-instruct"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=30.0, help="profiling time limit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model_path, device=args.device, dtype=serving_dtype(args.dtype, args.device))
    path = profile_path(args.data_dir, loaded.model_id)
    fitted = load_or_profile(loaded.model, loaded.model_id, path, refresh=True, max_seconds=args.seconds)
    print(f"{path}: {fitted.meta['points']} probes in {fitted.meta['profiled_s']:.1f} s on {fitted.device}")
    for width in (1, 2, 4, 8, 16, 32, 64):
        print(f"  width {width:3d}: " + ", ".join(
            f"batch {b}: {fitted.predict(width, b, 256) * 1e3:.2f} ms" for b in (1, 4, 16)))


if __name__ == "__main__":
    main()
