"""The `make run` path in quick mode: real processes, real broker, real RocksDB, the job's table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_main_job_runs_end_to_end_and_prints_its_table(tmp_path, tiny_llama_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.stack", "job", "--quick", "--data-dir", str(tmp_path),
         "--model-path", str(tiny_llama_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "adaccel main job" in result.stdout
    summary = json.loads((tmp_path / "outputs" / "job_summary.json").read_text())
    assert summary["failed"] == 0 and summary["requests"] > 0
    assert summary["new_tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["items_per_s"] > 0
    # Pools were warmed before the run; hit rates and the in-run speedup are in the summary.
    assert summary["warm_texts_inserted"] > 0
    assert 0 <= summary["kv_block_hit_rate"] <= 1 and 0 <= summary["pool_hit_rate"] <= 1
    assert summary["speedup_vs_no_acceleration"] > 0
    # Every generation went through Kafka into a pool.
    assert summary["pool_records_ingested"] == summary["requests"]
    outputs = [json.loads(line) for line in Path(summary["output"]).read_text().splitlines()]
    assert len(outputs) == summary["requests"] and all(o["text"] is not None for o in outputs)
    # Services shut down cleanly: no process left holding the RocksDB locks.
    for log in (tmp_path / "logs").glob("*.log"):
        assert not crash_lines(log.read_text(errors="replace")), log.name


# An uncaught exception prints its traceback at the start of a line; one logged by the service
# is a JSON line with "exc_info". OTel span events of failed client calls (a store not yet up at
# start-up) carry "exception.stacktrace" and are not crashes.
_CRASH = re.compile(r'^Traceback \(most recent call last\):|"exc_info"', re.M)


def crash_lines(text: str) -> list[str]:
    return [m.group(0) for m in _CRASH.finditer(text)]
