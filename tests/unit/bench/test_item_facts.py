"""bench-decode's item-fact ads check: answers decoded with a real (byte-level) tokenizer, checked
against the item block of their own prompt, from a workload directory's catalog."""

from __future__ import annotations

import json

from bench.common import ItemFactChecker
from common.modeling.tiny import byte_tokenizer
from common.workload.blocks import item_block
from common.workload.catalog import Item
from common.workload.export import item_to_json
from common.workload.prompts import Prompt

VERRIS = Item("I1", "beauty", "fragrance", "Verris Orbit Mist", "Verris", (("top note", "neroli"),), "premium",
              "gift buyers", 0.5)
KAITA = Item("I2", "beauty", "fragrance", "Kaita Lark Mist", "Kaita", (("top note", "pear"),), "luxury",
             "students", 0.5)


def prompt(task: str, item: Item | None) -> Prompt:
    blocks = (item_block(item),) if item is not None else ()
    return Prompt(f"p-{task}", task, "heldout", "beauty/fragrance", (item.item_id,) if item else (), (), blocks, "")


def test_only_item_knowledge_answers_are_checked_each_against_its_own_item(tmp_path):
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item_to_json(i)) + "\n" for i in (VERRIS, KAITA)))
    tokenizer = byte_tokenizer()
    prompts = [prompt("item_knowledge", VERRIS), prompt("user_summary", None), prompt("item_knowledge", KAITA)]
    checker = ItemFactChecker(tmp_path, tokenizer, prompts)
    answers = ["Verris, top note neroli, premium.", "Kaita luxury pear.", "Kaita, a luxury pick with neroli."]
    outputs = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    # 3 of 3 right; the user summary is not checked; 2 of 3 right (neroli is the other item's)
    assert checker(outputs) == {"precision": 5 / 6, "answers_all_correct": 0.5, "facts_per_answer": 3.0,
                                "answers": 2}
    summaries_only = ItemFactChecker(tmp_path, tokenizer, prompts[1:2])
    assert summaries_only(outputs[1:2]) is None  # no item-knowledge answer among them


def test_a_workload_without_its_catalog_is_said_so_and_checks_nothing(tmp_path):
    checker = ItemFactChecker(tmp_path, byte_tokenizer(), [prompt("item_knowledge", VERRIS)])
    assert checker.missing == f"no {tmp_path / 'items.jsonl'}" and checker([[65]]) is None
