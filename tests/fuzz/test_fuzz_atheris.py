"""Runs the coverage-guided fuzzer (atheris) over the pool and kv-store boundaries in a child process:
libFuzzer ends its process when done, and a crash must not take pytest down with it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import atheris  # noqa: F401 - the child process fuzzes with it; pinned, so a missing fuzzer fails here, never skips

from adaccel.v1 import kvstore_pb2, pool_pb2
from common.blocks.kv_codec import checksum
from tests.fuzz.atheris_target import METHODS

RUNS = 3000


def seed_corpus() -> list[bytes]:
    """One valid request per method (first byte = method index), so mutation starts from the real format."""
    data = b"\x00" * 16
    header = kvstore_pb2.KvChunk(header=kvstore_pb2.KvHeader(block_hash=b"h" * 8, model_id="m", dtype="uint8",
                                                             shape=[16], total_bytes=16, checksum=checksum(data)))
    bodies = {
        "RetrieveDrafts": pool_pb2.RetrieveDraftsRequest(pool_key="shop", context=[1, 2, 3]).SerializeToString(),
        "GetSnapshot": pool_pb2.SnapshotRequest(pool_key="shop").SerializeToString(),
        "Insert": pool_pb2.InsertRequest(pool_key="shop", item_id="it-1", sequences=[
            pool_pb2.TokenSequence(token_ids=[1, 2, 3, 4, 5])]).SerializeToString(),
        "DeleteItem": pool_pb2.DeleteItemRequest(item_id="it-1").SerializeToString(),
        "GetVersions": pool_pb2.VersionsRequest(pool_keys=["shop"]).SerializeToString(),
        "Get": kvstore_pb2.GetRequest(block_hash=b"h" * 8, model_id="m").SerializeToString(),
        "Contains": kvstore_pb2.ContainsRequest(block_hashes=[b"h" * 8], model_id="m").SerializeToString(),
        "Put": header.SerializeToString() + b"\xfe" + kvstore_pb2.KvChunk(data=data).SerializeToString(),
    }
    return [bytes([i]) + bodies[method.rsplit("/", 1)[1]] for i, (_, method, _) in enumerate(METHODS)]


def test_coverage_guided_fuzzing_finds_no_crash(tmp_path, tally):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seed_corpus()):
        (corpus / f"seed-{i}").write_bytes(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.atheris_target", str(tmp_path / "data"), f"-runs={RUNS}", "-seed=7",
         f"-max_len={64 * 1024}", f"-rss_limit_mb={2048}", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=240, env=env)
    done = re.search(r"Done (\d+) runs", result.stderr)
    t = tally("atheris.pool+kvstore")
    t.inputs = int(done.group(1)) if done else 0
    if result.returncode != 0:
        t.crashes.append((b"", result.stderr[-3000:]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert t.inputs >= RUNS
