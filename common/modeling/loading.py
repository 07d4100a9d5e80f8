"""Load a causal LM and its tokenizer from a local directory, as a Hugging Face checkpoint.

Nothing here ever reaches a model hub: `local_files_only=True` everywhere, so a user's real
checkpoint drops in by pointing `ADACCEL_MODEL_PATH` at it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from common.modeling.card import CARD_FILE, read_model_card  # noqa: F401  (CARD_FILE: callers name it here)


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
    # A digest of the weights themselves: two checkpoints whose directories (or cards) give the
    # same model_id, e.g. two fine-tunes saved as ".../model", must never share block KV.
    weights_fingerprint: str

    @property
    def blocks_model_id(self) -> str:
        """The model name block KV, the kv-store and the reuse gate are keyed by (dtype added later)."""
        return f"{self.model_id}@{self.weights_fingerprint}"


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
    check_engine_supports(config, path)
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
    fingerprint = weights_fingerprint(model)
    model.to(device)
    model.eval()
    card = read_model_card(path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=card.get("model_id", path.name),
        random_weights=bool(card.get("random_weights", False)),
        weights_fingerprint=fingerprint,
    )


def weights_fingerprint(model: torch.nn.Module, *, sample: int = 256) -> str:
    """16 hex digits naming the weights: every tensor's name, shape and first and last `sample` values.

    Sampling keeps it well under a second for a 135M model on CPU while any retrained, fine-tuned
    or differently seeded checkpoint differs in the sampled values of nearly every tensor.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            for part in (flat[:sample], flat[-sample:]):
                digest.update(part.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, vocab_size: int, path: Path) -> None:
    """A tokenizer with more ids than the embedding table would index out of range at run time."""
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"model path {str(path)!r}: tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {vocab_size}: they do not belong together"
        )


def unsupported_attention(config) -> str | None:
    """Why the decoding engine cannot run this architecture, or None.

    The engine verifies a draft tree with one 4-D mask over the whole cache for every layer and
    crops the cache after each step. A sliding-window layer keeps only its window in the cache,
    so once a prompt passes the window that layer's cache and the tree mask differ in size (the
    first verification step fails with a tensor-size mismatch); linear-attention and
    state-space layers keep no per-token cache to crop at all.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        # Where a config lists its layers' kinds, they alone decide: Qwen2 with use_sliding_window
        # set but max_window_layers past its depth has only full-attention layers.
        odd = sorted(set(layer_types) - {"full_attention"})
        return f"layer types {odd} (only full-attention layers are supported)" if odd else None
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention (window {config.sliding_window})"
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention"
    return None


def check_engine_supports(config, path: Path) -> None:
    reason = unsupported_attention(config)
    if reason is not None:
        raise ModelLoadError(
            f"model {str(path)!r} ({getattr(config, 'model_type', '?')}): the decoding engine does not support "
            f"{reason}: its tree verification would fail once a prompt passes the window. Use a checkpoint whose "
            f"layers all use full attention"
        )


def check_chat_template(tokenizer, path: Path) -> None:
    """Prompts are rendered with the model's own chat template (common/prompt_tokens.py)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"tokenizer of {str(path)!r} has no chat template: prompts could only be sent raw. Use an instruct "
            f"checkpoint whose tokenizer_config.json (or GGUF metadata) carries `chat_template`"
        )
