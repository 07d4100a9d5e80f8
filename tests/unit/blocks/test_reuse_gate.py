"""The decoder's start-up gate over its result file: measures once, then decides from the file."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from common.blocks.calibration import CalibrationPrompt, GateSettings
from services.decoder.reuse_setup import gate, read_gate_results
from tests.unit.blocks.conftest import build


def sample_prompts(n: int) -> list[CalibrationPrompt]:
    g = torch.Generator().manual_seed(7)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 250, (k,), generator=g).tolist())

    return [CalibrationPrompt(blocks=(ids(6), ids(10)), tail=ids(4)) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return build("llama", layers=2)


def sampler(n: int, calls: list[int]):
    def sample():
        calls.append(n)
        return sample_prompts(n), "test prompts"

    return sample


def test_gate_measures_once_then_decides_from_the_file_by_model_and_knobs(model, tmp_path, caplog):
    store = tmp_path / "calibration" / "gate.json"
    settings = GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=0.0)
    calls: list[int] = []
    first = gate(model, "tiny-a", settings, store, sampler(2, calls))
    assert calls == [2] and set(json.loads(store.read_text())["results"]) == {"tiny-a"}
    assert gate(model, "tiny-a", settings, store, sampler(2, calls)) == first and calls == [2]
    with caplog.at_level(logging.INFO, logger="common.blocks.calibration"):
        stricter = gate(model, "tiny-a", GateSettings(mode="epic", epic_tokens=4, min_top1_agreement=1.01),
                        store, sampler(2, calls))
    assert calls == [2] and not stricter.enabled  # threshold re-applied to the stored agreement
    assert any(r.levelno == logging.ERROR and "stored in" in r.getMessage() for r in caplog.records)
    gate(model, "tiny-a", GateSettings(mode="epic", epic_tokens=8), store, sampler(1, calls))  # other knobs
    gate(model, "tiny-b", settings, store, sampler(1, calls))
    assert calls == [2, 1, 1]
    assert set(read_gate_results(store)) == {"tiny-a", "tiny-b"}
    assert not list(store.parent.glob("*.tmp"))  # written through a temp file, renamed


def test_no_file_is_no_results(tmp_path):
    assert read_gate_results(tmp_path / "absent.json") == {}
