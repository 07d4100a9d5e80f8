"""The ads check reads items back from the blocks the workload renders, and from answers."""

from __future__ import annotations

from common.workload.answer_checks import Candidate, candidate_from_block, recommended_items
from common.workload.blocks import item_block
from common.workload.catalog import Item


def make_item(item_id: str, title: str) -> Item:
    return Item(item_id, "grocery", "coffee", title, title.split()[0], (("roast", "dark"),), "budget",
                "students", 0.5)


def test_every_rendered_item_block_parses_back_to_its_item():
    item = make_item("I000042", "Koal Glide 2 Coffee")
    assert candidate_from_block(item_block(item).text) == Candidate("I000042", "Koal Glide 2 Coffee")
    assert candidate_from_block("User U1 recent clicks, newest first:\n") is None


def test_recommended_items_by_first_mention_and_absence():
    cands = [Candidate("I1", "Koal Glide 2 Coffee"), Candidate("I2", "Lunor Umber 2 Bars")]
    assert recommended_items("1. Lunor Umber 2 Bars\n2. I1 Koal Glide 2 Coffee", cands) == ["I2", "I1"]
    assert recommended_items("No candidate fits.", cands) == []
    # Order matters to the check: a different ranking is a different answer.
    assert recommended_items("1. Koal Glide 2 Coffee 2. Lunor Umber 2 Bars", cands) != ["I2", "I1"]
