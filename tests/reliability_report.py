"""Pytest plugin: the figures of the fault and fuzz suites, written to bench/results/faults.json.

Tests record into the session fixture `reliability_report`; with `--faults-json PATH` (what
`make test-faults` passes) the session writes them in the issue's schema at its end:

    {"faults": [{"name", "survived", "requests", "failed_cleanly", "hung"}],
     "fuzz_inputs": int, "crashes": int, "pool_mismatches": int, "corrupt_blocks": int}

plus per-boundary detail under "fuzz_by_boundary" and the machine under "device".
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest


@dataclass(slots=True)
class FaultFigures:
    name: str
    survived: bool
    requests: int
    failed_cleanly: int
    hung: int
    detail: dict = field(default_factory=dict)


@dataclass
class ReliabilityReport:
    faults: list[FaultFigures] = field(default_factory=list)
    fuzz_inputs: Counter = field(default_factory=Counter)  # boundary -> inputs tried
    crashes: Counter = field(default_factory=Counter)  # boundary -> crashes seen
    pool_mismatches: int = 0
    corrupt_blocks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fuzzed(self, boundary: str, inputs: int, crashes: int = 0) -> None:
        with self._lock:
            self.fuzz_inputs[boundary] += inputs
            self.crashes[boundary] += crashes

    def fault(self, figures: FaultFigures) -> None:
        with self._lock:
            self.faults.append(figures)

    def as_json(self) -> dict:
        from common.machine import device_name

        return {
            "faults": [{k: v for k, v in asdict(f).items() if k != "detail"} | {"detail": f.detail}
                       for f in self.faults],
            "fuzz_inputs": sum(self.fuzz_inputs.values()),
            "crashes": sum(self.crashes.values()),
            "pool_mismatches": self.pool_mismatches,
            "corrupt_blocks": self.corrupt_blocks,
            "fuzz_by_boundary": dict(sorted(self.fuzz_inputs.items())),
            "device": device_name(),
        }


def pytest_addoption(parser):
    parser.addoption("--faults-json", default=None,
                     help="write the fault/fuzz figures here at the end of the session (make test-faults)")
    parser.addoption("--faults-model", default=None,
                     help="the model the fault suite's stack serves (default: a tiny random one; make "
                          "test-faults passes the default model when it is built)")


@pytest.fixture(scope="session")
def faults_model_path(request, tiny_llama_path) -> Path:
    given = request.config.getoption("--faults-model")
    return Path(given) if given else tiny_llama_path


@pytest.fixture(scope="session")
def reliability_report(request, faults_model_path):
    report = ReliabilityReport()
    yield report
    path = request.config.getoption("--faults-json")
    if path:
        from bench.common import model_provenance

        figures = report.as_json()
        figures["model"] = str(faults_model_path)
        figures["model_provenance"] = model_provenance(faults_model_path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
