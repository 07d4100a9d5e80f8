"""What every benchmark shares: the machine's name, timing spread, results files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def quick_run() -> bool:
    """BENCH_QUICK set (and not 0): a short run, for a first look or a smoke test."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} torch threads"


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over repeats: the CPU's speed drifts, so one figure alone misleads."""
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def write_results(name: str, results: dict, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    results = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **results}
    path = results_dir / name
    path.write_text(json.dumps(results, indent=2))
    return path
