"""JSONL export: round trip, the documented format, bad lines, GenerateRequest conversion."""

from __future__ import annotations

import json

import pytest

from adaccel.v1 import common_pb2
from common.workload.assemble import build_workload
from common.workload.export import (
    INVENTORY_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    PROMPTS_FILE,
    USERS_FILE,
    WorkloadFormatError,
    iter_prompts,
    load_prompts,
    read_manifest,
    save_prompts,
    to_generate_request,
    write_workload,
)
from common.workload.settings import WorkloadSettings

TINY = WorkloadSettings(
    num_items=120, num_users=30, inventory_events=10,
    item_knowledge_warm=8, item_knowledge_heldout=3, user_summary_warm=4, user_summary_heldout=2,
    generative_rec_warm=2, generative_rec_heldout=2, rec_candidates=(3, 5), train_rec_prompts=2,
)


def _prompt_line(task="user_summary", split="warm", kind="text") -> str:
    """A minimal prompt line (no prompt_id, no reference)."""
    blocks = [{"id": "q", "kind": kind, "text": "hi\n"}]
    line = {"type": "prompt", "task": task, "split": split, "pool_key": "users/x", "blocks": blocks}
    return json.dumps(line)


@pytest.fixture(scope="module")
def workload():
    return build_workload(TINY)


def test_save_then_load_round_trips(tmp_path, workload):
    path = tmp_path / "prompts.jsonl"
    save_prompts(path, workload.prompts, workload.warmups)
    prompts, warmups = load_prompts(path)
    assert tuple(prompts) == workload.prompts
    assert tuple(warmups) == workload.warmups


def test_lines_follow_the_documented_format(tmp_path, workload):
    path = tmp_path / "prompts.jsonl"
    save_prompts(path, workload.prompts, workload.warmups)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    prompt_keys = {
        "type", "prompt_id", "task", "split", "pool_key", "item_ids", "user_ids", "blocks", "reference"
    }
    assert {tuple(sorted(line)) for line in lines} == {
        tuple(sorted(prompt_keys)), ("pool_key", "text", "type")
    }
    first = lines[0]
    assert first["type"] == "prompt"
    assert set(first["blocks"][0]) == {"id", "kind", "text"}


def test_iter_prompts_filters(tmp_path, workload):
    path = tmp_path / "prompts.jsonl"
    save_prompts(path, workload.prompts, workload.warmups)
    heldout_items = list(iter_prompts(path, task="item_knowledge", split="heldout"))
    assert len(heldout_items) == TINY.item_knowledge_heldout


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ('{"type": "other"}', "type must be"),
        (_prompt_line(task="x"), "task must be"),
        (_prompt_line(kind="image"), "block kind"),
        ('{"type": "prompt", "task": "user_summary", "split": "warm", "pool_key": "p"}', "blocks"),
        ('{"type": "warmup", "pool_key": 3, "text": "t"}', "warmup"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "warmup", "pool_key": "p", "text": "ok"}\n' + line + "\n")
    with pytest.raises(WorkloadFormatError, match=message) as excinfo:
        load_prompts(path)
    assert f"{path}:2" in str(excinfo.value)


def test_prompt_id_is_optional_when_reading(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(_prompt_line(split="heldout") + "\n")
    prompts, _ = load_prompts(path)
    assert prompts[0].prompt_id == "line-1" and prompts[0].reference == ""


def test_to_generate_request(workload):
    prompt = next(p for p in workload.prompts if p.task == "generative_rec")
    params = common_pb2.GenerationParams(max_new_tokens=64, mode=common_pb2.VERIFICATION_MODE_RELAXED)
    request = to_generate_request(prompt, params=params, publish=True)
    assert request.request_id == prompt.prompt_id and request.pool_key == prompt.pool_key and request.publish
    assert [b.text for b in request.blocks] == [b.text for b in prompt.blocks]
    assert [b.id for b in request.blocks] == [b.id for b in prompt.blocks]
    kinds = [b.kind for b in request.blocks]
    assert kinds[0] == common_pb2.BLOCK_KIND_INSTRUCTION and kinds[1] == common_pb2.BLOCK_KIND_USER_HISTORY
    assert kinds[-1] == common_pb2.BLOCK_KIND_TEXT and set(kinds[2:-1]) == {common_pb2.BLOCK_KIND_ITEM}
    assert request.params.max_new_tokens == 64
    assert to_generate_request(prompt, request_id="r1").request_id == "r1"


def test_write_workload_writes_every_file(tmp_path, workload):
    write_workload(tmp_path, workload, {"workload_hash": "abc"})
    for name in (PROMPTS_FILE, ITEMS_FILE, USERS_FILE, INVENTORY_FILE, MANIFEST_FILE):
        assert (tmp_path / name).is_file()
    assert read_manifest(tmp_path) == {"workload_hash": "abc"}
    items = [json.loads(line) for line in (tmp_path / ITEMS_FILE).read_text().splitlines()]
    assert len(items) == TINY.num_items
    assert sum(i["heldout"] for i in items) == len(workload.catalog.heldout_item_ids)
    events = [json.loads(line) for line in (tmp_path / INVENTORY_FILE).read_text().splitlines()]
    assert [e["seq"] for e in events] == list(range(TINY.inventory_events))
    assert not list(tmp_path.glob("*.tmp"))
