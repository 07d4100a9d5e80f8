"""bench/gpu_check.sh refuses to run where there is no CUDA GPU: it must never report CPU figures
as GPU ones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the check would run")
def test_gpu_check_fails_loudly_without_a_gpu() -> None:
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "run"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "nothing was checked" in done.stderr


def test_gpu_check_names_its_usage() -> None:
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and "stage | receive | run" in done.stderr
