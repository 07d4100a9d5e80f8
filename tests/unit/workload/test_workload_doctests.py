"""The docstring examples of the workload and modeling modules run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "common.workload.catalog",
    "common.workload.blocks",
    "common.workload.facts",
    "common.workload.corpus_stats",
    "common.workload.assemble",
    "common.workload.prompts",
    "common.workload.answer_checks",
    "common.modeling.training",
    "common.modeling.tokenizer_training",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
