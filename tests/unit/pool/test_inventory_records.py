"""Inventory events -> pool mutations (pure)."""

import pytest

from adaccel.v1 import records_pb2
from services.pool.ngram_records import (
    InsertSequences,
    NoChange,
    RejectedRecord,
    RemoveItem,
    inventory_event_mutation,
)

ADDED, CHANGED, REMOVED = (records_pb2.INVENTORY_ACTION_ADDED, records_pb2.INVENTORY_ACTION_CHANGED,
                           records_pb2.INVENTORY_ACTION_REMOVED)


def event(**fields) -> bytes:
    return records_pb2.InventoryEvent(**fields).SerializeToString()


def transform(value, tokenize=None):
    return inventory_event_mutation(value, vocab_size=100, max_tokens=10, tokenize=tokenize)


def fake_tokenize(text: str) -> list[int]:
    return [ord(c) - ord("a") for c in text]


@pytest.mark.parametrize("value, expected", [
    (event(item_id="it-1", action=REMOVED, pool_key="a/b"), RemoveItem("it-1")),
    (event(item_id="it-1", action=ADDED, pool_key="a/b", token_ids=[3, 4]),
     InsertSequences("a/b", ((3, 4),), "input", ("it-1",), replace_item_input=True)),
    (event(item_id="it-1", action=CHANGED, text="abc"),
     InsertSequences("global", ((0, 1, 2),), "input", ("it-1",), replace_item_input=True)),
])
def test_inventory_events_become_mutations(value, expected):
    assert transform(value, fake_tokenize) == expected


def test_token_ids_win_over_text_and_text_needs_a_tokenizer():
    both = event(item_id="x", action=ADDED, text="abc", token_ids=[9])
    assert transform(both, fake_tokenize).sequences == ((9,),)
    assert isinstance(transform(event(item_id="x", action=ADDED, text="abc")), NoChange)
    assert isinstance(transform(event(item_id="x", action=ADDED), fake_tokenize), NoChange)


@pytest.mark.parametrize("value, reason", [
    (b"", "value: empty"),
    (b"\xff\xff\xff garbage", "value: not an InventoryEvent"),
    (event(action=REMOVED), "item_id:"),
    (event(item_id="has space", action=REMOVED), "item_id:"),
    (event(item_id="x"), "action: must be"),
    (event(item_id="x", action=7), "action: must be"),
    (event(item_id="x", action=ADDED, pool_key="bad key"), "pool_key:"),
    (event(item_id="x", action=ADDED, token_ids=[100]), "token_ids: token id 100"),
    (event(item_id="x", action=ADDED, token_ids=list(range(11))), "token_ids: 11 tokens, limit is 10"),
])
def test_malformed_events_are_rejected_with_a_reason(value, reason):
    with pytest.raises(RejectedRecord) as err:
        transform(value, fake_tokenize)
    assert str(err.value).startswith(reason)
