"""PoolMeta: a value the writer replaces, with the time it is handed."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

from services.pool import pool_meta
from services.pool.pool_meta import PoolMeta


def test_doctests() -> None:
    assert doctest.testmod(pool_meta).failed == 0


def test_the_next_version_is_a_new_value_and_the_old_one_stays_as_it_was() -> None:
    before = PoolMeta("a/b", version=4, nodes=9, squeezes=2, updated_at=1.0)
    after = before.next_version(nodes=7, squeezes=3, sequences=2, sequence_tokens=10, capacity=16,
                                row_bytes=20, updated_at=99.5)
    assert after == PoolMeta("a/b", version=5, nodes=7, capacity=16, updated_at=99.5, squeezes=3, sequences=2,
                             sequence_tokens=10, size_bytes=7 * 20 + 4 * 10)
    assert before.version == 4 and before.updated_at == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.version = 5  # type: ignore[misc]
