"""The build CLI on a micro profile: files, card, results, loadability, and the up-to-date skip."""

from __future__ import annotations

import dataclasses
import json

from common.modeling import build as build_module
from common.modeling.build import (
    CARD_FILE,
    BuildProfile,
    EvalSettings,
    build,
    config_hash,
    default_profile,
    quick_profile,
)
from common.modeling.loading import load_model
from common.modeling.training import ModelSpec, TrainSettings
from common.workload.export import MANIFEST_FILE, PROMPTS_FILE, load_prompts
from common.workload.settings import WorkloadSettings


def micro_profile(seed: int = 0) -> BuildProfile:
    return BuildProfile(
        name="micro",
        results_file="model_micro.json",
        workload=WorkloadSettings(
            num_items=120, num_users=30, inventory_events=5, item_knowledge_warm=20, item_knowledge_heldout=3,
            user_summary_warm=8, user_summary_heldout=2, generative_rec_warm=2, generative_rec_heldout=2,
            rec_candidates=(3, 4), train_rec_prompts=4, train_rec_candidates=(2, 3)),
        model=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                        vocab_size=400),
        train=TrainSettings(steps=2, batch_tokens=1024, max_seq_len=512, warmup_steps=1, seed=seed),
        eval=EvalSettings(
            ppl_prompts_per_task=2,
            generation_prompts={"item_knowledge": 1, "generative_rec": 1},
            max_new_tokens=4,
        ),
    )


def test_config_hash_depends_on_settings_and_seed():
    assert config_hash(default_profile(0)) == config_hash(default_profile(0))
    assert config_hash(default_profile(0)) != config_hash(default_profile(1))
    assert config_hash(default_profile(0)) != config_hash(quick_profile(0))


def test_default_profile_model_accepts_4k_prompts():
    assert default_profile().model.max_position_embeddings >= 4096
    assert default_profile().workload == WorkloadSettings()


def test_build_writes_model_workload_and_results_then_skips(tmp_path, monkeypatch):
    data_dir, results_dir = tmp_path / "data", tmp_path / "results"
    results = build(data_dir, micro_profile(), results_dir)

    model_dir = data_dir / "models" / "micro"
    card = json.loads((model_dir / CARD_FILE).read_text())
    assert card["random_weights"] is False and card["seed"] == 0
    assert card["config_hash"] == config_hash(micro_profile())
    written = json.loads((results_dir / "model_micro.json").read_text())
    assert written == results
    assert set(written) == {"model", "device", "params", "train_s", "heldout_ppl", "unigram_ppl", "distinct2",
                            "within_vs_across_4gram_overlap"}
    # A figure names what it was measured on.
    assert written["model"] == card["model_id"] and written["device"].startswith(("cpu: ", "cuda: "))
    assert len(written["within_vs_across_4gram_overlap"]) == 2

    loaded = load_model(model_dir)
    assert loaded.random_weights is False and loaded.model_id == card["model_id"]
    assert loaded.model.config.max_position_embeddings >= 4096

    prompts, warmups = load_prompts(data_dir / "workload" / PROMPTS_FILE)
    assert prompts and warmups
    assert (data_dir / "workload" / MANIFEST_FILE).is_file()

    # Second run: same config and seed -> no work at all (training would raise here).
    (results_dir / "model_micro.json").unlink()
    monkeypatch.setattr(build_module, "train_model", _must_not_run)
    monkeypatch.setattr(build_module, "build_workload", _must_not_run)
    assert build(data_dir, micro_profile(), results_dir) == results
    assert json.loads((results_dir / "model_micro.json").read_text()) == results


def test_another_seed_rebuilds(tmp_path):
    data_dir = tmp_path / "data"
    build(data_dir, micro_profile(0), tmp_path / "r")
    build(data_dir, micro_profile(1), tmp_path / "r")
    assert json.loads((data_dir / "models" / "micro" / CARD_FILE).read_text())["seed"] == 1


def test_quick_profile_is_small():
    profile = quick_profile()
    assert profile.name == "quick" and profile.results_file != default_profile().results_file
    assert dataclasses.asdict(profile.model)["hidden_size"] <= 128


def _must_not_run(*args, **kwargs):
    raise AssertionError("an up-to-date build did work")
