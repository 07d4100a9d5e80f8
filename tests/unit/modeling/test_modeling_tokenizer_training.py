"""Byte-level BPE training: round trip, special ids, AutoTokenizer on a Llama dir, per-block ids."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, LlamaConfig

from common.modeling.tokenizer_training import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    encode_blocks,
    encode_unique,
    find_round_trip_failures,
    train_bpe_tokenizer,
)
from common.workload.assemble import build_workload
from common.workload.settings import WorkloadSettings

ODD_TEXTS = [
    "Item I000123: Norvik Zen 3 Trainers. Price mid-range.\n",
    "  leading spaces and trailing  \n\n",
    "café, naïve, 日本語, emoji 🙂, tab\tand \r\n line ends",
    "x . y , z ! (spaces before punctuation)",
    "",
]


@pytest.fixture(scope="module")
def workload():
    return build_workload(WorkloadSettings(
        num_items=150, num_users=30, inventory_events=0, item_knowledge_warm=40, item_knowledge_heldout=4,
        user_summary_warm=15, user_summary_heldout=3, generative_rec_warm=3, generative_rec_heldout=2,
        rec_candidates=(3, 6), train_rec_prompts=5))


@pytest.fixture(scope="module")
def tokenizer(workload):
    texts = [b.text for p in workload.training_prompts for b in p.blocks]
    texts += [p.reference for p in workload.training_prompts]
    return train_bpe_tokenizer(texts, vocab_size=600)


def test_special_tokens_have_fixed_ids(tokenizer):
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tokenizer) <= 600


def test_round_trips_corpus_and_unseen_text(tokenizer, workload):
    texts = [p.text + p.reference for p in workload.prompts] + ODD_TEXTS
    assert find_round_trip_failures(tokenizer, texts) == []


def test_encoding_adds_no_special_tokens(tokenizer):
    ids = tokenizer("Hello there\n")["input_ids"]
    assert BOS_ID not in ids and EOS_ID not in ids


def test_per_block_ids_equal_whole_prompt_ids(tokenizer, workload):
    cache = encode_unique(tokenizer, [b.text for p in workload.prompts for b in p.blocks])
    for prompt in workload.prompts:
        blocks = [b.text for b in prompt.blocks]
        whole = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        assert encode_blocks(tokenizer, blocks) == whole
        assert encode_blocks(tokenizer, blocks, cache) == whole
        # ... and the answer appended after the prompt tokenizes the same on its own.
        joined = tokenizer(prompt.text + prompt.reference, add_special_tokens=False)["input_ids"]
        assert encode_blocks(tokenizer, blocks + [prompt.reference]) == joined


def test_auto_tokenizer_on_a_llama_checkpoint_dir(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    LlamaConfig(vocab_size=640).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    # transformers 5 returns its generic tokenizers-backed class, not a Llama tokenizer that
    # would prepend <s> or swap the byte-level pre-tokenizer for a Metaspace one.
    assert "Llama" not in type(loaded).__name__
    saved_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved_config["tokenizer_class"] == "TokenizersBackend"
    for text in ODD_TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
