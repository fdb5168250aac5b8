"""The bulk engine on a titles-only catalog: what the garbage collector and cutting text batches by rows cost.

    python benchmarks/experiments/bulk_titles.py bundles/demo --data data/fashion-products/catalog.csv \
        --out benchmarks/results/cpu-2core/bulk-titles.json

A catalog's rows repeated to `--rows` (images shared), classified by the local engine in this process: titles
only (`--mode text`, where the model is cheap and a batch's result objects are most of the work) and photos with
titles (the default mode, a fifth of the rows), in interleaved rounds, four ways:
- before: Python's default collector thresholds, word-CNN text batches cut by rows, a part per core;
- collector: `_collector.THRESHOLDS` (a young generation of 50,000 objects), batches still cut;
- now: those thresholds and whole text batches (`Classifier(row_parts=1)`, what `huse classify` uses);
- torch: the PyTorch eager model (huse-bench's baseline, fp32, from the bundle's training run) through the same
  engine, prepare pool and thresholds: what a user would run without the lean runtime.
Reports wall time, the time spent in collections by generation (gc.callbacks), and per round each way's wall
time over now's.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import huse.runtime._collector as collector
from huse.benchmarks.machine import machine_info
from huse.runtime.bulk import BulkJob, run_bulk
from huse.runtime.catalog import iter_catalog
from huse.runtime.classifier import Classifier

# way -> (collector thresholds, Classifier row_parts (None: a part per core) or "torch")
WAYS = {"before": (gc.get_threshold(), None), "collector": (collector.THRESHOLDS, None), "now": (collector.THRESHOLDS, 1),
        "torch": (collector.THRESHOLDS, "torch")}


def _catalog(source: Path, rows: int, folder: Path) -> Path:
    recs = [r for r in iter_catalog(source) if not r.error]
    path = folder / f"catalog-{rows}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "product_id"])
        for i in range(rows):
            r = recs[i % len(recs)]
            w.writerow([os.path.abspath(r.image), r.name, f"{r.product_id or 'p'}-{i}"])
    return path


def _classifier(bundle: str, precision: str, row_parts: int | str | None, run: Path):
    if row_parts == "torch":
        from huse.benchmarks.suite import TorchClassifier

        return TorchClassifier(Path(bundle), run, batch_size=64)
    return Classifier(bundle, precision=precision, spinning=False, row_parts=row_parts)


def _run(bundle: str, catalog: Path, mode: str, precision: str, row_parts: int | str | None, run: Path,
         out: Path) -> dict:
    spent = collections.Counter()
    start = {}

    def timer(phase, info):
        if phase == "start":
            start["t"] = time.perf_counter()
        else:
            spent[info["generation"]] += time.perf_counter() - start["t"]

    gc.callbacks.append(timer)
    try:
        t0 = time.perf_counter()
        r = run_bulk(BulkJob(bundle=bundle, data=str(catalog), out=str(out), mode=mode, precision=precision,
                             progress=False, classifier=lambda: _classifier(bundle, precision, row_parts, run)))
        wall = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(timer)
    assert r.errors == r.warnings == 0, r  # every photo read: a run that fell back to titles measures nothing
    return {"wall_s": wall, "collect_s": {str(g): s for g, s in sorted(spent.items())}, "items_per_s": r.rows / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True, type=Path, help="a catalog with photos and titles (repeated)")
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the titles-only runs (photos: a fifth)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="int8-cpu")
    ap.add_argument("--run", type=Path, help="the bundle's training run, for the PyTorch way (default: its source_run)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    run = a.run or Path(json.loads((Path(a.bundle) / "manifest.json").read_text())["source_run"])
    runs = {(mode, w): [] for mode in ("text", "auto") for w in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        catalogs = {"text": _catalog(a.data, a.rows, tmp), "auto": _catalog(a.data, a.rows // 5, tmp)}
        for rnd in range(a.rounds):
            for mode, name in runs:
                collector.THRESHOLDS, row_parts = WAYS[name]  # THRESHOLDS: what `fewer_collections` sets for the run
                runs[(mode, name)].append(_run(a.bundle, catalogs[mode], mode, a.precision, row_parts, run,
                                               tmp / f"o-{rnd}-{mode}-{name}"))
                print(mode, name, rnd, json.dumps(runs[(mode, name)][-1]), flush=True)
    result = {"machine": machine_info(), "bundle": a.bundle, "precision": a.precision, "rows": {"text": a.rows, "auto": a.rows // 5},
              "ways": {k: {"thresholds": list(t), "row_parts": p} for k, (t, p) in WAYS.items()}, "torch_run": str(run),
              "runs": {f"{m}/{w}": v for (m, w), v in runs.items()}}
    for mode in ("text", "auto"):
        for way in ("before", "collector", "torch"):
            ratios = [b["wall_s"] / n["wall_s"] for b, n in zip(runs[(mode, way)], runs[(mode, "now")])]
            result[f"{mode}_{way}_over_now"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print({k: v for k, v in result.items() if k.endswith("_over_now")})


if __name__ == "__main__":
    main()
