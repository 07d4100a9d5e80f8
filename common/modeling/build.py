"""Build the workload and a small model trained on it: `python -m common.modeling.build --data-dir DIR [--quick]`.

The suite's default model is SmolLM2-135M-Instruct (common/modeling/default_model.py); `make model`
runs this module with `--workload-only`. The trained 2.7M model stays as an explicit fast option
(`make model-trained`): a decoder over it starts in seconds and steps in milliseconds, which is
what the quick end-to-end checks of a change to the decoding loop want; its figures say nothing
about a real model.

Writes
  DIR/workload/                 prompts, catalog, users, inventory (see common/workload/export.py)
  DIR/models/adaccel-llama-2.7m/  a Hugging Face checkpoint (config, weights, tokenizer) plus
                                adaccel_model.json; `--quick`: DIR/models/quick/ (a micro model)
  <results-dir>/model_trained.json  params, train_s, heldout_ppl, unigram_ppl, distinct2,
                                within_vs_across_4gram_overlap (`--quick`: model_quick.json, so
                                a quick build never overwrites the default model's figures)

Does nothing when the model dir already holds a model built from the same config hash and seed
(it only rewrites the results file if that is missing). The default build fits in 10 minutes on
2 CPU cores; `--quick` takes seconds and does not aim at the quality targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.machine import device_name
from common.modeling.loading import CARD_FILE
from common.modeling.tokenizer_training import encode_unique, find_round_trip_failures, train_bpe_tokenizer
from common.modeling.training import (
    Example,
    ModelSpec,
    TrainSettings,
    answer_nll,
    build_model,
    count_parameters,
    distinct_bigram_ratio,
    encode_example,
    greedy_generate,
    llama_config,
    train_model,
    unigram_perplexity,
)
from common.workload.assemble import Workload, build_workload
from common.workload.corpus_stats import four_gram_overlap
from common.workload.export import read_manifest, write_workload
from common.workload.prompts import Prompt
from common.workload.settings import WorkloadSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINED_MODEL_NAME = "adaccel-llama-2.7m"
# Bump when a change of code (not of settings) changes what gets built.
BUILD_FORMAT = 1


@dataclass(slots=True, frozen=True)
class EvalSettings:
    # Held-out prompts per task for perplexity, and per task for greedy generation.
    ppl_prompts_per_task: int = 40
    generation_prompts: dict = dataclasses.field(
        default_factory=lambda: {"item_knowledge": 20, "user_summary": 15, "generative_rec": 15}
    )
    # Reference answers stay under about 110 tokens; a looping model runs to the limit.
    max_new_tokens: int = 160


@dataclass(slots=True, frozen=True)
class BuildProfile:
    name: str  # model dir name under DIR/models
    results_file: str
    workload: WorkloadSettings
    model: ModelSpec
    train: TrainSettings
    eval: EvalSettings


def default_profile(seed: int = 0) -> BuildProfile:
    """The 2.7M model trained on the workload's reference texts: a fast option (`make model-trained`),
    no longer the suite's default model (that is SmolLM2-135M-Instruct, common/modeling/default_model.py)."""
    return BuildProfile(
        name=TRAINED_MODEL_NAME,
        results_file="model_trained.json",
        workload=WorkloadSettings(),
        model=ModelSpec(),
        train=TrainSettings(seed=seed),
        eval=EvalSettings(),
    )


def quick_profile(seed: int = 0) -> BuildProfile:
    return BuildProfile(
        name="quick",
        results_file="model_quick.json",
        workload=WorkloadSettings.quick(),
        model=ModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128,
                        vocab_size=1024),
        train=TrainSettings(
            steps=400, batch_tokens=2048, max_seq_len=512, learning_rate=5e-3, warmup_steps=20,
            # One thread: at this size thread sync costs more than it saves.
            time_budget_s=25.0, seed=seed, num_threads=1,
        ),
        eval=EvalSettings(
            ppl_prompts_per_task=8,
            generation_prompts={"item_knowledge": 4, "user_summary": 3, "generative_rec": 3},
            max_new_tokens=32,
        ),
    )


def config_hash(profile: BuildProfile) -> str:
    """Hash of everything that decides the built model (the seed is part of train settings)."""
    payload = {
        "format": BUILD_FORMAT,
        "workload": profile.workload.to_dict(),
        "model": dataclasses.asdict(profile.model),
        "train": dataclasses.asdict(profile.train),
        "eval": dataclasses.asdict(profile.eval),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def workload_hash(settings: WorkloadSettings) -> str:
    payload = {"format": BUILD_FORMAT, "workload": settings.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---- steps ---------------------------------------------------------------------------------


def is_up_to_date(model_dir: Path, profile: BuildProfile, digest: str) -> bool:
    card_path = model_dir / CARD_FILE
    if not card_path.is_file() or not (model_dir / "config.json").is_file():
        return False
    card = json.loads(card_path.read_text())
    return card.get("config_hash") == digest and card.get("seed") == profile.train.seed


def write_workload_if_changed(workload_dir: Path, workload: Workload, profile: BuildProfile) -> bool:
    digest = workload_hash(profile.workload)
    if read_manifest(workload_dir).get("workload_hash") == digest:
        return False
    counts: dict[str, int] = defaultdict(int)
    for prompt in workload.prompts:
        counts[f"{prompt.task}/{prompt.split}"] += 1
    manifest = {
        "workload_hash": digest,
        "profile": profile.name,
        "settings": profile.workload.to_dict(),
        "counts": dict(sorted(counts.items())),
        "warmups": len(workload.warmups),
        "items": len(workload.catalog.items),
        "users": len(workload.catalog.users),
        "inventory_events": len(workload.catalog.inventory),
    }
    write_workload(workload_dir, workload, manifest)
    return True


def corpus_texts(prompts: list[Prompt] | tuple[Prompt, ...]) -> list[str]:
    """Every block text and answer, repeats included, in order.

    Repeats matter: BPE merges by frequency, and the instruction and question blocks occur in
    every prompt. Trained on unique texts they would stay split into many short tokens.
    """
    texts = []
    for prompt in prompts:
        texts.extend(block.text for block in prompt.blocks)
        texts.append(prompt.reference)
    return texts


def overlap_by_category(workload: Workload, seed: int) -> tuple[float, float]:
    """4-gram coverage of warm references within vs across category pools (item knowledge and
    generative rec; user pools are per vertical, not per category, and left out)."""
    texts: dict[str, list[str]] = defaultdict(list)
    for prompt in workload.prompts:
        if prompt.split == "warm" and not prompt.pool_key.startswith("users/"):
            texts[prompt.pool_key].append(prompt.reference)
    within, across = four_gram_overlap(texts, np.random.default_rng([seed, 7]))
    return round(within, 4), round(across, 4)


def heldout_by_task(workload: Workload) -> dict[str, list[Prompt]]:
    grouped: dict[str, list[Prompt]] = defaultdict(list)
    for prompt in workload.prompts:
        if prompt.split == "heldout":
            grouped[prompt.task].append(prompt)
    return grouped


def evaluate(model, tokenizer, train_examples: list[Example], workload: Workload, settings: EvalSettings,
             vocab_size: int) -> tuple[dict, list[dict]]:
    """Figures for model.json, plus the greedy generations (prompt id, text, distinct2)."""
    heldout = heldout_by_task(workload)
    ppl_examples = [
        encode_example(tokenizer, [b.text for b in p.blocks], p.reference)
        for task in sorted(heldout)
        for p in heldout[task][: settings.ppl_prompts_per_task]
    ]
    nll, n_tokens = 0.0, 0
    for example in tqdm(ppl_examples, desc="held-out perplexity", leave=False):
        part_nll, part_n = answer_nll(model, [example])
        nll, n_tokens = nll + part_nll, n_tokens + part_n
    generations = []
    gen_prompts = [p for task, n in settings.generation_prompts.items() for p in heldout.get(task, [])[:n]]
    for prompt in tqdm(gen_prompts, desc="greedy generations", leave=False):
        example = encode_example(tokenizer, [b.text for b in prompt.blocks], prompt.reference)
        new_ids = greedy_generate(model, example.prompt_ids, settings.max_new_tokens)
        generations.append({
            "prompt_id": prompt.prompt_id,
            "task": prompt.task,
            "text": tokenizer.decode(new_ids),
            "new_tokens": len(new_ids),
            "distinct2": distinct_bigram_ratio(new_ids),
        })
    figures = {
        "heldout_ppl": round(float(np.exp(nll / max(n_tokens, 1))), 3),
        "unigram_ppl": round(unigram_perplexity(train_examples, ppl_examples, vocab_size), 3),
        "distinct2": round(float(np.mean([g["distinct2"] for g in generations])) if generations else 0.0, 4),
    }
    return figures, generations


def save_checkpoint(model_dir: Path, model, tokenizer, card: dict) -> None:
    """Writes into a sibling temp dir, then swaps it in: a crash never leaves half a model."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


def write_results(results_dir: Path, filename: str, results: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / filename
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


# ---- the build -----------------------------------------------------------------------------


def build_workload_only(data_dir: Path, profile: BuildProfile) -> None:
    """The workload files alone (what `make model` needs besides the default model)."""
    workload_dir = data_dir / "workload"
    if read_manifest(workload_dir).get("workload_hash") == workload_hash(profile.workload):
        print(f"{workload_dir} is up to date; nothing to do")
        return
    print(f"building workload ({profile.workload.num_items} items, {profile.workload.num_users} users)")
    write_workload_if_changed(workload_dir, build_workload(profile.workload), profile)
    print(f"wrote {workload_dir}")


def build(data_dir: Path, profile: BuildProfile, results_dir: Path, *, force: bool = False) -> dict:
    """Runs the whole build (or nothing when up to date); returns the results figures."""
    started = time.perf_counter()
    torch.set_num_threads(profile.train.num_threads)
    model_dir = data_dir / "models" / profile.name
    digest = config_hash(profile)
    if not force and is_up_to_date(model_dir, profile, digest):
        card = json.loads((model_dir / CARD_FILE).read_text())
        if not (results_dir / profile.results_file).is_file():
            write_results(results_dir, profile.results_file, card["results"])
        print(f"{model_dir} is up to date (config {digest}, seed {profile.train.seed}); nothing to do")
        return card["results"]

    log = tqdm.write
    log(f"building workload ({profile.workload.num_items} items, {profile.workload.num_users} users)")
    workload = build_workload(profile.workload)
    if write_workload_if_changed(data_dir / "workload", workload, profile):
        log(f"wrote {data_dir / 'workload'}")
    overlap = overlap_by_category(workload, profile.train.seed)
    log(f"4-gram overlap of references within vs across categories: {overlap}")

    texts = corpus_texts(workload.training_prompts)
    tokenizer = train_bpe_tokenizer(texts, profile.model.vocab_size)
    unique_texts = list(dict.fromkeys(texts + corpus_texts([p for p in workload.prompts])))
    failures = find_round_trip_failures(tokenizer, unique_texts)
    if failures:
        raise RuntimeError(f"tokenizer does not round-trip {len(failures)}+ texts, e.g. {failures[0]!r}")
    log(f"tokenizer: {len(tokenizer)} tokens, round-trips all {len(unique_texts)} distinct corpus texts")

    ids_by_text = encode_unique(tokenizer, texts)
    train_examples = [
        encode_example(tokenizer, [b.text for b in p.blocks], p.reference, ids_by_text)
        for p in workload.training_prompts
    ]
    config = llama_config(profile.model, len(tokenizer))
    model = build_model(config, profile.train.seed)
    params = count_parameters(model)
    log(f"model: {params / 1e6:.2f}M parameters, {len(train_examples)} training sequences")
    with tqdm(total=profile.train.steps, desc="training", unit="step") as bar:
        # The bar may stop short of its total when the time budget runs out first.
        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        report = train_model(model, train_examples, profile.train, on_step)
    stopped = " (time budget reached first)" if report.stopped_by_time else ""
    log(f"trained {report.steps} steps{stopped}, {report.tokens_seen} tokens in {report.train_s:.1f}s; "
        f"loss {report.first_loss:.3f} -> {report.last_loss:.3f}")

    figures, generations = evaluate(
        model, tokenizer, train_examples, workload, profile.eval, config.vocab_size
    )
    # The default profile's name already says what it is ("adaccel-llama-2.7m"); others get the size.
    stem = profile.name
    if not stem.startswith("adaccel-llama-"):
        stem = f"adaccel-llama-{params / 1e6:.1f}m-{profile.name}"
    model_id = f"{stem}-s{profile.train.seed}"
    results = {
        "model": model_id,
        "device": device_name(),
        "params": params,
        "train_s": round(report.train_s, 1),
        **figures,
        "within_vs_across_4gram_overlap": list(overlap),
    }
    card = {
        "model_id": model_id,
        "random_weights": False,
        "arch": "llama",
        "config_hash": digest,
        "seed": profile.train.seed,
        "profile": profile.name,
        "workload_hash": workload_hash(profile.workload),
        "model_spec": dataclasses.asdict(profile.model),
        "train_settings": dataclasses.asdict(profile.train),
        "train_steps": report.steps,
        "stopped_by_time": report.stopped_by_time,
        "train_tokens": report.tokens_seen,
        "loss": [round(report.first_loss, 4), round(report.last_loss, 4)],
        "build_s": round(time.perf_counter() - started, 1),
        "results": results,
        "sample_generations": generations[:: max(len(generations) // 6, 1)],
    }
    save_checkpoint(model_dir, model, tokenizer, card)
    path = write_results(results_dir, profile.results_file, results)
    log(f"wrote {model_dir} and {path} in {card['build_s']:.0f}s: {json.dumps(results)}")
    return results


def _reexec_with_passive_openmp() -> None:
    """Restarts this CLI with OMP_WAIT_POLICY=PASSIVE unless the caller set a policy.

    torch's OpenMP threads spin while waiting by default. On a CPU shared with other busy
    processes a spinning thread steals the core its partner needs: a training step measured
    14x slower with 2 threads than with 1 (0.07 s vs 2.4 s for the quick model, 0.44 s vs 6.2 s
    for the default one); with PASSIVE, 2 threads were as fast as 1 or faster. The policy is read
    once when torch loads its OpenMP runtime, hence a fresh process rather than a setting.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    os.execve(sys.executable, [sys.executable, "-m", "common.modeling.build", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the workload and the default model.")
    parser.add_argument("--data-dir", type=Path, required=True, help="writes workload/ and models/ here")
    parser.add_argument("--quick", action="store_true", help="micro model in seconds (for end-to-end tests)")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order seed")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--workload-only", action="store_true", help="write the workload files, train nothing")
    args = parser.parse_args(argv)
    profile = quick_profile(args.seed) if args.quick else default_profile(args.seed)
    if args.workload_only:
        build_workload_only(args.data_dir, profile)
        return 0
    build(args.data_dir, profile, args.results_dir, force=args.force)
    return 0


if __name__ == "__main__":
    _reexec_with_passive_openmp()
    sys.exit(main())
