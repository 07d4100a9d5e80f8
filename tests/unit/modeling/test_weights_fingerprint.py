"""The weights fingerprint that keys block KV: stable for one checkpoint, different for another
checkpoint that carries the same model_id (a fine-tune saved under the old name)."""

from __future__ import annotations

import json

from common.modeling.loading import load_model
from common.modeling.tiny import save_tiny_model


def test_one_checkpoint_has_one_fingerprint_and_a_same_named_other_one_another(tmp_path):
    first = save_tiny_model(tmp_path / "a", "llama", seed=0)
    renamed = save_tiny_model(tmp_path / "b", "llama", seed=1)
    card = json.loads((renamed / "adaccel_model.json").read_text())
    card["model_id"] = "tiny-random-llama-s0"
    (renamed / "adaccel_model.json").write_text(json.dumps(card))

    a, a_again, b = load_model(first), load_model(first), load_model(renamed)
    assert a.model_id == b.model_id == "tiny-random-llama-s0"
    assert len(a.weights_fingerprint) == 16
    assert a.weights_fingerprint == a_again.weights_fingerprint
    assert a.weights_fingerprint != b.weights_fingerprint
    assert a.blocks_model_id == f"tiny-random-llama-s0@{a.weights_fingerprint}"
    assert a.blocks_model_id != b.blocks_model_id
