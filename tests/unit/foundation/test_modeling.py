import json

import pytest

from common.modeling.loading import ModelLoadError, load_model
from common.modeling.tiny import build_tiny_model, byte_tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_load_from_disk_with_matching_tokenizer(arch, tiny_llama_path, tiny_qwen2_path):
    loaded = load_model(tiny_llama_path if arch == "llama" else tiny_qwen2_path)
    assert loaded.random_weights
    ids = loaded.tokenizer("Wireless earbuds — €49", add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer.decode(ids) == "Wireless earbuds — €49"
    assert max(ids) < loaded.model.config.vocab_size


def test_tiny_models_are_deterministic():
    a, _ = build_tiny_model("llama", seed=3)
    b, _ = build_tiny_model("llama", seed=3)
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_non_causal_lm_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="not a causal LM|cannot load"):
        load_model(tmp_path)


def test_tokenizer_larger_than_vocab_is_a_clear_error(tmp_path, tiny_llama_path):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(tiny_llama_path, target)
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([f"<extra{i}>" for i in range(100)])  # 359 ids for a 320-row embedding
    tokenizer.save_pretrained(target)
    with pytest.raises(ModelLoadError, match="tokenizer has 359 tokens"):
        load_model(target)


def test_weights_that_do_not_match_the_config_are_a_clear_error(tmp_path, tiny_llama_path):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(tiny_llama_path, target)
    config = json.loads((target / "config.json").read_text())
    config["vocab_size"] = 100
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(target)
