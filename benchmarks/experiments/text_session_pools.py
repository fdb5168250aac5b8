"""Whose threads run the word-CNN text graph: what is fastest for titles alone, and what it costs a mixed workload.

    python benchmarks/experiments/text_session_pools.py bundles/demo --run runs/demo \\
        --out benchmarks/results/cpu-2core/text-options/session-pools-s29-intel.json

A one-off experiment behind the runtime's text-session plan (issue 24), kept outside the installed package.
`text_graph_options.py` times the graph alone; this times `Classifier.classify` with each plan in a process of
its own (onnxruntime's global thread pool can only be chosen before a process's first session), in
interleaved rounds of fresh processes:

- "rows" (the runtime's plan): the text session on one intra-op thread, a batch cut into one row part per core;
- "whole, spinning": the text session on every core, whole batches, onnxruntime's default spinning;
- "whole, spin stops after Run": the same with `session.force_spinning_stop` (its threads spin within a Run only);
- "global pool": every session of the process on onnxruntime's global thread pool (one thread per core, spinning),
  text batches whole (`huse.runtime.share_threads`);
- "torch": PyTorch eager (`TorchClassifier`), titles only: what the text ratios are read against.

Workloads on the catalog's first 64 products (a row each): titles only at batch 1 and 64; photo + title at batch 1 and 64; a
mixed batch of 64 (32 with a photo, 32 titles only, mode auto: the fused graph, then the text graph); and
one product with a photo followed by one title only, in turn (a server's mixed traffic). p50 per round,
then the median and range over rounds. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

PLANS = ("rows", "whole, spinning", "whole, spin stops after Run", "global pool", "torch")
TEXT_ONLY = ("titles b1", "titles b64")


def _workloads(clf, images: list[bytes], titles: list[str], text_only: bool) -> dict:
    mixed = images[:32] + [None] * 32
    loads = {
        "titles b1": lambda: clf.classify(titles=titles[:1], mode="text"),
        "titles b64": lambda: clf.classify(titles=titles, mode="text"),
        "photo+title b1": lambda: clf.classify(images=images[:1], titles=titles[:1]),
        "photo+title b64": lambda: clf.classify(images=images, titles=titles),
        "mixed b64 (32 without photo)": lambda: clf.classify(images=mixed, titles=titles),
        "photo+title b1, then title b1": lambda: (clf.classify(images=images[:1], titles=titles[:1]),
                                                  clf.classify(titles=titles[1:2], mode="text")),
    }
    return {k: f for k, f in loads.items() if not text_only or k in TEXT_ONLY}


def _p50_ms(fn, seconds: float) -> float:
    for _ in range(3):
        fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _child(bundle: str, run: str | None, catalog: str, plan: str, seconds: float) -> dict:
    """One plan's p50 per workload, in this (fresh) process."""
    import onnxruntime as ort

    cores = os.cpu_count() or 1
    if plan == "global pool":  # before the first session; the runtime then runs text batches whole on it
        from huse.runtime import share_threads

        share_threads(cores)
    from huse.runtime.classifier import Classifier

    first: dict[str, dict] = {}  # one row per product (its first photo): 64 distinct titles
    for r in csv.DictReader(open(catalog, newline="", encoding="utf-8")):
        first.setdefault(r.get("product_id") or r["image"], r)
    rows = list(first.values())[:64]
    folder = Path(catalog).parent
    images = [(folder / r["image"]).read_bytes() for r in rows]
    titles = [r["name"] for r in rows]
    if plan == "torch":
        from huse.benchmarks.suite import TorchClassifier

        clf = TorchClassifier(Path(bundle), Path(run), threads=cores)
    else:
        clf = Classifier(bundle)
        runner = clf._runner("text")
        if plan not in ("rows", "global pool"):  # the same graph file, whole batches on a 2-thread pool of its own
            if runner._pool is not None:
                runner._pool.shutdown()
            runner._pool, runner.row_parts = None, 1
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            opts.intra_op_num_threads = cores
            if plan == "whole, spin stops after Run":
                opts.add_session_config_entry("session.force_spinning_stop", "1")
            runner.session = ort.InferenceSession(str(runner.path), opts, providers=["CPUExecutionProvider"])
    loads = _workloads(clf, images, titles, text_only=plan == "torch")
    return {name: _p50_ms(fn, seconds) for name, fn in loads.items()}


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--run", type=click.Path(exists=True, file_okay=False), help="The bundle's training run (the torch plan).")
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False), default="data/fashion-products/catalog.csv",
              show_default=True, help="Rows with image and name columns; the first row of each of the first 64 products is used.")
@click.option("--rounds", default=5, show_default=True)
@click.option("--seconds", default=0.5, show_default=True, help="Time per workload, per round.")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@click.option("--child", type=click.Choice(PLANS), hidden=True)
def main(bundle, run, catalog, rounds, seconds, out, child) -> None:
    if child:
        Path(out).write_text(json.dumps(_child(bundle, run, catalog, child, seconds)))
        return
    plans = [p for p in PLANS if p != "torch" or run]
    per_round: dict[str, list[dict]] = {p: [] for p in plans}
    tmp = Path(out).with_suffix(".child.json")
    for r in range(rounds):
        for plan in plans:  # a fresh process per plan and round, plans in turn
            cmd = [sys.executable, __file__, bundle, "--catalog", catalog, "--seconds", str(seconds),
                   "--out", str(tmp), "--child", plan] + (["--run", run] if run else [])
            subprocess.run(cmd, check=True)
            per_round[plan].append(json.loads(tmp.read_text()))
            print(f"round {r + 1}/{rounds} {plan}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_round[plan][-1].items()))
    tmp.unlink(missing_ok=True)
    ms = {p: {w: {"p50_ms": round(statistics.median(x[w] for x in runs), 4),
                  "range": [round(min(x[w] for x in runs), 4), round(max(x[w] for x in runs), 4)]}
              for w in runs[0]} for p, runs in per_round.items()}
    result = {"bundle": bundle, "catalog": catalog, "rounds": rounds, "seconds": seconds, "cores": os.cpu_count(),
              "ms": ms,
              "vs_rows": {p: {w: round(v["p50_ms"] / ms["rows"][w]["p50_ms"], 3) for w, v in m.items()}
                          for p, m in ms.items() if p != "torch"}}
    if "torch" in ms:
        result["torch_over_plan"] = {p: {w: round(ms["torch"][w]["p50_ms"] / m[w]["p50_ms"], 3) for w in TEXT_ONLY}
                                     for p, m in ms.items() if p != "torch"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("vs_rows", "torch_over_plan") if k in result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
