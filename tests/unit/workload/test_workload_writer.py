"""The reference writer: variety, per-pool voices, attribute clauses, facts, 4-gram overlap."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from common.workload.assemble import build_workload
from common.workload.catalog import Item
from common.workload.corpus_stats import four_gram_overlap, word_ngrams
from common.workload.facts import profile_history, rank_candidates
from common.workload.lexicon import CATEGORIES, category_by_key
from common.workload.settings import WorkloadSettings
from common.workload.writer import (
    attribute_benefit,
    item_voice,
    user_voice,
    write_generative_rec,
    write_item_knowledge,
)

SNEAKERS = category_by_key("fashion/sneakers")


def _item(item_id="I000001", brand="Norvik", category="sneakers", vertical="fashion", band="budget",
          popularity=0.5, title=None):
    spec = category_by_key(f"{vertical}/{category}")
    return Item(
        item_id=item_id, vertical=vertical, category=category, title=title or f"{brand} Zen Sneakers",
        brand=brand, attributes=tuple((a.label, a.values[0]) for a in spec.attributes), price_band=band,
        audience="students", popularity=popularity,
    )


def test_one_item_gets_many_different_answers():
    voice = item_voice(SNEAKERS, style_seed=0)
    answers = {write_item_knowledge(_item(), voice, np.random.default_rng(seed)) for seed in range(40)}
    assert len(answers) >= 35
    first_sentences = {answer.split(". ")[0] for answer in answers}
    assert len(first_sentences) >= 4


def test_answers_are_deterministic_given_the_rng():
    voice = item_voice(SNEAKERS, style_seed=0)
    a = write_item_knowledge(_item(), voice, np.random.default_rng(3))
    b = write_item_knowledge(_item(), voice, np.random.default_rng(3))
    assert a == b


def test_voices_differ_between_categories_and_are_stable():
    voices = [item_voice(spec, style_seed=0) for spec in CATEGORIES]
    opener_sets = {v.patterns["openers"] for v in voices}
    assert len(opener_sets) > len(CATEGORIES) // 2
    assert item_voice(SNEAKERS, 0) == item_voice(SNEAKERS, 0)
    assert user_voice("travel", 0).pool_key == "users/travel"


def test_attribute_benefit_is_a_fixed_category_benefit():
    label, value = SNEAKERS.attributes[0].label, SNEAKERS.attributes[0].values[0]
    assert attribute_benefit(SNEAKERS, label, value) == attribute_benefit(SNEAKERS, label, value)
    assert attribute_benefit(SNEAKERS, label, value) in SNEAKERS.benefits


def test_article_before_vowel_is_fixed():
    voice = item_voice(SNEAKERS, style_seed=0)
    for seed in range(30):
        answer = write_item_knowledge(_item(), voice, np.random.default_rng(seed))
        assert " a e" not in answer and " a a" not in answer and " a i" not in answer


@pytest.mark.parametrize(
    "history, expected",
    [
        ([("A", "lamps", "budget"), ("B", "lamps", "premium"), ("A", "sofas", "premium")],
         ("home/lamps", 2, "home/sofas", "A", 2, "premium")),
        ([("C", "sofas", "luxury")], ("home/sofas", 1, "", "C", 1, "luxury")),
    ],
)
def test_profile_history(history, expected):
    clicked = [
        Item(f"I{n}", "home", cat, f"{brand} T{n}", brand, (), band, "x", 1.0)
        for n, (brand, cat, band) in enumerate(history)
    ]
    p = profile_history(clicked)
    assert (p.top_category, p.top_category_clicks, p.second_category, p.top_brand,
            p.top_brand_clicks, p.top_band) == expected
    assert p.newest_title == clicked[0].title


def test_rank_candidates_prefers_clicked_brand_then_band():
    history = [_item("I1", brand="Norvik", band="premium"), _item("I2", brand="Norvik", band="premium")]
    profile = profile_history(history)
    candidates = [
        _item("I10", brand="Other", band="budget", popularity=0.9, title="Other Pop Sneakers"),
        _item("I11", brand="Another", band="premium", popularity=0.1, title="Another Band Sneakers"),
        _item("I12", brand="Norvik", band="budget", popularity=0.01, title="Norvik Fan Sneakers"),
    ]
    picks = rank_candidates(profile, candidates, 3)
    assert [p.item.item_id for p in picks] == ["I12", "I11", "I10"]
    assert [p.reason for p in picks] == ["brand", "price", "category"]
    text = write_generative_rec(picks, item_voice(SNEAKERS, 0), np.random.default_rng(0))
    assert text.index("Norvik Fan Sneakers") < text.index("Another Band Sneakers")


def test_four_gram_overlap_is_higher_within_a_pool_than_across():
    workload = build_workload(WorkloadSettings(
        num_items=400, num_users=80, inventory_events=0, item_knowledge_warm=400, item_knowledge_heldout=0,
        user_summary_warm=80, user_summary_heldout=0, generative_rec_warm=0, generative_rec_heldout=0,
        train_rec_prompts=0))
    texts = defaultdict(list)
    for prompt in workload.prompts:
        texts[prompt.pool_key].append(prompt.reference)
    within, across = four_gram_overlap(texts, np.random.default_rng(0), pool_size=10, texts_per_pool=5)
    assert within > 3 * across


def test_four_gram_overlap_needs_two_pools():
    with pytest.raises(ValueError):
        four_gram_overlap({"a": ["x y z w v", "x y z w q"]}, np.random.default_rng(0))
    assert word_ngrams("a b c") == set()
