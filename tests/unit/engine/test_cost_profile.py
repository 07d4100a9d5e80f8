"""Step cost profiling on a real (tiny) model: probes, fit, stored profile reused per model and device."""

from __future__ import annotations

import pytest

from common.modeling.loading import load_model
from common.modeling.tiny import build_tiny_model
from services.decoder import cost_profile
from services.decoder.cost_profile import (
    device_string,
    load_or_profile,
    profile_path,
    profile_step_costs,
    startup_cost_model,
)
from services.decoder.settings import DecoderSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = dict(widths=(1, 4, 9), batches=(1, 3), cache_lengths=(8, 40), repeats=1)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", seed=0)[0]


def test_profile_covers_the_grid_and_leaves_no_state(model) -> None:
    timings = profile_step_costs(model, **GRID)
    assert {(t.width, t.batch, t.cache_length) for t in timings} == {
        (w, b, c) for w in GRID["widths"] for b in GRID["batches"] for c in GRID["cache_lengths"]
    }
    assert all(t.seconds > 0 for t in timings)


def test_time_limit_keeps_what_was_measured(model) -> None:
    cut = profile_step_costs(model, **GRID, max_seconds=0.0)
    # one round of every width of the first (batch, cache length), then it stops
    assert [(t.width, t.batch, t.cache_length) for t in cut] == [(w, 1, 8) for w in GRID["widths"]]


def test_a_width_disturbed_in_every_round_is_measured_again(model, monkeypatch) -> None:
    """A stall during every round of width 1 (simulated: one second added to those probes'
    measured time; the forward itself runs) would make a one-token step look dearer than nine
    tokens; the profile probes it again and keeps the undisturbed figure."""
    real_probe = cost_profile._probe
    stalled = {"left": 2}  # the warm-up round and the one measured round (repeats=1)

    def probe(forward, dtype, cache, key_valid, width, *args):
        seconds = real_probe(forward, dtype, cache, key_valid, width, *args)
        if width == 1 and stalled["left"]:
            stalled["left"] -= 1
            return seconds + 1.0
        return seconds

    monkeypatch.setattr(cost_profile, "_probe", probe)
    timings = profile_step_costs(model, widths=(1, 4, 9), batches=(1,), cache_lengths=(8,), repeats=1)
    by_width = {t.width: t.seconds for t in timings}
    assert stalled["left"] == 0 and by_width[1] < 0.5


def test_stored_profile_is_reused_only_for_the_same_model_and_device(model, tmp_path) -> None:
    path = profile_path(tmp_path, "tiny/llama v1")
    assert path.parent == tmp_path / "decoder" and "/" not in path.name.removeprefix("cost_profile-")
    first = load_or_profile(model, "tiny/llama v1", path, **GRID)
    assert path.exists() and first.device == device_string(model) and first.meta["points"] == 12
    stored = path.read_text()
    again = load_or_profile(model, "tiny/llama v1", path, **GRID)
    assert again == first and path.read_text() == stored  # reused, not measured again
    other = load_or_profile(model, "tiny/llama v2", path, **GRID)
    assert other.model_id == "tiny/llama v2" and path.read_text() != stored
    path.write_text("{not json")
    assert load_or_profile(model, "tiny/llama v2", path, **GRID).model_id == "tiny/llama v2"  # unreadable: redone
    assert first.predict(9, 3, 40) > 0


def test_decoder_start_up_uses_the_stored_profile_or_a_short_one(tiny_llama_path, tmp_path) -> None:
    loaded = load_model(tiny_llama_path)
    off = DecoderSettings(data_dir=tmp_path, adaptive_drafting=True, cost_profile_s=0)
    assert startup_cost_model(off, loaded).meta["source"] == "linear"  # nothing stored, profiling off
    short = DecoderSettings(data_dir=tmp_path, adaptive_drafting=True, cost_profile_s=0.5, max_batch_size=2)
    measured = startup_cost_model(short, loaded)
    assert measured.model_id == loaded.model_id and measured.batches[0] == 1 and max(measured.batches) <= 2
    assert profile_path(tmp_path, loaded.model_id).exists()
    assert startup_cost_model(off, loaded) == measured  # stored: reused even with profiling off


def test_a_profile_that_cannot_be_measured_falls_back_to_the_conservative_curve_loudly(
        tiny_llama_path, tmp_path, monkeypatch, caplog) -> None:
    from services.decoder import cost_profile

    loaded = load_model(tiny_llama_path)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(cost_profile, "load_or_profile", broken)
    settings = DecoderSettings(data_dir=tmp_path, adaptive_drafting=True, cost_profile_s=0.5)
    with caplog.at_level("WARNING", logger=cost_profile.__name__):
        fallback = startup_cost_model(settings, loaded)
    assert fallback == cost_profile.conservative_cost_model()
    assert "could not be measured" in caplog.text and "out of memory" in caplog.records[-1].error
    # 16 draft tokens cost 2.5 one-token steps: a tree must be likely accepted to pay.
    assert 2.4 < fallback.predict(17, 1, 512) / fallback.predict(1, 1, 512) < 2.7
