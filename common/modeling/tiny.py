"""Tiny random-weight causal LMs built from a config with a fixed seed, in seconds.

Tests use them (Llama- and Qwen2-architecture) so that `make test` never waits for training;
the stack uses one as a labelled stand-in when no trained model is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ARCHITECTURES = ("llama", "qwen2")
BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one id per byte plus specials): round-trips any text, needs no training."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, max_positions: int = 2048):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


def build_tiny_model(arch: str = "llama", *, seed: int = 0, **config_overrides):
    """A random-weight model and a byte tokenizer that matches its vocabulary."""
    tokenizer = byte_tokenizer()
    # Padded to a multiple of 64 like real checkpoints; also leaves room for the special tokens
    # that an architecture's own tokenizer class adds on load (Qwen2 adds <|endoftext|>).
    config = tiny_config(arch, padded_vocab_size(len(tokenizer) + 1), **config_overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model, tokenizer


def save_tiny_model(out_dir: Path, arch: str = "llama", *, seed: int = 0, **config_overrides) -> Path:
    """Writes a loadable checkpoint (config, weights, tokenizer, adaccel card) to out_dir."""
    model, tokenizer = build_tiny_model(arch, seed=seed, **config_overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    card = {"model_id": f"tiny-random-{arch}-s{seed}", "random_weights": True, "arch": arch, "seed": seed}
    (out_dir / "adaccel_model.json").write_text(json.dumps(card, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight causal LM checkpoint.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_model(args.out, args.arch, seed=args.seed))


if __name__ == "__main__":
    main()
