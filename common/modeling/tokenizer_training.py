"""A byte-level BPE tokenizer trained on the workload corpus, saved as a transformers fast tokenizer.

Byte-level (GPT-2 style): any text encodes, and decode(encode(text)) == text. Special tokens sit
at fixed ids (<pad> 0, <s> 1, </s> 2, as in common/modeling/tiny.py); encoding adds none of them:
the decoder concatenates per-block ids and training appends </s> itself.

Loading it back: `AutoTokenizer.from_pretrained(dir)` on a checkpoint dir whose config.json is a
Llama config returns transformers' generic `TokenizersBackend` (transformers 5.x; the saved
tokenizer_config.json names it), not a Llama tokenizer: no BOS is added, the byte-level
pre-tokenizer and decoder are kept. tests/unit/modeling checks this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Trains byte-level BPE on `texts` (deterministic for equal input).

    >>> tok = train_bpe_tokenizer(["Item I000001: red shoes.\\n"] * 20, vocab_size=300)
    >>> tok.decode(tok("Item I000001: red shoes.\\n")["input_ids"]) == "Item I000001: red shoes.\\n"
    True
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        minimum = 256 + len(SPECIAL_TOKENS)
        raise ValueError(f"vocab_size must be >= {minimum} (bytes + specials), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    # GPT-2 split rules (use_regex): a newline before a non-space character is always a
    # pre-token boundary, which makes per-block tokenization equal whole-prompt tokenization.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        # Cleanup would turn " ." into "." on decode and break the round trip.
        clean_up_tokenization_spaces=False,
    )
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert ids == [PAD_ID, BOS_ID, EOS_ID], f"special tokens landed at {ids}"
    return tokenizer


def find_round_trip_failures(tokenizer, texts: Iterable[str], limit: int = 5) -> list[str]:
    """Texts (at most `limit`) that do not survive encode -> decode unchanged."""
    failures = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids) != text:
            failures.append(text)
            if len(failures) >= limit:
                break
    return failures


def encode_blocks(
    tokenizer, block_texts: Sequence[str], ids_by_text: Mapping[str, list[int]] | None = None
) -> list[int]:
    """Token ids of a prompt the way the decoder builds them: each block alone, concatenated.

    `ids_by_text` (from `encode_unique`) saves re-tokenizing blocks that recur across prompts.
    """
    ids: list[int] = []
    for text in block_texts:
        cached = ids_by_text.get(text) if ids_by_text is not None else None
        ids.extend(cached if cached is not None else tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def encode_unique(tokenizer, texts: Iterable[str]) -> dict[str, list[int]]:
    """text -> ids for each distinct text, in one batched call (the Rust side runs it in parallel)."""
    unique = list(dict.fromkeys(texts))
    encoded = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    return dict(zip(unique, encoded))
