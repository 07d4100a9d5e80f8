"""Pools as a running deployment holds them: the model's own answers to earlier requests.

A deployment's pools fill with what its decoders generated and published (topic
adaccel.generated, inserted by the pool updater). A fresh one has none, and the workload's
reference texts are not what a real model writes, so `make model` decodes the model's greedy
answers to warm-split prompts here, once per model, and stores them as generated records:

    python -m services.decoder.warm_answers --data-dir DIR [--per-segment N]

writes DIR/warm_answers/<model_id>.jsonl, one GeneratedRecord as JSON per line (request id, pool
key, item and user ids, token ids, text, model id; format in common/warm_answers.py). `make run`
publishes them to adaccel.generated before its job, so they enter the pools through the same
updater path as live traffic. Held-out prompts never enter. Decoding is strict (output = greedy)
with continuous batching.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from common.modeling.default_model import default_model_path
from common.warm_answers import WarmAnswer, answers_path, read_answers, write_answers


def warm_segments(prompts) -> dict[tuple[str, str], list]:
    """Warm-split prompts by (pool key, task), in workload order: traffic of every task flows back."""
    by_segment: dict[tuple[str, str], list] = defaultdict(list)
    for prompt in prompts:
        if prompt.split == "warm":
            by_segment[(prompt.pool_key, prompt.task)].append(prompt)
    return by_segment


def pick_warm_prompts(prompts, per_segment: int, *, already: int = 0, tasks: Iterable[str] | None = None) -> list:
    """Up to `per_segment` warm prompts of every (pool key, task) after the first `already`."""
    wanted = set(tasks) if tasks is not None else None
    by_segment = warm_segments(prompts)
    return [p for key in sorted(by_segment) if wanted is None or key[1] in wanted
            for p in by_segment[key][already:per_segment]]


def decode_greedy_batched(engine, token_ids: Sequence[Sequence[int]], pools: Sequence, max_new_tokens: int,
                          eos_token_id: int | None, *, rows: int = 16,
                          on_done: Callable[[int, list[int]], None], progress: tqdm | None = None) -> None:
    """Strict decoding of every prompt with continuous batching (a finished row's place goes to
    the next prompt); on_done(index, generated ids, EOS included when emitted, as a decoder
    publishes them) as each finishes. Prompts of
    similar length share a batch: a row's cache is as wide as the batch's longest prompt."""
    from services.decoder.engine import GenerationConfig
    from services.decoder.engine.engine import BatchSession

    session = BatchSession(engine)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    waiting = iter(sorted(range(len(token_ids)), key=lambda i: len(token_ids[i])))
    index_of: dict[int, int] = {}

    def finish(handle) -> None:
        generated = list(handle.tokens[handle.prompt_length:])
        on_done(index_of.pop(id(handle)), generated)
        if progress is not None:
            progress.update(1)

    def fill() -> None:
        while session.rows < rows:
            i = next(waiting, None)
            if i is None:
                return
            handle = session.add(list(token_ids[i]), config, pools[i])
            index_of[id(handle)] = i
            if handle.done:
                finish(handle)

    fill()
    while session.rows:
        for handle, _ in session.step():
            if handle.done and id(handle) in index_of:
                finish(handle)
        fill()


def generate_warm_answers(loaded, prompts, *, max_new_tokens: int, rows: int = 16) -> list[WarmAnswer]:
    """The model's greedy answers to `prompts`, rendered as the decoder renders them; each
    answer is learnt into its pool's in-memory trie as it finishes, so later answers draft from
    earlier ones as in a deployment."""
    from common.drafting.pools import PoolRegistry
    from common.prompt_tokens import tokenize_chat
    from services.decoder.engine import DecodingEngine, EngineSettings

    engine = DecodingEngine(loaded.model, EngineSettings(learn_from_outputs=True))
    registry = PoolRegistry()
    token_ids = [tokenize_chat(loaded.tokenizer, [b.text for b in p.blocks], p.system_blocks).token_ids
                 for p in prompts]
    pools = [registry.get_or_create(p.pool_key) for p in prompts]
    answers: list[WarmAnswer | None] = [None] * len(prompts)

    def on_done(i: int, generated: list[int]) -> None:
        p = prompts[i]
        answers[i] = WarmAnswer(
            request_id=request_id_of(p), pool_key=p.pool_key, task=p.task,
            item_ids=tuple(b.id for b in p.blocks if b.kind == "item"),
            user_ids=tuple(b.id for b in p.blocks if b.kind == "user_history"),
            token_ids=tuple(generated), text=loaded.tokenizer.decode(generated, skip_special_tokens=True),
            model_id=loaded.model_id, max_new_tokens=max_new_tokens)

    with tqdm(total=len(prompts), desc="model's answers to warm prompts", unit="prompt") as bar:
        decode_greedy_batched(engine, token_ids, pools, max_new_tokens, loaded.tokenizer.eos_token_id, rows=rows,
                              on_done=on_done, progress=bar)
    return [a for a in answers if a is not None]


def request_id_of(prompt) -> str:
    return f"warm-{prompt.prompt_id}"


def stored_or_decoded_answers(loaded, prompts, max_new_tokens: int, *, rows: int = 16,
                              data_dir: Path | None = None) -> tuple[list[WarmAnswer], int]:
    """Answers to `prompts` in their order: the stored ones (same model, same limit) and the rest
    decoded now and added to the store; returns (answers, how many were decoded now)."""
    path = answers_path(data_dir, loaded.model_id) if data_dir is not None else None
    stored = read_answers(path) if path is not None else []
    usable = {a.request_id: a for a in stored if a.max_new_tokens == max_new_tokens}
    missing = [p for p in prompts if request_id_of(p) not in usable]
    decoded = generate_warm_answers(loaded, missing, max_new_tokens=max_new_tokens, rows=rows) if missing else []
    if decoded and path is not None:
        kept = [a for a in stored if a.request_id not in {d.request_id for d in decoded}]
        write_answers(path, kept + decoded)
    usable.update({a.request_id: a for a in decoded})
    return [usable[request_id_of(p)] for p in prompts if request_id_of(p) in usable], len(decoded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.decoder.warm_answers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model-path", type=Path, default=None, help="default: <data-dir>/models/smollm2-135m-instruct")
    parser.add_argument("--per-segment", type=int, default=1, help="warm prompts per (pool key, task)")
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16, help="rows decoded together")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--force", action="store_true", help="decode again even when the file has enough answers")
    args = parser.parse_args(argv)

    import torch

    from common.modeling.loading import load_model, read_model_card
    from common.workload.export import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model_path or default_model_path(args.data_dir)
    model_id = read_model_card(model_path).get("model_id", model_path.name)
    workload = args.data_dir / "workload" / "prompts.jsonl"
    prompts, _ = load_prompts(workload)
    wanted = pick_warm_prompts(prompts, args.per_segment, tasks=args.tasks)
    path = answers_path(args.data_dir, model_id)
    if args.force and path.is_file():
        path.unlink()
    have = {a.request_id for a in read_answers(path) if a.max_new_tokens == args.max_new_tokens}
    if have >= {request_id_of(p) for p in wanted}:
        print(f"{path} holds answers to all {len(wanted)} warm prompts ({args.per_segment} per pool key and task); "
              f"nothing to do")
        return 0
    torch.manual_seed(0)
    loaded = load_model(model_path)
    started = time.perf_counter()
    answers, decoded = stored_or_decoded_answers(loaded, wanted, args.max_new_tokens, rows=args.rows,
                                                 data_dir=args.data_dir)
    tokens = sum(len(a.token_ids) for a in answers[-decoded:]) if decoded else 0
    wall = time.perf_counter() - started
    print(f"wrote {path}: {decoded} answers decoded now ({len(answers)} in all), {tokens} tokens in {wall:.0f}s "
          f"({tokens / max(wall, 1e-9):.1f} tok/s)")
    if answers:
        print(f"e.g. [{answers[0].task}] {answers[0].text[:200]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
