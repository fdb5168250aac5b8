"""Timing and statistics for huse-bench: bounded timing loops, percentiles, repeat spread.

The machines these numbers come from are shared and noisy, so the suite reports what survives
noise: percentiles rather than means, ratios between configurations measured side by side, and the
spread between repeated runs of the same configuration (which `compare` uses as its noise floor).

Everything here takes plain callables and arrays; nothing imports a backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

# Percentiles every summary reports; p99 is the tail a serving SLO is written against.
PERCENTILES = (50, 90, 95, 99)


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    min_iters: int = 10,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    max_iters: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> np.ndarray:
    """Time `fn()` call by call for at least `min_iters` calls and `min_seconds`, like trtexec's
    `--iterations`/`--duration`.

    Runs `warmup` untimed calls (first calls pay for lazy allocation, autotuning, page faults),
    then timed calls until both minimums hold. `max_seconds` and `max_iters` stop it regardless,
    so a slow call costs bounded time. Noise is handled by the callers (interleaved repeats).

    `fn` must block until its work is done: for an asynchronous GPU backend, synchronise the
    stream inside `fn`, or the samples measure only the launch.

    Args:
        fn: the call to time; its return value is ignored.
        warmup: untimed calls first.
        min_iters: fewest timed samples before stopping (unless `max_seconds` runs out first).
        min_seconds: least time spent in timed calls before stopping.
        max_seconds: wall-time budget for warmup and timing together, from the first call. The
            call in flight when it runs out is finished (and kept), and one timed call is always
            made, so the total can exceed it by the length of about two calls.
        max_iters: most timed samples, or None for no limit.
        clock: the time source in seconds (injectable so tests can drive a fake clock).

    Returns:
        Seconds per call, one float64 per timed call, in call order.
    """
    if warmup < 0 or min_iters < 1 or min_seconds < 0 or max_seconds <= 0:
        raise ValueError(
            f"time_fn needs warmup >= 0, min_iters >= 1, min_seconds >= 0 and max_seconds > 0; "
            f"got warmup={warmup}, min_iters={min_iters}, min_seconds={min_seconds}, "
            f"max_seconds={max_seconds}"
        )
    start = clock()
    deadline = start + max_seconds
    for _ in range(warmup):
        if clock() >= deadline:
            break
        fn()

    samples: list[float] = []
    timing_start = clock()
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        samples.append(t1 - t0)
        n = len(samples)
        if t1 >= deadline or (max_iters is not None and n >= max_iters):
            break
        if n >= min_iters and t1 - timing_start >= min_seconds:
            break
    return np.asarray(samples, dtype=np.float64)


def summarize(samples: Sequence[float] | np.ndarray, *, scale: float = 1.0) -> dict:
    """Summary statistics of timing samples.

    Args:
        samples: one value per call (any unit), at least one.
        scale: multiplies every statistic except `n`, e.g. 1e3 to report seconds as ms.

    Returns:
        {"min", "mean", "std", "p50", "p90", "p95", "p99", "max", "n"} as Python numbers;
        percentiles use numpy's default (linear interpolation), `std` is the sample standard
        deviation (ddof=1; 0.0 for one sample).
    """
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("summarize needs at least one sample; got an empty array")
    pct = np.percentile(x, PERCENTILES)
    out = {
        "min": float(x.min()) * scale,
        "mean": float(x.mean()) * scale,
        "std": (float(x.std(ddof=1)) if x.size > 1 else 0.0) * scale,
    }
    for p, v in zip(PERCENTILES, pct):
        out[f"p{p}"] = float(v) * scale
    out["max"] = float(x.max()) * scale
    out["n"] = int(x.size)
    return out


def _relative_range(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mid = float(np.median(values))
    if mid <= 0:
        return None
    return (max(values) - min(values)) / mid


def repeat_summary(repeats: Sequence[Sequence[float] | np.ndarray], *, scale: float = 1.0) -> dict:
    """How much repeated runs of one configuration disagree: the noise a comparison must beat.

    Each repeat is a separate `time_fn` run (ideally interleaved with the other configurations,
    so slow drifts of a shared machine land on all of them). The spread is the range of the
    per-repeat medians relative to their median: 0.04 means repeats differed by 4%.

    Args:
        repeats: one array of samples per repeat, each non-empty.
        scale: unit conversion for the reported medians/p99s (spreads are unitless).

    Returns:
        {"n_repeats", "medians", "median" (median of the medians), "spread",
         "p99s", "p99_spread"}; the spreads are None with fewer than two repeats, because a
        single run says nothing about run-to-run noise.
    """
    if len(repeats) == 0:
        raise ValueError("repeat_summary needs at least one repeat; got none")
    medians, p99s = [], []
    for i, r in enumerate(repeats):
        x = np.asarray(r, dtype=np.float64).ravel()
        if x.size == 0:
            raise ValueError(f"repeat {i} has no samples")
        medians.append(float(np.median(x)) * scale)
        p99s.append(float(np.percentile(x, 99)) * scale)
    return {
        "n_repeats": len(medians),
        "medians": medians,
        "median": float(np.median(medians)),
        "spread": _relative_range(medians),
        "p99s": p99s,
        "p99_spread": _relative_range(p99s),
    }


def throughput(items: float, seconds: float) -> float:
    """Items per second.

    For back-to-back calls of one batch, pass `batch * len(samples)` and `samples.sum()`: total
    work over total time, which is what a saturated server delivers (batch / p50 would ignore
    the tail).

    Args:
        items: items processed (images, texts, pairs).
        seconds: wall time it took, > 0.
    Returns:
        items / seconds.
    """
    if seconds <= 0:
        raise ValueError(f"throughput needs a positive duration; got {seconds} s")
    return float(items) / float(seconds)


def concurrent_throughput(
    fn: Callable[[], object] | Sequence[Callable[[], object]],
    items_per_call: int,
    callers: int,
    seconds: float,
    *,
    warmup: int = 1,
) -> float:
    """Items per second when `callers` threads call `fn` back to back at the same time.

    This is the serving picture: several requests in flight at once. onnxruntime and TensorRT
    release the GIL while they compute, so threads overlap the way separate clients would.

    Args:
        fn: one callable shared by all threads, or one per thread (len == callers) for backends
            whose sessions/execution contexts must not be shared (a TensorRT execution context
            and its stream per caller).
        items_per_call: items one call processes (its batch size).
        callers: number of threads, >= 1.
        seconds: how long all threads run together after warmup.
        warmup: untimed calls per thread before the common start.

    Returns:
        Completed items / wall time from the common start until the last in-flight call ended.

    Raises:
        The first exception any thread's `fn` raised.
    """
    if callers < 1 or seconds <= 0:
        raise ValueError(
            f"concurrent_throughput needs callers >= 1 and seconds > 0; "
            f"got callers={callers}, seconds={seconds}"
        )
    if callable(fn):
        fns = [fn] * callers
    else:
        fns = list(fn)
        if len(fns) != callers:
            raise ValueError(f"got {len(fns)} callables for {callers} callers; pass one or one each")

    # The main thread joins the barrier too, so the clock starts when every worker is ready.
    barrier = threading.Barrier(callers + 1)
    stop = threading.Event()
    counts = [0] * callers
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        f = fns[i]
        try:
            for _ in range(warmup):
                f()
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        try:
            while not stop.is_set():
                f()
                counts[i] += 1
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    # Calls finishing after the stop signal are counted, so the clock runs until they end.
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return throughput(sum(counts) * items_per_call, elapsed)


def interleaved_ms(fns: dict, rounds: int, seconds: float, clock=time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds per call of each function, measured in interleaved rounds (each warmed by one call).

    Args:
        fns: name -> a function of no arguments.
        rounds: how many times to go through all of them.
        seconds: how long to call each one per round (at least twice), by `clock`.
        clock: wall time by default; `time.thread_time` counts only this thread's CPU time, what a
            loaded machine disturbs least when every function runs on the calling thread (one
            intra-op thread).
    Returns:
        name -> one mean time per call (ms) per round.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            calls, start = 0, clock()
            while clock() - start < seconds or calls < 2:
                fn()
                calls += 1
            times[name].append((clock() - start) / calls * 1e3)
    return times


def round_ratios(times: dict[str, list[float]], base: str, names=None) -> dict[str, dict]:
    """Per-round speed-ups over `base` of `interleaved_ms`'s times (> 1: faster than `base`).

    Args:
        times: name -> one time per round.
        base: the name every other is compared with, round by round.
        names: which names to compare (default: all but `base`).
    Returns:
        name -> {"median", "range": [min, max]} of base time / its time, rounded to 3 decimals.
    """
    b = np.asarray(times[base])
    out = {}
    for k in names if names is not None else [k for k in times if k != base]:
        r = b / np.asarray(times[k])
        out[k] = {"median": round(float(np.median(r)), 3), "range": [round(float(r.min()), 3), round(float(r.max()), 3)]}
    return out
