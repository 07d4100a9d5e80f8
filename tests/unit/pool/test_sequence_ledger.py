"""The item-sequence ledger's decisions, from hand-made records (no store)."""

from __future__ import annotations

import doctest

import pytest

from services.pool import sequence_ledger
from services.pool.layout import StoredSequence
from services.pool.mirror import Retraction
from services.pool.sequence_ledger import LedgerEdit


def edit(*, squeezes: int = 0, sequences: int = 0, sequence_tokens: int = 0) -> LedgerEdit:
    return LedgerEdit(next_sequence_id=10, squeezes=squeezes, sequences=sequences,
                      sequence_tokens=sequence_tokens)


def seq(tokens: int, kind: str = "output", at: int = 0, items: tuple[str, ...] = ("it",)) -> StoredSequence:
    return StoredSequence(kind, at, items, tuple(range(tokens)))


def never_read():
    raise AssertionError("records read although nothing was to be forgotten")
    yield  # pragma: no cover - makes this a generator


def test_doctests() -> None:
    assert doctest.testmod(sequence_ledger).failed == 0


@pytest.mark.parametrize("sequences, item_ids, kept", [
    ([[1, 2], [3]], ("a",), [(1, 2), (3,)]),
    ([[1, 2]], (), []),  # no item to remove it by: not remembered
    ([[], [4]], ("a",), [(4,)]),  # empty sequences are not remembered
])
def test_inserted_sequences_are_remembered_with_consecutive_ids(sequences, item_ids, kept) -> None:
    ledger = edit(squeezes=3, sequences=1, sequence_tokens=5)
    ledger.remember(sequences, "input", item_ids)
    assert [s.tokens for _, s in ledger.remembered] == kept
    assert [i for i, _ in ledger.remembered] == list(range(10, 10 + len(kept)))
    assert ledger.next_sequence_id == 10 + len(kept)
    assert all(s.squeezes_at_insert == 3 and s.item_ids == item_ids and s.kind == "input"
               for _, s in ledger.remembered)
    assert (ledger.sequences, ledger.sequence_tokens) == (1 + len(kept), 5 + sum(map(len, kept)))


def test_taking_back_retracts_each_record_of_the_kinds_once_halved_per_decay_since() -> None:
    ledger = edit(squeezes=5, sequences=3, sequence_tokens=9)
    records = [(1, seq(2, "input", at=1)), (2, seq(3, "output", at=4)), (3, seq(4, "input", at=5))]
    retractions = ledger.take_back(records, kinds=("input",))
    assert retractions == [Retraction((0, 1), "input", 4), Retraction((0, 1, 2, 3), "input", 0)]
    # the same record handed in again (a sequence about two removed items) is not taken twice
    assert ledger.take_back(records, kinds=("input", "output")) == [Retraction((0, 1, 2), "output", 1)]
    assert sorted(ledger.forgotten) == [1, 2, 3]
    assert (ledger.sequences, ledger.sequence_tokens) == (0, 0)


@pytest.mark.parametrize("length, at, squeezes_now, spent", [
    (1, 0, 1, False),  # share 1/2: not under 1/2 yet
    (1, 0, 2, True),
    (4, 1, 4, False),  # 4 / 2^3
    (4, 0, 4, True),
])
def test_a_record_alone_is_forgotten_once_its_share_is_under_half(length, at, squeezes_now, spent) -> None:
    ledger = edit(sequences=1, sequence_tokens=length)
    ledger.forget_spent(lambda: [(7, seq(length, at=at))], squeezes_now=squeezes_now)
    assert (7 in ledger.forgotten) is spent
    assert ledger.sequences == (0 if spent else 1)


def test_an_items_records_are_forgotten_together_only_when_their_shares_sum_under_half() -> None:
    # Four 1-token records of one item, 3 squeezes since: each alone is worth 1/8, together 1/2,
    # which at a node they all reach can still be a count of 1 (4 -> 2 -> 1 -> 0 needs a 3rd).
    records = [(i, seq(1, at=0)) for i in range(1, 5)]
    ledger = edit(sequences=4, sequence_tokens=4)
    ledger.forget_spent(lambda: records, squeezes_now=3)
    assert ledger.forgotten == {}
    ledger.forget_spent(lambda: records, squeezes_now=4)
    assert sorted(ledger.forgotten) == [1, 2, 3, 4]
    # A record about two items stays while either item is not spent, and so does that item's
    # own; this write's new records count too.
    records = [(1, seq(1, at=0, items=("a", "b"))), (2, seq(1, at=0, items=("b",))), (3, seq(1, at=0, items=("c",)))]
    ledger = edit(squeezes=5, sequences=3, sequence_tokens=3)
    ledger.remember([[5, 6, 7]], "output", ("b",))
    ledger.forget_spent(lambda: records, squeezes_now=5)
    assert sorted(ledger.forgotten) == [3]


def test_past_the_token_bound_the_oldest_records_go_down_to_half_of_it() -> None:
    under = edit(sequences=2, sequence_tokens=100)
    under.forget_oldest(never_read(), max_tokens=100)
    assert under.forgotten == {}
    over = edit(sequences=5, sequence_tokens=150)
    records = [(i, seq(30)) for i in range(1, 6)]
    over.take_back(records[1:2], kinds=("output",))  # record 2, forgotten earlier in this write: skipped
    over.forget_oldest(records, max_tokens=100)  # 120 > 100: 1, 3 and 4 go, until 30 <= 100 // 2
    assert sorted(over.forgotten) == [1, 2, 3, 4]
    assert (over.sequences, over.sequence_tokens) == (1, 30)
