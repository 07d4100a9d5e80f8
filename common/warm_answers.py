"""The warm-answers file: the model's own answers to warm-split prompts, one JSON line each.

`make model` decodes them (services/decoder/warm_answers.py) into
<data-dir>/warm_answers/<model_id>.jsonl; the main job publishes them to the generated-text topic
as the GeneratedRecords a decoder would have published, so they enter the pools through the
pool updater as live generations do. This module is the file's one definition, for both sides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WARM_DIR = "warm_answers"


@dataclass(slots=True, frozen=True)
class WarmAnswer:
    request_id: str
    pool_key: str
    task: str
    item_ids: tuple[str, ...]
    user_ids: tuple[str, ...]
    token_ids: tuple[int, ...]
    text: str
    model_id: str
    max_new_tokens: int  # the limit it was decoded under: an answer cut there is reused only under it

    def to_json(self) -> str:
        return json.dumps({"request_id": self.request_id, "pool_key": self.pool_key, "task": self.task,
                           "item_ids": list(self.item_ids), "user_ids": list(self.user_ids),
                           "token_ids": list(self.token_ids), "text": self.text, "model_id": self.model_id,
                           "max_new_tokens": self.max_new_tokens})

    @classmethod
    def from_json(cls, line: str) -> WarmAnswer:
        raw = json.loads(line)
        return cls(raw["request_id"], raw["pool_key"], raw["task"], tuple(raw["item_ids"]), tuple(raw["user_ids"]),
                   tuple(raw["token_ids"]), raw["text"], raw["model_id"], raw["max_new_tokens"])

    def record(self):
        """The GeneratedRecord a decoder would have published for this answer."""
        from adaccel.v1 import records_pb2

        return records_pb2.GeneratedRecord(request_id=self.request_id, pool_key=self.pool_key, task=self.task,
                                           item_ids=self.item_ids, user_ids=self.user_ids,
                                           token_ids=self.token_ids, text=self.text, model_id=self.model_id)


def answers_path(data_dir: Path, model_id: str) -> Path:
    return data_dir / WARM_DIR / f"{model_id}.jsonl"


def read_answers(path: Path) -> list[WarmAnswer]:
    if not path.is_file():
        return []
    return [WarmAnswer.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def write_answers(path: Path, answers: Sequence[WarmAnswer]) -> None:
    """Whole file or nothing: written beside, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(a.to_json() + "\n" for a in answers))
    partial.replace(path)
