"""Fault tests take minutes (services killed and restarted as processes): they run with
--run-faults (`make test-faults`), not as part of `make test`."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def only_with_run_faults(request):
    if not request.config.getoption("--run-faults"):
        pytest.skip("fault tests run with --run-faults (make test-faults)")
