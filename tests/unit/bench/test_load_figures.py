"""bench/load.py's figures: per-window p99, targets by prompt length, one request order across windows."""

from __future__ import annotations

from adaccel.v1 import common_pb2
from bench.load import Sample, TtftTarget, WindowFigures, Workload, windows


def sample(sent_s: float, ttft_s: float, task: str = "a", code: str = "OK") -> Sample:
    return Sample(sent_s, ttft_s, ttft_s + 0.1, code, task=task)


def test_a_stall_shows_in_its_window_and_not_in_the_others():
    samples = [sample(t, 0.05) for t in range(30)] + [sample(12.0 + i / 10, 12.4) for i in range(5)]
    by_window = windows(samples, 10.0)
    assert [w["start_s"] for w in by_window] == [0.0, 10.0, 20.0]
    assert [w["ttft_p99_s"] for w in by_window] == [0.05, 12.4, 0.05]
    assert by_window[1]["requests"] == 15


def test_a_request_s_target_scales_with_its_prompt_and_a_window_keeps_it_by_the_ratio():
    target = TtftTarget.fit([(400, 0.5), (800, 0.9), (4000, 4.1), (10000, 10.1)])
    assert abs(target.low_load_s(6000) - 6.1) < 0.05
    short = [Sample(i, 1.2, 1.3, "OK", prompt_chars=400, task="item") for i in range(50)]
    long = [Sample(i, 14.0, 15.0, "OK", prompt_chars=6000, task="rec") for i in range(50)]
    # A 14 s TTFT is within 3x of a 6,000-character prompt's 6.1 s; one figure for the mix would not be.
    figures = WindowFigures.of(1.0, short + long, 60.0, 60.0, 2.0, target)
    assert figures.over_target_p99 < 1.0 and figures.keeps()
    assert not WindowFigures.of(1.0, short + long, 60.0, 60.0, 2.0, TtftTarget(fixed_s=3.0)).keeps()
    queued = [Sample(i, 2.5, 2.6, "OK", prompt_chars=400) for i in range(5)]  # 5x its 0.5 s
    assert WindowFigures.of(1.0, short + queued, 60.0, 60.0, 2.0, target).over_target_p99 > 1.0


def test_every_window_continues_the_workload_where_the_last_one_stopped():
    requests = [common_pb2.GenerateRequest(pool_key=str(i)) for i in range(5)]
    workload = Workload(requests, ["x"] * 5)
    first = [workload.next(f"a{i}")[0].pool_key for i in range(3)]
    second = [workload.next(f"b{i}")[0].pool_key for i in range(4)]
    assert first == ["0", "1", "2"] and second == ["3", "4", "0", "1"]
    assert requests[0].request_id == ""  # copies are sent, the list is not changed
