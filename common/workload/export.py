"""The workload on disk (JSONL) and as router requests (adaccel.v1.GenerateRequest).

`<data-dir>/workload/` holds:

  prompts.jsonl    one JSON object per line, of two types:
      {"type": "prompt", "prompt_id": str,
       "task": "item_knowledge" | "user_summary" | "generative_rec",
       "split": "warm" | "heldout", "pool_key": str,
       "item_ids": [str], "user_ids": [str],
       "blocks": [{"id": str, "kind": "instruction" | "user_history" | "item" | "text", "text": str}],
       "reference": str}
      {"type": "warmup", "pool_key": str, "text": str}
    The prompt text is the concatenation of the block texts, in order; `reference` is the
    writer's answer. Warm-up lines are the warm prompts' references, to warm draft pools;
    benchmarks decode the held-out prompts. `prompt_id` is optional when reading.
  items.jsonl      the catalog snapshot, one item per line (+ "heldout": bool).
  users.jsonl      users with interests and clicks, oldest first (+ "heldout": bool).
  inventory.jsonl  the inventory timeline: {"seq", "time_s", "kind": "added" | "changed" |
                   "removed", "item_id", "item": {...} | null}, what the inventory topic carries.
  manifest.json    the settings and counts the files were written from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from adaccel.v1 import common_pb2
from common.workload.assemble import Warmup, Workload
from common.workload.blocks import BLOCK_KINDS, TASKS, Block
from common.workload.catalog import InventoryEvent, Item
from common.workload.prompts import Prompt

PROMPTS_FILE = "prompts.jsonl"
ITEMS_FILE = "items.jsonl"
USERS_FILE = "users.jsonl"
INVENTORY_FILE = "inventory.jsonl"
MANIFEST_FILE = "manifest.json"

SPLITS = ("warm", "heldout")

_PB_KINDS = {
    "instruction": common_pb2.BLOCK_KIND_INSTRUCTION,
    "user_history": common_pb2.BLOCK_KIND_USER_HISTORY,
    "item": common_pb2.BLOCK_KIND_ITEM,
    "text": common_pb2.BLOCK_KIND_TEXT,
}


class WorkloadFormatError(ValueError):
    """A workload line that does not follow the documented format; names file, line and field."""


# ---- records <-> JSON ----------------------------------------------------------------------


def prompt_to_json(prompt: Prompt) -> dict:
    return {
        "type": "prompt",
        "prompt_id": prompt.prompt_id,
        "task": prompt.task,
        "split": prompt.split,
        "pool_key": prompt.pool_key,
        "item_ids": list(prompt.item_ids),
        "user_ids": list(prompt.user_ids),
        "blocks": [{"id": b.id, "kind": b.kind, "text": b.text} for b in prompt.blocks],
        "reference": prompt.reference,
    }


def warmup_to_json(warmup: Warmup) -> dict:
    return {"type": "warmup", "pool_key": warmup.pool_key, "text": warmup.text}


def prompt_from_json(obj: dict, where: str = "prompt") -> Prompt:
    try:
        blocks = tuple(Block(id=str(b["id"]), kind=b["kind"], text=b["text"]) for b in obj["blocks"])
        prompt = Prompt(
            prompt_id=str(obj.get("prompt_id", "")),
            task=obj["task"],
            split=obj["split"],
            pool_key=str(obj["pool_key"]),
            item_ids=tuple(obj.get("item_ids", ())),
            user_ids=tuple(obj.get("user_ids", ())),
            blocks=blocks,
            reference=str(obj.get("reference", "")),
        )
    except (KeyError, TypeError) as exc:
        raise WorkloadFormatError(f"{where}: missing or malformed field {exc}") from exc
    if prompt.task not in TASKS:
        raise WorkloadFormatError(f"{where}: task must be one of {TASKS}, got {prompt.task!r}")
    if prompt.split not in SPLITS:
        raise WorkloadFormatError(f"{where}: split must be one of {SPLITS}, got {prompt.split!r}")
    if not blocks:
        raise WorkloadFormatError(f"{where}: blocks must not be empty")
    for block in blocks:
        if block.kind not in BLOCK_KINDS:
            raise WorkloadFormatError(f"{where}: block kind must be one of {BLOCK_KINDS}, got {block.kind!r}")
    return prompt


# ---- prompts.jsonl -------------------------------------------------------------------------


def save_prompts(path: Path, prompts: Iterable[Prompt], warmups: Iterable[Warmup]) -> None:
    """Writes prompt lines, then warm-up lines (to a temporary file, renamed at the end)."""
    _write_jsonl(path, [*(prompt_to_json(p) for p in prompts), *(warmup_to_json(w) for w in warmups)])


def load_prompts(path: Path) -> tuple[list[Prompt], list[Warmup]]:
    """Reads a prompts.jsonl file; raises WorkloadFormatError naming the bad line."""
    prompts: list[Prompt] = []
    warmups: list[Warmup] = []
    for line_no, obj in _read_jsonl(path):
        where = f"{path}:{line_no}"
        kind = obj.get("type")
        if kind == "prompt":
            prompt = prompt_from_json(obj, where)
            if not prompt.prompt_id:
                prompt = dataclasses.replace(prompt, prompt_id=f"line-{line_no}")
            prompts.append(prompt)
        elif kind == "warmup":
            if not isinstance(obj.get("pool_key"), str) or not isinstance(obj.get("text"), str):
                raise WorkloadFormatError(f"{where}: a warmup needs string pool_key and text")
            warmups.append(Warmup(pool_key=obj["pool_key"], text=obj["text"]))
        else:
            raise WorkloadFormatError(f"{where}: type must be 'prompt' or 'warmup', got {kind!r}")
    return prompts, warmups


def iter_prompts(path: Path, *, task: str | None = None, split: str | None = None) -> Iterator[Prompt]:
    """Streams prompts of one task and/or split without holding the whole file."""
    for line_no, obj in _read_jsonl(path):
        if obj.get("type") != "prompt":
            continue
        if (task is None or obj.get("task") == task) and (split is None or obj.get("split") == split):
            yield prompt_from_json(obj, f"{path}:{line_no}")


# ---- requests ------------------------------------------------------------------------------


def to_generate_request(
    prompt: Prompt,
    *,
    request_id: str | None = None,
    params: common_pb2.GenerationParams | None = None,
    publish: bool = False,
) -> common_pb2.GenerateRequest:
    """The router request for a prompt: its blocks in order, its pool key and task, the given params."""
    request = common_pb2.GenerateRequest(
        request_id=request_id if request_id is not None else prompt.prompt_id,
        pool_key=prompt.pool_key,
        task=prompt.task,
        publish=publish,
    )
    for block in prompt.blocks:
        request.blocks.append(
            common_pb2.PromptBlock(id=block.id, kind=_PB_KINDS[block.kind], text=block.text)
        )
    if params is not None:
        request.params.CopyFrom(params)
    return request


# ---- the whole workload directory ----------------------------------------------------------


def item_to_json(item: Item) -> dict:
    obj = dataclasses.asdict(item)
    obj["attributes"] = {label: value for label, value in item.attributes}
    return obj


def item_from_json(obj: dict, where: str = "item") -> Item:
    """An items.jsonl line back into an Item (the "heldout" flag is the file's, not the item's)."""
    try:
        fields = {name: obj[name] for name in ("item_id", "vertical", "category", "title", "brand",
                                               "price_band", "audience", "popularity")}
        attributes = tuple((str(label), str(value)) for label, value in obj["attributes"].items())
    except (KeyError, AttributeError, TypeError) as exc:
        raise WorkloadFormatError(f"{where}: not an item ({exc!r})") from None
    return Item(attributes=attributes, **fields)


def load_items(directory: Path) -> list[Item]:
    """The catalog snapshot of a workload directory (items.jsonl)."""
    return [item_from_json(obj, f"{directory / ITEMS_FILE}:{line_no}")
            for line_no, obj in _read_jsonl(directory / ITEMS_FILE)]


def event_to_json(event: InventoryEvent) -> dict:
    return {
        "seq": event.seq,
        "time_s": event.time_s,
        "kind": event.kind,
        "item_id": event.item_id,
        "item": item_to_json(event.item) if event.item is not None else None,
    }


def write_workload(directory: Path, workload: Workload, manifest: dict) -> None:
    """Writes all workload files into `directory`; manifest.json last, so a directory with a
    manifest is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    catalog = workload.catalog
    save_prompts(directory / PROMPTS_FILE, workload.prompts, workload.warmups)
    _write_jsonl(
        directory / ITEMS_FILE,
        (
            {**item_to_json(item), "heldout": item.item_id in catalog.heldout_item_ids}
            for item in catalog.items
        ),
    )
    _write_jsonl(
        directory / USERS_FILE,
        (
            {
                "user_id": user.user_id,
                "segment": user.segment,
                "interests": {key: weight for key, weight in user.interests},
                "preferred_band": user.preferred_band,
                "clicks": list(user.clicks),
                "heldout": user.user_id in catalog.heldout_user_ids,
            }
            for user in catalog.users
        ),
    )
    _write_jsonl(directory / INVENTORY_FILE, (event_to_json(e) for e in catalog.inventory))
    _write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_jsonl(path: Path, objects: Iterable[dict]) -> None:
    _write_text(path, "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects))


def _write_text(path: Path, text: str) -> None:
    # Write-then-rename: a reader never sees half a file, a crash leaves the old one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadFormatError(f"{path}:{line_no}: not JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise WorkloadFormatError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj
