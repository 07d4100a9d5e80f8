"""bench/load.py's figures: per-window p99, per-task targets, and one request order across windows."""

from __future__ import annotations

from adaccel.v1 import common_pb2
from bench.load import Sample, WindowFigures, Workload, windows


def sample(sent_s: float, ttft_s: float, task: str = "a", code: str = "OK") -> Sample:
    return Sample(sent_s, ttft_s, ttft_s + 0.1, code, task=task)


def test_a_stall_shows_in_its_window_and_not_in_the_others():
    samples = [sample(t, 0.05) for t in range(0, 30)] + [sample(12.0 + i / 10, 12.4) for i in range(5)]
    by_window = windows(samples, 10.0)
    assert [w["start_s"] for w in by_window] == [0.0, 10.0, 20.0]
    assert [w["ttft_p99_s"] for w in by_window] == [0.05, 12.4, 0.05]
    assert by_window[1]["requests"] == 15


def test_targets_are_per_task_and_a_miss_names_the_task():
    samples = [sample(i, 0.5, "short") for i in range(50)] + [sample(i, 4.0, "long") for i in range(50)]
    figures = WindowFigures.of(1.0, samples, 60.0, 60.0, 2.0)
    assert figures.keeps({"short": 1.5, "long": 12.0})
    # One target for the mix would fail the long prompts' own prefill, not a queue.
    assert figures.misses({"short": 1.5, "long": 1.5}) == {"long": 4.0}
    assert not figures.keeps({"short": 1.5, "long": 1.5})


def test_every_window_continues_the_workload_where_the_last_one_stopped():
    requests = [common_pb2.GenerateRequest(pool_key=str(i)) for i in range(5)]
    workload = Workload(requests, ["x"] * 5)
    first = [workload.next(f"a{i}")[0].pool_key for i in range(3)]
    second = [workload.next(f"b{i}")[0].pool_key for i in range(4)]
    assert first == ["0", "1", "2"] and second == ["3", "4", "0", "1"]
    assert requests[0].request_id == ""  # copies are sent, the list is not changed
