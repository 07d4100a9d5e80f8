"""The ads check reads items back from the blocks the workload renders, and from answers."""

from __future__ import annotations

import json

from common.workload.answer_checks import (
    Candidate,
    FactCheck,
    candidate_from_block,
    check_item_facts,
    fact_precision,
    fact_vocabulary,
    recommended_items,
)
from common.workload.blocks import item_block
from common.workload.catalog import Item
from common.workload.export import item_to_json, load_items


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


def fragrance(item_id: str, brand: str, note: str, band: str) -> Item:
    return Item(item_id, "beauty", "fragrance", f"{brand} Orbit Mist", brand,
                (("top note", note), ("concentration", "eau de parfum"), ("bottle", "50 ml"), ("count", "3")),
                band, "gift buyers", 0.5)


def test_an_answer_restating_its_own_block_is_all_correct_and_another_item_s_facts_are_wrong():
    ours, theirs = fragrance("I1", "Verris", "neroli", "premium"), fragrance("I2", "Kaita", "pear", "luxury")
    vocabulary = fact_vocabulary([ours, theirs])
    block = item_block(ours).text
    own = check_item_facts("1. Verris Orbit Mist. 2. Top note: neroli. 3. Eau de parfum, 50 ml. 4. Price premium. "
                           "5. For gift buyers.", block, vocabulary)
    assert own == FactCheck(stated=6, wrong=())  # verris, neroli, eau de parfum, 50 ml, premium, gift buyers
    mixed = check_item_facts("A luxury Kaita fragrance with a pear top note; 3 sprays.", block, vocabulary)
    assert mixed.wrong == ("brand Kaita", "pear", "price luxury") and mixed.correct == 1  # the item's category
    assert fact_precision([own, mixed]) == {"precision": 7 / 10, "answers_all_correct": 0.5,
                                           "facts_per_answer": 5.0, "answers": 2}
    assert fact_precision([check_item_facts("Nice.", block, vocabulary)])["precision"] is None


def test_facts_match_whole_words_only_and_bare_numbers_are_not_facts():
    item = fragrance("I1", "Verris", "neroli", "mid-range")
    vocabulary = fact_vocabulary([item])
    assert "3" not in vocabulary.facts and vocabulary.facts["mid-range"] == "price mid-range"
    assert vocabulary.find("a wide-ranging, Verrisian scent") == set()  # "range" and "verris" inside words
    assert vocabulary.find("Mid-range, by VERRIS.") == {"price mid-range", "brand Verris"}
    assert vocabulary.find("fragrance, Fragrances") == {"category beauty/fragrance"}  # one fact, two spellings


def test_items_round_trip_through_items_jsonl(tmp_path):
    items = [fragrance("I1", "Verris", "neroli", "premium"), make_item("I2", "Koal Glide 2 Coffee")]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item_to_json(i)) + "\n" for i in items))
    assert load_items(tmp_path) == items
