"""Prompts, blocks and references built from a small workload."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest

from common.workload.assemble import build_workload
from common.workload.blocks import BLOCK_KINDS, RANKED_PICKS, TASKS, item_block
from common.workload.settings import WorkloadSettings

SMALL = WorkloadSettings(
    num_items=400, num_users=120, inventory_events=20,
    item_knowledge_warm=150, item_knowledge_heldout=10,
    user_summary_warm=60, user_summary_heldout=6,
    generative_rec_warm=20, generative_rec_heldout=5,
    train_rec_prompts=30,
)


@pytest.fixture(scope="module")
def workload():
    return build_workload(SMALL)


def test_every_task_and_split_is_present(workload):
    present = {(p.task, p.split) for p in workload.prompts}
    assert present == {(task, split) for task in TASKS for split in ("warm", "heldout")}


def test_prompt_ids_are_unique(workload):
    for prompts in (workload.prompts, workload.training_prompts):
        ids = [p.prompt_id for p in prompts]
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "task, kinds",
    [
        ("item_knowledge", ["instruction", "item", "text"]),
        ("user_summary", ["instruction", "user_history", "text"]),
    ],
)
def test_block_layout(workload, task, kinds):
    for prompt in (p for p in workload.prompts if p.task == task):
        assert [b.kind for b in prompt.blocks] == kinds


def test_generative_rec_layout_and_candidate_count(workload):
    low, high = SMALL.rec_candidates
    for prompt in (p for p in workload.prompts if p.task == "generative_rec"):
        kinds = [b.kind for b in prompt.blocks]
        assert kinds[:2] == ["instruction", "user_history"] and kinds[-1] == "text"
        assert set(kinds[2:-1]) == {"item"}
        assert [b.id for b in prompt.blocks[2:-1]] == list(prompt.item_ids)
        assert low <= len(prompt.item_ids) <= high or len(prompt.item_ids) == len(set(prompt.item_ids))


def test_block_texts_start_with_text_and_end_with_one_newline(workload):
    for prompt in workload.prompts:
        for block in prompt.blocks:
            assert block.kind in BLOCK_KINDS
            assert block.text.endswith("\n") and not block.text.endswith("\n\n")
            assert block.text[0].strip(), f"block {block.id} starts with whitespace"


def test_an_item_block_is_identical_wherever_it_appears(workload):
    texts = defaultdict(set)
    positions = defaultdict(set)
    for prompt in workload.prompts + workload.training_prompts:
        for position, block in enumerate(prompt.blocks):
            if block.kind == "item":
                texts[block.id].add(block.text)
                positions[block.id].add(position)
    assert all(len(variants) == 1 for variants in texts.values())
    # The reuse pattern: some item blocks recur at different positions.
    assert any(len(p) >= 3 for p in positions.values())
    item = next(iter(workload.catalog.items))
    assert item_block(item) == item_block(item)


def test_pool_keys(workload):
    categories = {item.category_key for item in workload.catalog.items}
    for prompt in workload.prompts:
        if prompt.task == "user_summary":
            assert re.fullmatch(r"users/[a-z_]+", prompt.pool_key)
        else:
            assert prompt.pool_key in categories
            items = workload.catalog.items_by_id
            assert all(items[i].category_key == prompt.pool_key for i in prompt.item_ids)


def test_heldout_items_and_users_never_reach_the_training_corpus(workload):
    catalog = workload.catalog
    heldout_texts = {item_block(catalog.items_by_id[i]).text for i in catalog.heldout_item_ids}
    for prompt in workload.training_prompts:
        assert prompt.split == "warm"
        assert not set(prompt.item_ids) & catalog.heldout_item_ids
        assert not set(prompt.user_ids) & catalog.heldout_user_ids
        text = prompt.text + prompt.reference
        assert not any(item_id in text for item_id in catalog.heldout_item_ids)
        assert not any(block.text in heldout_texts for block in prompt.blocks)


def test_heldout_prompts_are_about_heldout_entities(workload):
    catalog = workload.catalog
    for prompt in (p for p in workload.prompts if p.split == "heldout"):
        if prompt.task == "item_knowledge":
            assert set(prompt.item_ids) <= catalog.heldout_item_ids
        else:
            assert set(prompt.user_ids) <= catalog.heldout_user_ids


def test_references_state_prompt_facts(workload):
    items = workload.catalog.items_by_id
    for prompt in workload.prompts:
        assert prompt.reference and (prompt.reference[0].isupper() or prompt.reference[0].isdigit())
        if prompt.task == "item_knowledge":
            item = items[prompt.item_ids[0]]
            assert item.title in prompt.reference or item.brand in prompt.reference
        if prompt.task == "generative_rec":
            named = [i for i in prompt.item_ids if items[i].title in prompt.reference]
            assert len(named) >= min(RANKED_PICKS, len(prompt.item_ids)) - 1


def test_warmups_are_warm_references_by_pool(workload):
    warm = [p for p in workload.prompts if p.split == "warm"]
    assert [(w.pool_key, w.text) for w in workload.warmups] == [(p.pool_key, p.reference) for p in warm]


def test_answer_lengths_are_in_range(workload):
    words = np.array([len(p.reference.split()) for p in workload.prompts])
    assert words.min() >= 12 and words.max() <= 110
    assert 25 <= words.mean() <= 80


def test_workload_is_deterministic(workload):
    again = build_workload(SMALL)
    assert again.prompts == workload.prompts and again.training_prompts == workload.training_prompts
