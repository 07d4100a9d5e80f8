"""The chart loaded and rendered once per module, with every values file (k8s/check.py's cases)."""

from __future__ import annotations

from typing import Any

import pytest

helm = pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

from k8s import check  # noqa: E402


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(check.CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def values_by_case() -> dict[str, dict[str, Any]]:
    return {name: check.load_values(path) for name, path in check.cases()}


@pytest.fixture(scope="module")
def rendered(chart, values_by_case) -> dict[str, list[dict[str, Any]]]:
    return {name: check.render_objects(chart, values) for name, values in values_by_case.items()}
