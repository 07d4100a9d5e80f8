"""What every benchmark shares: the machine's name, timing spread, results files."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common.modeling.default_model import default_model_path
from common.modeling.dtypes import DTYPE_CHOICES, serving_dtype

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def quick_run() -> bool:
    """BENCH_QUICK set (and not 0): a short run, for a first look or a smoke test."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over repeats: the CPU's speed drifts, so one figure alone misleads."""
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --model-path, --workload, --device and --dtype, as the benches that decode
    workload prompts take them."""
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--model-path", type=Path, default=None, help="default: <data-dir>/models/smollm2-135m-instruct")
    parser.add_argument("--workload", type=Path, default=None, help="default: <data-dir>/workload/prompts.jsonl")
    parser.add_argument("--device", default="cpu", help="torch device (cuda on a GPU)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="serving dtype: auto = bfloat16 on CUDA, float32 elsewhere (the decoder's setting)")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="only these tasks' prompts, timed and served (default: all; on a CPU, generative-rec "
                             "prompts of ~2,200 tokens take ~15 s each to prefill on the default model)")


def results_table(title: str, columns: Sequence[str]):
    """A rich table for a bench's console output: the first column (labels) left, figures right."""
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def bench_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A bench's argument parser: `python -m <module>`, its module docstring as the help text."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_model_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None, *,
                           threads: int = 2) -> argparse.Namespace:
    """Adds --threads and --results-dir, parses `argv` and resolves the model arguments
    (`add_model_arguments`): the closing steps of a model bench's argument parsing."""
    parser.add_argument("--threads", type=int, default=threads, help="torch threads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return resolve_model_arguments(parser.parse_args(argv))


def load_model_and_workload(args: argparse.Namespace):
    """(loaded model, workload prompts, warm-up texts) for a bench over workload prompts; seeds
    torch and applies --threads (0 = torch's default) first."""
    from common.modeling.loading import load_model
    from common.workload.export import load_prompts

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, warmups = load_prompts(args.workload)
    tasks = getattr(args, "tasks", None)
    if tasks:
        prompts = [p for p in prompts if p.task in tasks]
        keys = {p.pool_key for p in prompts}
        warmups = [w for w in warmups if w.pool_key in keys]
    device = getattr(args, "device", "cpu")
    dtype = serving_dtype(getattr(args, "dtype", "auto"), device)
    return load_model(args.model_path, device=device, dtype=dtype), prompts, warmups


def resolve_model_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fills --model-path and --workload from --data-dir where they were not given."""
    args.model_path = args.model_path or default_model_path(args.data_dir)
    args.workload = args.workload or args.data_dir / "workload" / "prompts.jsonl"
    return args


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A workload prompt's token ids as the decoder renders it: blocks tokenized one by one,
    through the model's chat template when it has one."""
    from common.prompt_tokens import tokenize_chat

    return tokenize_chat(tokenizer, [block.text for block in prompt.blocks], prompt.system_blocks).token_ids


def figure(rows: int = 1, columns: int = 1, *, size: tuple[float, float] = (6.4, 4.0)):
    """(fig, axes) for a results plot, on the file-only backend (these machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=size)


def save_figure(fig, path: Path, *, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def command_line() -> str:
    """The command this run was started with (sizes shrunk for a CPU are read off it)."""
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return " ".join([program, *sys.argv[1:]])


def model_provenance(model_path: Path | str) -> dict:
    """What a results file says of its model: id, size and where it came from (its card)."""
    from common.modeling.card import read_model_card

    card = read_model_card(Path(model_path))
    return {"model_id": card.get("model_id", Path(model_path).name), "params": card.get("params"),
            "random_weights": bool(card.get("random_weights", False)), "provenance": card.get("provenance"),
            "path": str(model_path)}


def write_results(name: str, results: dict, results_dir: Path = RESULTS_DIR, *,
                  model_path: Path | str | None = None) -> Path:
    """Writes a results JSON, stamped with the time and (from `model_path`, else the results'
    own "model_path", else their "model" when that is a checkpoint directory) the model's provenance."""
    results_dir.mkdir(parents=True, exist_ok=True)
    named = str(results.get("model", ""))
    model_path = model_path or results.get("model_path") or (named if named and Path(named).is_dir() else None)
    stamp = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command_line()}
    if model_path:
        stamp["model_provenance"] = model_provenance(model_path)
    results = {**stamp, **results}
    path = results_dir / name
    path.write_text(json.dumps(results, indent=2))
    return path


class ItemFactChecker:
    """The ads check of item-knowledge answers, per method: of the facts (brand, category, price
    band, attribute values, audience) an answer states, the share its item's block holds
    (common/workload/answer_checks.py). Other tasks' prompts are not checked. `missing` says why
    nothing is checked (a workload without its catalog, items.jsonl)."""

    def __init__(self, workload_dir: Path, tokenizer, prompts) -> None:
        from common.workload.answer_checks import fact_vocabulary
        from common.workload.export import ITEMS_FILE, load_items

        self.tokenizer = tokenizer
        self.blocks = [next((b.text for b in p.blocks if b.kind == "item"), None) if p.task == "item_knowledge"
                       else None for p in prompts]
        self.missing = None if (workload_dir / ITEMS_FILE).exists() else f"no {workload_dir / ITEMS_FILE}"
        self.vocabulary = fact_vocabulary(load_items(workload_dir)) if self.missing is None else None

    def __call__(self, outputs: Sequence[Sequence[int]]) -> dict | None:
        """fact_precision over the item-knowledge answers among `outputs` (indexed like prompts)."""
        from common.workload.answer_checks import check_item_facts, fact_precision

        if self.vocabulary is None:
            return None
        checks = [check_item_facts(self.tokenizer.decode(list(o), skip_special_tokens=True), block, self.vocabulary)
                  for o, block in zip(outputs, self.blocks) if block is not None]
        return fact_precision(checks) if checks else None
