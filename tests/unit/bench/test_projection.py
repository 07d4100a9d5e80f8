"""bench-projection: cost curve of a random-weight model x measured acceptance, labelled a projection."""

from __future__ import annotations

import json

import pytest

from bench import projection

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_projection_combines_the_cost_curve_with_measured_acceptance(tmp_path):
    decode_json = tmp_path / "decode.json"
    decode_json.write_text(json.dumps({"model": "m", "budget_sweep": {"settings": [
        {"decoding_length": 4, "branch_length": 4, "mean_accepted_per_step": 2.0},
        {"decoding_length": 8, "branch_length": 4, "mean_accepted_per_step": 3.0},
    ]}}))
    args = projection.parse_args(["--config", "tiny", "--repeats", "1", "--decode-json", str(decode_json),
                                  "--results-dir", str(tmp_path)])
    report = projection.run(args)
    assert report["kind"].startswith("PROJECTION")
    costs = {int(w): ms for w, ms in report["cost_ms_by_width"].items()}
    assert sorted(costs) == [1, 5, 9]
    for row in report["budgets"]:
        width = 1 + row["decoding_length"]
        expected = row["tokens_per_step"] * costs[1] / costs[width]
        assert row["projected_decode_speedup"] == pytest.approx(expected)
    stored = json.loads((tmp_path / "projection.json").read_text())
    assert stored["best"] == max(stored["budgets"], key=lambda r: r["projected_decode_speedup"])
    assert (tmp_path / "projection.png").exists()


def test_projection_needs_a_budget_sweep(tmp_path):
    decode_json = tmp_path / "decode.json"
    decode_json.write_text(json.dumps({"model": "m", "budget_sweep": {}}))
    with pytest.raises(SystemExit, match="no budget sweep"):
        projection.measured_acceptance(decode_json)
