"""Load a causal LM and its tokenizer from a local directory, as a Hugging Face checkpoint.

Nothing here ever reaches a model hub: `local_files_only=True` everywhere, so a user's real
checkpoint drops in by pointing `ADACCEL_MODEL_PATH` at it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class ModelLoadError(ValueError):
    """The model directory is missing, is not a causal LM, or does not match its tokenizer."""


@dataclass(slots=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    # True for random-weight stand-ins (tests, quick mode); shown to users so nobody reads
    # acceptance figures of an untrained model as meaningful.
    random_weights: bool


def read_model_card(path: Path) -> dict:
    """adaccel's own metadata written next to a checkpoint (absent for a user's checkpoint)."""
    card = path / "adaccel_model.json"
    if not card.is_file():
        return {}
    return json.loads(card.read_text())


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Loads model and tokenizer from `path`; raises ModelLoadError naming the problem."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {str(path)!r} has no config.json: not a Hugging Face checkpoint")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model path {str(path)!r}: unreadable config: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
    except ValueError as exc:
        raise ModelLoadError(
            f"model path {str(path)!r}: model type {config.model_type!r} is not a causal LM: {exc}"
        ) from exc
    except (OSError, RuntimeError) as exc:
        # RuntimeError: weights whose shapes do not match config.json.
        raise ModelLoadError(f"model path {str(path)!r}: cannot load weights: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"model path {str(path)!r}: cannot load tokenizer: {exc}") from exc
    check_tokenizer_matches(tokenizer, model.config.vocab_size, path)
    model.to(device)
    model.eval()
    card = read_model_card(path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=card.get("model_id", path.name),
        random_weights=bool(card.get("random_weights", False)),
    )


def check_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, vocab_size: int, path: Path) -> None:
    """A tokenizer with more ids than the embedding table would index out of range at run time."""
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"model path {str(path)!r}: tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {vocab_size}: they do not belong together"
        )
