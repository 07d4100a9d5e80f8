"""`python -m services.stack serve` stopped however it is stopped leaves no child running: SIGTERM (a
supervisor, `kill`), SIGHUP (a closed terminal), SIGINT (Ctrl-C) stop the stack in order, and a
parent killed with -9 takes its children with it (their parent-death signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are gone already, waiting to be reaped
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# How the parent ends for each signal: SystemExit(128 + n) for TERM/HUP, a normal exit after
# Ctrl-C, killed outright by -9.
EXIT_CODE = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGHUP: 128 + signal.SIGHUP, signal.SIGINT: 0,
             signal.SIGKILL: -signal.SIGKILL}


@pytest.mark.parametrize("sig", list(EXIT_CODE), ids=lambda s: signal.Signals(s).name)
def test_no_child_outlives_the_stack(tmp_path, tiny_llama_path, sig):
    serve = subprocess.Popen(
        [sys.executable, "-m", "services.stack", "serve", "--data-dir", str(tmp_path), "--model-path",
         str(tiny_llama_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ADACCEL_TORCH_THREADS": "1"})
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        for line in serve.stdout:
            if "serving;" in line:
                break
            assert time.monotonic() < deadline, "stack did not come up"
        else:
            raise AssertionError(f"stack exited early with {serve.wait()}")
        below = descendants(serve.pid)
        assert len(below) >= 5  # broker, pool, kv-store, decoder, router
        serve.send_signal(sig)
        assert serve.wait(timeout=60) == EXIT_CODE[sig]
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in below if alive(pid)], f"processes left running after {signal.Signals(sig).name}"
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in below | descendants(serve.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
