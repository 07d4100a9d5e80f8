"""Builds the decoder's block cache from its settings: kv-store shards, placement, accuracy gate.

The gate (common/blocks/calibration.py) runs once per model id and knobs, and its result is stored
under the data dir (this module reads and writes that JSON file; the core only encodes it); the
calibration sample is the workload's generative-rec prompts when the workload is on disk
(<data_dir>/workload/prompts.jsonl), else seeded random-token prompts (which still catch a model
whose re-rotation is wrong, but say less about accuracy on real prompts).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from common.blocks.calibration import (
    CalibrationPrompt,
    CalibrationResult,
    GateSettings,
    calibrate,
    decode_results,
    encode_results,
    log_decision,
    serving_mode,
    stored_decision,
)
from common.blocks.item_embedding import item_embedder
from common.blocks.kv_codec import cache_model_key
from common.blocks.placement import Placement
from common.modeling.dtypes import serving_dtype
from common.modeling.loading import LoadedModel
from common.prompt_tokens import tokenize_chat
from common.rpc.channels import open_channel
from kernels.backend import resolve_backend
from services.decoder.anchors import placement_buckets
from services.decoder.block_cache import BlockCache, KvStoreClient, LocalBlockMemory, ReuseSettings
from services.decoder.settings import DecoderSettings

log = logging.getLogger(__name__)

MiB = 1 << 20


def workload_calibration_prompts(tokenizer, path: Path, count: int, max_tokens: int) -> list[CalibrationPrompt]:
    """The first `count` generative-rec prompts of the workload file that fit `max_tokens`."""
    from common.workload.export import load_prompts

    prompts, _ = load_prompts(path)
    out = []
    for prompt in prompts:
        if prompt.task != "generative_rec":
            continue
        tokenized = tokenize_chat(tokenizer, [b.text for b in prompt.blocks], prompt.system_blocks)
        if len(tokenized.token_ids) > max_tokens:
            continue
        ids = tokenized.token_ids
        blocks = tuple(tuple(ids[s:e]) for s, e in tokenized.spans[:-1])
        start, _ = tokenized.spans[-1]
        out.append(CalibrationPrompt(blocks=blocks, tail=tuple(ids[start:])))
        if len(out) == count:
            break
    return out


def random_calibration_prompts(vocab_size: int, count: int, seed: int = 0) -> list[CalibrationPrompt]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sizes = torch.randint(16, 48, (6,), generator=g).tolist()
        blocks = tuple(tuple(torch.randint(3, vocab_size, (n,), generator=g).tolist()) for n in sizes)
        out.append(CalibrationPrompt(blocks=blocks, tail=tuple(torch.randint(3, vocab_size, (8,), generator=g).tolist())))
    return out


def read_gate_results(path: Path) -> dict[str, CalibrationResult]:
    """Gate results stored at `path` by model key (none when the file is absent or of an older format)."""
    return decode_results(path.read_text()) if path.exists() else {}


def save_gate_result(path: Path, result: CalibrationResult) -> None:
    """Merges `result` into the JSON file at `path` (written atomically: temp file + rename)."""
    results = read_gate_results(path)
    results[result.model_id] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(encode_results(results))
    os.replace(tmp, path)


def gate(model, model_key: str, settings: GateSettings, store: Path,
         sample: Callable[[], tuple[Sequence[CalibrationPrompt], str]]) -> CalibrationResult:
    """The start-up gate: the result stored in `store` for this model key and knobs (threshold
    re-applied), else a fresh measurement on `sample()` -> (prompts, what they are), which is then
    stored. Logs the decision; ERROR when reuse is turned off."""
    result = stored_decision(read_gate_results(store).get(model_key), settings)
    if result is not None:
        source = f"stored in {store}"
    else:
        prompts, what = sample()
        log.info("calibrating block reuse on %d %s", len(prompts), what)
        result = calibrate(model, model_key, prompts, settings)
        save_gate_result(store, result)
        source = f"measured on {len(prompts)} {what}, {result.positions} positions"
    log_decision(result, settings, source)
    return result


def gated_mode(settings: DecoderSettings, loaded: LoadedModel, model_key: str, *, progress: bool = False) -> str:
    """The mode to serve: the configured one if the accuracy gate passes (or is off), else full."""
    mode = settings.reuse_mode
    if mode == "full" or settings.reuse_gate_prompts == 0:
        return mode
    gate_settings = GateSettings(mode=mode, recompute_ratio=settings.recompute_ratio,
                                 check_layer=settings.check_layer, epic_tokens=settings.epic_tokens,
                                 continuation_tokens=settings.reuse_gate_continuation_tokens,
                                 min_top1_agreement=settings.reuse_gate_min_top1)
    store = settings.reuse_gate_store or settings.data_dir / "calibration" / "block_reuse.json"
    workload = settings.data_dir / "workload" / "prompts.jsonl"

    def sample() -> tuple[Sequence[CalibrationPrompt], str]:
        prompts: Sequence[CalibrationPrompt] = []
        if workload.is_file() and not loaded.random_weights:
            prompts = workload_calibration_prompts(loaded.tokenizer, workload, settings.reuse_gate_prompts,
                                                   min(settings.reuse_gate_max_tokens, settings.max_prompt_tokens))
            what = f"workload prompts ({workload})"
        if not prompts:
            prompts = random_calibration_prompts(loaded.model.config.vocab_size, settings.reuse_gate_prompts)
            what = "random-token prompts"
        if progress:
            from tqdm import tqdm

            prompts = tqdm(prompts, desc="block-reuse accuracy gate", unit="prompt")
        return prompts, what

    return serving_mode(gate(loaded.model, model_key, gate_settings, store, sample), mode)


def create_block_cache(settings: DecoderSettings, loaded: LoadedModel, *, tracer_provider=None,
                       security=None) -> tuple[BlockCache | None, list]:
    """The block cache (None when reuse is off) and what to close on stop."""
    if not settings.block_reuse:
        return None, []
    reuse = ReuseSettings(mode=settings.reuse_mode, recompute_ratio=settings.recompute_ratio,
                          check_layer=settings.check_layer, epic_tokens=settings.epic_tokens,
                          min_block_tokens=settings.min_block_tokens,
                          kernel_backend=resolve_backend(settings.kernel_backend, settings.device),
                          prefix_caching=settings.prefix_caching)
    memory = LocalBlockMemory(int(settings.block_memory_mb * MiB), int(settings.replicated_memory_mb * MiB))
    store = None
    closers: list = []
    if settings.kvstore_addrs:
        channels = {addr: open_channel(addr, tracer_provider=tracer_provider,
                                       max_message_bytes=settings.max_message_bytes, security=security)
                    for addr in settings.kvstore_addrs}
        closers.extend(ch.close for ch in channels.values())
        embed = None
        buckets = None
        if len(channels) > 1:
            embed = item_embedder(settings.placement_embedder)
            buckets, anchors = placement_buckets(settings, embed.name, embed.dim)
            log.info("item blocks placed over %d kv-store shards by %s embeddings, %s",
                     len(channels), embed.name, anchors)
        store = KvStoreClient(Placement(list(channels), buckets), channels, timeout_s=settings.kvstore_timeout_s,
                              down_backoff_s=settings.kvstore_backoff_s, embed=embed)
    cache = BlockCache(loaded.model, loaded.tokenizer, loaded.blocks_model_id, reuse, memory, store,
                       publish_queue=settings.publish_queue, chunk_bytes=settings.kvstore_chunk_bytes)
    cache.mode = gated_mode(settings, loaded, cache.model_key)
    closers.insert(0, cache.close)
    return cache, closers


def main(argv: list[str] | None = None) -> None:
    """Runs the block-reuse accuracy gate for a model with the decoder's default settings and
    stores its result (`make model` runs it), so a decoder starts without calibrating."""
    import argparse

    from common.modeling.default_model import default_model_path
    from common.modeling.loading import load_model

    parser = argparse.ArgumentParser(prog="python -m services.decoder.reuse_setup", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--model-path", type=Path, default=None, help="default: <data-dir>/models/smollm2-135m-instruct")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_path = args.model_path or default_model_path(args.data_dir)
    settings = DecoderSettings(data_dir=args.data_dir, model_path=model_path)
    loaded = load_model(model_path, device=settings.device, dtype=serving_dtype(settings.dtype, settings.device))
    mode = gated_mode(settings, loaded, cache_model_key(loaded.blocks_model_id, loaded.model.dtype), progress=True)
    print(f"block reuse for {loaded.blocks_model_id}: serving mode {mode!r} (configured {settings.reuse_mode!r})")


if __name__ == "__main__":
    main()
