"""Timing loop and statistics. A fake clock makes the stopping rules exact, not timing-dependent."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from huse.benchmarks.stats import (
    concurrent_throughput,
    repeat_summary,
    round_ratios,
    summarize,
    throughput,
    time_fn,
)


class FakeClock:
    """A clock that only moves when the timed function says it took time."""

    def __init__(self, durations):
        self.now = 0.0
        self.calls = 0
        self._durations = durations

    def __call__(self) -> float:
        return self.now

    def fn(self) -> None:
        self.now += self._durations(self.calls)
        self.calls += 1


def test_summarize_matches_numpy_on_known_data():
    x = np.arange(1, 101, dtype=np.float64)  # 1..100
    s = summarize(x)
    assert s["n"] == 100
    assert s["min"] == 1 and s["max"] == 100
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(np.std(x, ddof=1))
    for p in (50, 90, 95, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(x, p))
    assert s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)


def test_summarize_scales_values_but_not_the_count():
    s = summarize([0.001, 0.002, 0.003], scale=1e3)
    assert s["p50"] == pytest.approx(2.0)
    assert s["n"] == 3


def test_summarize_rejects_empty_samples():
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_time_fn_stops_when_both_minimums_are_met_even_when_noisy():
    # Alternating 1/8 s and 1/2 s calls: no stability rule, so it stops at min_seconds / min_iters.
    clock = FakeClock(lambda i: 0.125 if i % 2 else 0.5)
    s = time_fn(clock.fn, warmup=3, min_iters=4, min_seconds=2.0, max_seconds=100, clock=clock)
    assert clock.calls == 3 + len(s)  # warmup calls happen but are not returned
    assert len(s) >= 4 and 2.0 <= float(np.sum(s)) <= 2.5


def test_time_fn_max_seconds_beats_min_iters_and_includes_warmup():
    # 1 s calls, 3 s budget: 2 warmup + 1 timed call fill it, although min_iters asks for 100.
    clock = FakeClock(lambda i: 1.0)
    s = time_fn(clock.fn, warmup=2, min_iters=100, min_seconds=0, max_seconds=3.0, clock=clock)
    assert len(s) == 1
    assert clock.now == 3.0


def test_time_fn_always_returns_a_sample():
    # Warmup alone exhausts the budget; one timed call is still made so callers get data.
    clock = FakeClock(lambda i: 5.0)
    s = time_fn(clock.fn, warmup=3, min_iters=10, max_seconds=1.0, clock=clock)
    assert len(s) == 1 and s[0] == 5.0


def test_time_fn_max_iters():
    clock = FakeClock(lambda i: 0.125)
    s = time_fn(clock.fn, warmup=0, min_iters=1, min_seconds=50, max_seconds=100, max_iters=7, clock=clock)
    assert len(s) == 7


def test_time_fn_real_clock_respects_max_seconds():
    start = time.perf_counter()
    s = time_fn(lambda: time.sleep(0.002), warmup=1, min_iters=10, min_seconds=30,
                max_seconds=0.2)
    # Generous bound: the point is that min_seconds=30 did not win.
    assert time.perf_counter() - start < 5
    assert np.all(s >= 0.002)


def test_repeat_summary_reports_relative_spread_of_medians():
    repeats = [np.full(11, 10.0), np.full(11, 11.0), np.full(11, 12.0)]
    r = repeat_summary(repeats, scale=1e3)
    assert r["n_repeats"] == 3
    assert r["medians"] == [10e3, 11e3, 12e3]
    assert r["median"] == 11e3
    assert r["spread"] == pytest.approx(2 / 11)
    assert r["p99_spread"] == pytest.approx(2 / 11)


def test_repeat_summary_of_one_run_has_unknown_spread():
    r = repeat_summary([np.array([1.0, 2.0, 3.0])])
    assert r["median"] == 2.0
    assert r["spread"] is None and r["p99_spread"] is None


def test_throughput():
    assert throughput(64, 0.5) == 128.0
    with pytest.raises(ValueError):
        throughput(1, 0)


def test_concurrent_throughput_runs_callers_at_the_same_time():
    callers = 3
    # Every caller's first timed call waits here until all callers are inside fn: if they
    # ran one after another the barrier would time out and the error would propagate.
    together = threading.Barrier(callers, timeout=10)
    seen, lock = set(), threading.Lock()
    warmed = threading.local()

    def fn():
        if not getattr(warmed, "done", False):
            warmed.done = True  # warmup call
            return
        with lock:
            first = threading.get_ident() not in seen
            seen.add(threading.get_ident())
        if first:
            together.wait()
        calls.append(1)
        time.sleep(0.001)

    calls: list[int] = []
    rate = concurrent_throughput(fn, items_per_call=4, callers=callers, seconds=0.2)
    assert len(seen) == callers
    # Counted items over at least the requested time: never more than calls*4/0.2.
    assert 0 < rate <= len(calls) * 4 / 0.2


def test_concurrent_throughput_with_one_callable_per_caller():
    counts = [0, 0]

    def make(i):
        def f():
            counts[i] += 1
        return f

    concurrent_throughput([make(0), make(1)], items_per_call=1, callers=2, seconds=0.05)
    assert counts[0] > 0 and counts[1] > 0
    with pytest.raises(ValueError, match="callables"):
        concurrent_throughput([make(0)], items_per_call=1, callers=2, seconds=0.05)


def test_concurrent_throughput_propagates_errors():
    def boom():
        raise RuntimeError("backend failed")

    with pytest.raises(RuntimeError, match="backend failed"):
        concurrent_throughput(boom, items_per_call=1, callers=2, seconds=0.05, warmup=0)
    with pytest.raises(RuntimeError, match="backend failed"):
        concurrent_throughput(boom, items_per_call=1, callers=2, seconds=0.05, warmup=1)


def test_round_ratios_compares_each_round_with_the_base_round():
    times = {"base": [2.0, 4.0, 3.0], "twice as fast": [1.0, 2.0, 1.5], "mixed": [4.0, 2.0, 3.0]}
    out = round_ratios(times, "base")
    assert out["twice as fast"] == {"median": 2.0, "range": [2.0, 2.0]}
    assert out["mixed"] == {"median": 1.0, "range": [0.5, 2.0]}
    assert set(round_ratios(times, "base", ["mixed"])) == {"mixed"}
