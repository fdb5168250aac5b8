"""Where title-only `classify` spends its time: each stage alone, and the stages one after another.

    python benchmarks/experiments/text_stages.py bundles/demo --out benchmarks/results/cpu-2core/text-options/stages.json

A one-off experiment behind the title-only figures (issue 24), kept outside the installed package.
`classify(titles, mode="text")` is `prepare` (normalise, tokenise), `infer` (the text graph, calibrated
probabilities) and `describe` (top-k, top-down paths, result dicts). On the bundle's held-out titles, one
batch, in one process, it times with `time.perf_counter` around each stage, median over `--calls` calls:

- "alone": each stage called again and again on the same inputs (what a microbenchmark of it measures);
- "in turn": the three called one after another, as `classify` does, each stage timed where it runs;
- with Python's garbage collector frozen (`gc.freeze`) or off, and with the graph's batch run whole
  (`row_parts` 1), to see whether either explains the difference;
- the batch cut in two halves, each classified whole (prepare, infer on one thread, describe) on its own
  thread at the same time, against `classify` of the whole batch with its graph in row parts, in
  interleaved rounds: whether the halves' Python stages overlap the other half's graph (the GIL says no);
  and "staggered": 7/16 of the batch prepared first and classified on the second thread while this one
  prepares and classifies the rest, so that the two threads' Python does not coincide;
- the text graph's `session.run` alone, called back to back and called right after reading 3,000 entries
  of a 200,000-entry dict (which evicts the cores' caches as a batch's Python work does), at batch 1 and
  at the batch asked for: what the graph costs when its weights are no longer in cache;
- prepare and describe alone, each call right after other work (untimed) that isolates one cause of their
  slowdown in turn: a 0.3 ms sleep (the gap alone), 300 float32 64x64 matmuls (AVX-512 FMAs on 48 KB: the
  core's frequency, not its caches), a sum over 8 MB of bytes (the caches, no floating point), and the
  text graph's run (what `classify` puts there). Interleaved rounds, medians.

Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from huse.benchmarks.suite import BenchData
from huse.runtime import Classifier
from huse.runtime.cli import run_cli

STAGES = ("prepare", "infer", "describe")


def _median_call_us(fn, calls: int, before=None) -> float:
    """Median microseconds of `fn()` over `calls` calls (after one untimed call), `before()` untimed ahead of each."""
    fn()
    times = []
    for _ in range(calls):
        if before:
            before()
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
    return round(float(np.median(times)) * 1e6, 1)


def _measure(clf: Classifier, titles: list[str], calls: int) -> dict:
    clock = time.perf_counter
    q0 = clf.prepare(None, titles, "text")
    p0 = clf.infer(q0)
    alone = {stage: _median_call_us(fn, calls) for stage, fn in (
        ("prepare", lambda: clf.prepare(None, titles, "text")), ("infer", lambda: clf.infer(q0)),
        ("describe", lambda: clf.describe(q0, p0)))}
    rows = []
    for _ in range(calls):
        a = clock()
        q = clf.prepare(None, titles, "text")
        b = clock()
        p = clf.infer(q)
        c = clock()
        clf.describe(q, p)
        rows.append((b - a, c - b, clock() - c))
    in_turn = {s: round(float(v) * 1e6, 1) for s, v in zip(STAGES, np.median(np.asarray(rows), axis=0))}
    return {"alone_us": alone, "in_turn_us": in_turn,
            "in_turn_minus_alone_us": round(sum(in_turn.values()) - sum(alone.values()), 1)}


def _cold_weights(clf: Classifier, titles: list[str], calls: int) -> dict:
    """The text graph's session.run back to back, and after touching memory that evicts its weights, at
    batch 1 and at the batch of `titles`."""
    session = clf._runner("text").session
    names = [o.name for o in session.get_outputs()]
    table = {i: str(i) for i in range(200_000)}
    keys = list(range(0, 200_000, 67))[:3000]

    def evict():
        for k in keys:
            table[k]

    out = {}
    for n in sorted({1, len(titles)}):
        feed = clf.prepare(None, titles[:n], "text").groups["text"][1]
        out[f"batch {n}"] = {"back_to_back": _median_call_us(lambda: session.run(names, feed), calls),
                             "after_eviction": _median_call_us(lambda: session.run(names, feed), calls, evict),
                             "eviction_alone": _median_call_us(evict, calls)}
    return out


def _after_other_work(clf: Classifier, titles: list[str], calls: int, rounds: int = 5) -> dict:
    """prepare and describe alone, each call right after one kind of other work (see the module's docstring)."""
    q = clf.prepare(None, titles, "text")
    p = clf.infer(q)
    feed = q.groups["text"][1]
    session = clf._runner("text").session
    small, stream = np.random.default_rng(0).random((64, 64), dtype=np.float32), np.zeros(8 << 20, np.uint8)

    def fmas():
        for _ in range(300):
            small @ small

    befores = {"nothing": None, "sleep 0.3 ms": lambda: time.sleep(0.0003), "FMAs on 48 KB": fmas,
               "sum over 8 MB": lambda: stream.sum(dtype=np.uint64), "the text graph": lambda: session.run(None, feed)}
    stages = {"prepare": lambda: clf.prepare(None, titles, "text"), "describe": lambda: clf.describe(q, p)}
    times = {b: {s: [] for s in stages} for b in befores}
    for _ in range(rounds):
        for b, before in befores.items():
            for s, fn in stages.items():
                times[b][s].append(_median_call_us(fn, calls // rounds, before))
    return {b: {s: round(float(np.median(v)), 1) for s, v in per.items()} for b, per in times.items()}


def _pipelined(clf: Classifier, titles: list[str], calls: int, rounds: int = 5) -> dict:
    """`classify` of the batch (graph in row parts) against two ways of overlapping one part's Python with
    the other's graph: the two halves classified whole on two threads at once, and "staggered": the first
    7/16 of the batch prepared, then run and described on a second thread while this one prepares,
    runs and describes the rest (so that the second thread's describe falls while this one is in its graph)."""
    runner, half, first = clf._runner("text"), len(titles) // 2, len(titles) * 7 // 16
    parts = runner.row_parts
    pool = ThreadPoolExecutor(1)

    def whole_part(prepared):
        return clf.describe(prepared, clf.infer(prepared))

    def halves():
        other = pool.submit(clf.classify, titles=titles[half:], mode="text")
        mine = clf.classify(titles=titles[:half], mode="text")
        return mine + [dict(r, index=r["index"] + half) for r in other.result()]

    def staggered():
        other = pool.submit(whole_part, clf.prepare(None, titles[:first], "text"))
        mine = whole_part(clf.prepare(None, titles[first:], "text"))
        return other.result() + [dict(r, index=r["index"] + first) for r in mine]

    reference = clf.classify(titles=titles, mode="text")
    runner.row_parts = 1  # each part runs whole on the 1-thread session
    for name, fn in (("halves", halves), ("staggered", staggered)):
        if fn() != reference:
            raise AssertionError(f"the {name} results differ from the whole batch's")
    runner.row_parts = parts
    times: dict[str, list[float]] = {"row_parts_us": [], "halves_on_two_threads_us": [], "staggered_us": []}
    for _ in range(rounds):
        times["row_parts_us"].append(_median_call_us(lambda: clf.classify(titles=titles, mode="text"), calls // rounds))
        runner.row_parts = 1
        times["halves_on_two_threads_us"].append(_median_call_us(halves, calls // rounds))
        times["staggered_us"].append(_median_call_us(staggered, calls // rounds))
        runner.row_parts = parts
    pool.shutdown()
    whole = np.asarray(times["row_parts_us"])
    return {**times, "ratio_median": round(float(np.median(np.asarray(times["halves_on_two_threads_us"]) / whole)), 3),
            "staggered_ratio_median": round(float(np.median(np.asarray(times["staggered_us"]) / whole)), 3)}


def run(bundle: str, batch: int = 64, calls: int = 3000) -> dict:
    with Classifier(bundle) as clf:
        with tempfile.TemporaryDirectory() as tmp:
            _, titles, _ = BenchData(clf.manifest, clf, batch, Path(tmp)).take(0, batch)
        out = {"bundle": str(bundle), "batch": batch, "calls": calls, "default": _measure(clf, titles, calls),
               "session_run_us": _cold_weights(clf, titles, calls), "after_other_work_us": _after_other_work(clf, titles, calls),
               "pipelined": _pipelined(clf, titles, calls) if batch > 1 else None}
        gc.collect()
        gc.freeze()
        out["gc_frozen"] = _measure(clf, titles, calls)
        gc.disable()
        out["gc_off"] = _measure(clf, titles, calls)
        gc.enable()
        gc.unfreeze()
        clf._runner("text").row_parts = 1
        out["whole_batch"] = _measure(clf, titles, calls)
    return out


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--batch", default=64, show_default=True)
@click.option("--calls", default=3000, show_default=True)
@click.option("--out", default="bench-results/text_stages.json", type=click.Path(dir_okay=False), show_default=True)
def main(bundle, batch, calls, out) -> None:
    def body():
        r = run(bundle, batch, calls)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps(r, indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
