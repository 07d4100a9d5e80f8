"""Training helpers on tiny models: batching, loss weights, schedule, a few real steps, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.modeling.tiny import byte_tokenizer
from common.modeling.tokenizer_training import EOS_ID, PAD_ID
from common.modeling.training import (
    Example,
    ModelSpec,
    TrainSettings,
    _truncate,
    answer_nll,
    build_model,
    collate,
    count_parameters,
    distinct_bigram_ratio,
    encode_example,
    greedy_generate,
    learning_rate_at,
    llama_config,
    plan_batches,
    train_model,
    unigram_perplexity,
)

TINY_SPEC = ModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    rng = np.random.default_rng(0)
    out = []
    for n in range(24):
        color = ["red", "blue", "green"][n % 3]
        out.append(encode_example(tokenizer, [f"Item {n}: {color} shoe.\n", "Answer:\n"], f"A {color} shoe."))
    rng.shuffle(out)
    return out


def test_encode_example_layout(tokenizer):
    example = encode_example(tokenizer, ["ab\n", "c\n"], "xy")
    assert example.input_ids[-1] == EOS_ID
    assert tokenizer.decode(list(example.prompt_ids)) == "ab\nc\n"
    assert tokenizer.decode(list(example.answer_ids[:-1])) == "xy"


@pytest.mark.parametrize("budget", [10, 64, 1000])
def test_plan_batches_covers_everything_within_budget(budget):
    lengths = [5, 3, 9, 4, 30, 12, 12, 1]
    batches = plan_batches(lengths, budget, np.random.default_rng(0))
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= budget


def test_collate_pads_right_and_weights_answers():
    a = Example(input_ids=(5, 6, 7, 8, EOS_ID), answer_start=3)
    b = Example(input_ids=(5, 9, EOS_ID), answer_start=2)
    batch = collate([a, b], prompt_loss_weight=0.25)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, EOS_ID], [5, 9, EOS_ID, PAD_ID, PAD_ID]]
    assert batch["targets"].tolist() == [[6, 7, 8, EOS_ID], [9, EOS_ID, PAD_ID, PAD_ID]]
    # position 2 predicts the first answer token (8): full weight from there on.
    assert batch["weights"].tolist() == [[0.25, 0.25, 1.0, 1.0], [0.25, 1.0, 0.0, 0.0]]


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    assert learning_rate_at(0, settings) == pytest.approx(1e-4)
    assert learning_rate_at(9, settings) == pytest.approx(1e-3)
    assert learning_rate_at(55, settings) == pytest.approx(0.55e-3)
    assert learning_rate_at(100, settings) == pytest.approx(1e-4)


def test_truncate_keeps_the_answer():
    example = Example(input_ids=tuple(range(10)), answer_start=7)
    cut = _truncate(example, 6)
    assert cut.answer_ids == example.answer_ids and len(cut.input_ids) == 6


def test_build_model_is_seeded_and_leaves_global_rng_alone(tokenizer):
    config = llama_config(TINY_SPEC, len(tokenizer))
    assert config.vocab_size % 64 == 0 and config.tie_word_embeddings
    assert config.max_position_embeddings >= 4096
    state = torch.random.get_rng_state()
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert count_parameters(a) < 100_000


def test_a_few_steps_lower_the_answer_loss(tokenizer, examples):
    model = build_model(llama_config(TINY_SPEC, len(tokenizer)), seed=0)
    before, n = answer_nll(model, examples[:6])
    settings = TrainSettings(steps=12, batch_tokens=256, learning_rate=1e-2, warmup_steps=2, num_threads=1)
    report = train_model(model, examples, settings)
    after, _ = answer_nll(model, examples[:6])
    assert after < before and report.last_loss < report.first_loss
    assert report.steps == 12 and report.tokens_seen > 0
    assert not model.training
    new = greedy_generate(model, examples[0].prompt_ids, max_new_tokens=5)
    assert len(new) <= 5 and EOS_ID not in new


def test_unigram_perplexity_of_a_uniform_stream():
    train = [Example(input_ids=(9, 1, 2, 3, 4), answer_start=1)]
    evaluation = [Example(input_ids=(9, 1, 2), answer_start=1)]
    # add-one counts 2 for each seen token out of 4 + vocab 4 = 8 -> p = 1/4
    assert unigram_perplexity(train, evaluation, vocab_size=4) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "ids, expected",
    [([], 1.0), ([7], 1.0), ([1, 2, 3, 4], 1.0), ([1, 2, 1, 2, 1, 2], 0.4), ([5, 5, 5, 5, 5], 0.25)],
)
def test_distinct_bigram_ratio(ids, expected):
    assert math.isclose(distinct_bigram_ratio(ids), expected)


def test_time_budget_stops_training_and_anneals(tokenizer, examples):
    model = build_model(llama_config(TINY_SPEC, len(tokenizer)), seed=0)
    settings = TrainSettings(steps=50, batch_tokens=256, warmup_steps=1, time_budget_s=1e-6, num_threads=1)
    report = train_model(model, examples, settings)
    assert report.stopped_by_time and report.steps < 50


def test_learning_rate_follows_the_further_of_steps_and_time():
    settings = TrainSettings(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    assert learning_rate_at(20, settings, progress=1.0) == pytest.approx(1e-4)
    assert learning_rate_at(20, settings, progress=0.2) == pytest.approx(learning_rate_at(20, settings))


def test_greedy_generate_matches_transformers_generate(tokenizer, examples):
    model = build_model(llama_config(TINY_SPEC, len(tokenizer)), seed=5)
    model.eval()
    prompt = list(examples[1].prompt_ids)
    ours = greedy_generate(model, prompt, max_new_tokens=12)
    reference = model.generate(
        input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12, do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )[0, len(prompt):].tolist()
    if EOS_ID in reference:
        reference = reference[: reference.index(EOS_ID)]
    assert ours == reference
