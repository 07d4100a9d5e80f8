"""Convert a GGUF file into a normal Hugging Face checkpoint, with transformers' own GGUF loader.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=name)`, needs the `gguf`
package), de-quantizes its tensors to float and builds the tokenizer, with its chat template,
from the file's metadata. The loaded model still carries the GGUF quantizer marker, and
`save_pretrained` refuses such a model; once the marker is gone it saves plain safetensors.

The conversion checks itself before it lands: the saved checkpoint is loaded again the way every
service loads a model (common/modeling/loading.py) and must greedy-decode exactly the tokens the
model loaded straight from the GGUF decodes, on the check prompts. Everything is written to a
temporary sibling directory and renamed into place only then, so a failed or interrupted
conversion never leaves a half-written model directory.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common.modeling.loading import (
    CARD_FILE,
    ModelLoadError,
    check_chat_template,
    check_engine_supports,
    load_model,
)


def load_gguf(gguf_path: Path):
    """(model, tokenizer) straight from a GGUF file, float32; ModelLoadError names the file."""
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf_path)!r} does not exist")
    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many kinds (ValueError, KeyError, struct/numpy errors)
        raise ModelLoadError(
            f"GGUF file {str(gguf_path)!r} cannot be read ({type(exc).__name__}: {exc}): it is truncated, corrupt "
            f"or of an architecture transformers cannot load from GGUF"
        ) from exc
    check_engine_supports(model.config, gguf_path)
    check_chat_template(tokenizer, gguf_path)
    model.eval()
    return model, tokenizer


def drop_gguf_marker(model) -> None:
    """What makes save_pretrained refuse ("quantized with gguf and is not serializable"): the
    weights are already de-quantized floats, only the marker says otherwise."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF's own name for the model (e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2") is not a path.
    model.config._name_or_path = ""


def chat_ids(tokenizer, user_text: str) -> list[int]:
    messages = [{"role": "user", "content": user_text}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))


@torch.inference_mode()
def greedy_tokens(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    outputs = []
    for ids in prompt_ids:
        inputs = torch.tensor([list(ids)])
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        outputs.append(out[0, inputs.shape[1]:].tolist())
    return outputs


def convert_gguf(gguf_path: Path, model_dir: Path, card: dict, *, check_prompts: Sequence[str],
                 check_tokens: int = 16) -> dict:
    """Writes model_dir (safetensors, tokenizer with chat template, generation config, card) from
    gguf_path; returns the card as written, with the self-check's figures."""
    started = time.perf_counter()
    print(f"loading and de-quantizing {gguf_path.name} (transformers' GGUF loader)", flush=True)
    model, tokenizer = load_gguf(gguf_path)
    eos = tokenizer.eos_token_id
    prompts = [chat_ids(tokenizer, text) for text in check_prompts]
    expected = greedy_tokens(model, prompts, check_tokens, eos)
    load_s = time.perf_counter() - started

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        drop_gguf_marker(model)
        model.generation_config = GenerationConfig(
            bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=eos, do_sample=False
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        reloaded = load_model(tmp)
        got = greedy_tokens(reloaded.model, prompts, check_tokens, eos)
        if got != expected:
            raise ModelLoadError(
                f"converted checkpoint {tmp} does not greedy-decode as {gguf_path.name} does "
                f"(first difference on check prompt {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}): "
                f"not installed"
            )
        params = sum(p.numel() for p in reloaded.model.parameters())
        config = reloaded.model.config
        card = {
            **card,
            "random_weights": False,
            "arch": config.model_type,
            "params": params,
            "layers": config.num_hidden_layers,
            "attention_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "dtype": "float32",
            "conversion": {
                "tool": "transformers GGUF loader (from_pretrained(gguf_file=...)), saved as safetensors",
                "check_prompts": len(prompts),
                "check_tokens": check_tokens,
                "greedy_identical_to_gguf": True,
                "sample": reloaded.tokenizer.decode(got[0], skip_special_tokens=True),
                "convert_s": round(time.perf_counter() - started, 1),
                "gguf_load_s": round(load_s, 1),
            },
        }
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The old directory moves aside before the new one moves in: at every instant model_dir is
    # either the old model, absent, or the new one, never a mixture.
    old = model_dir.with_name(model_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)
    return card
