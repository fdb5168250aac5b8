"""Bulk engine benchmark (issue 11): is decoding hidden, is memory flat, does resume hold, what does Ray cost?

    python -m huse.benchmarks.bulk BUNDLE --out bench-results/bulk.json            # the lead's timed run
    python -m huse.benchmarks.bulk BUNDLE --out /tmp/b.json --scale tiny           # correctness check, seconds

Measures, on a catalog of real fashion-products photos on disk (`huse data export`, repeated to
`--rows` rows, images shared):
1. model-only items/s at batch 64 (fused graph, ready arrays) vs the local engine end to end
   (catalog -> prepare pool -> model -> Parquet shards), per precision (fp32, int8-cpu), interleaved
   over 3 rounds, for the default thread layout and for one onnxruntime thread + the other cores
   preparing; and each stage's cost per item on one core, which bounds end to end on this machine;
2. the fastest gated precision vs the PyTorch eager model through the same engine and decode pool
   (the torch baseline of huse-bench, `huse.benchmarks.suite.TorchClassifier`, from the bundle's run);
3. peak RSS of `huse classify` for two catalog sizes (subprocesses);
4. kill -9 at random points then --resume: identical embeddings, rows redone;
5. the Ray engine with 2 actors vs the local engine, outputs compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from huse.runtime.bulk import BulkJob, read_embeddings, read_predictions, run_bulk
from huse.runtime.bundle import load_manifest
from huse.runtime.catalog import iter_catalog
from huse.runtime.classifier import Classifier

SCALES = {  # rows, rss rows, kills, model iterations, interleaved rounds of model-only vs end to end
    "full": dict(rows=20_000, rss=(10_000, 100_000), kills=10, iters=50, rounds=3),
    "tiny": dict(rows=600, rss=(300, 3_000), kills=2, iters=3, rounds=1),
}


def make_catalog(folder: Path, rows: int, source: Path | None) -> Path:
    """`rows` rows cycling over a real exported catalog (its images are shared, not copied)."""
    if source is None:
        src_dir = folder / "fashion-products"
        subprocess.run([sys.executable, "-m", "huse.runtime.cli", "data", "export", "fashion-products", str(src_dir),
                        "--limit", "2000"], check=True, capture_output=True)
        source = src_dir / "catalog.csv"
    recs = [r for r in iter_catalog(source) if not r.error]
    path = folder / f"catalog-{rows}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id"])
        for i in range(rows):
            r = recs[i % len(recs)]
            w.writerow([r.image, r.name, r.classes, f"{r.product_id or 'p'}-{i}"])
    return path


def model_only(bundle: str, precision: str, catalog: Path, iters: int, threads: int | None) -> float:
    """Items/s of the fused graph alone at batch 64 on ready arrays (the ceiling for end to end)."""
    recs = [r for _, r in zip(range(64), iter_catalog(catalog))]
    with Classifier(bundle, precision=precision, threads=threads, spinning=False) as clf:
        images = clf.decode([r.image for r in recs])
        feed = {"image": images.array,
                **clf.tokenizer.inputs([r.name or "" for r in recs])}
        runner = clf._runner("fused")  # the same hook huse-bench's model-only rows time
        feed = {k: feed[k] for k in clf.manifest["graphs"]["fused"]["inputs"]}
        runner.infer(feed)
        t0 = time.perf_counter()
        for _ in range(iters):
            runner.infer(feed)
        return 64 * iters / (time.perf_counter() - t0)


def end_to_end(job: BulkJob) -> dict:
    shutil.rmtree(job.out, ignore_errors=True)
    r = run_bulk(job)
    return {"items_s": r.items_per_s, "rows": r.rows, "errors": r.errors, "seconds": r.seconds,
            "top1": r.right / r.known if r.known else None}


def peak_rss(bundle: str, catalog: Path, out: Path, precision: str) -> float:
    """Peak RSS (MiB) of a `huse classify` subprocess over `catalog`."""
    proc = subprocess.Popen([sys.executable, "-m", "huse.runtime.cli", "classify", bundle, "--data", str(catalog),
                             "--out", str(out), "--precision", precision, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"classify failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def kill_resume(bundle: str, catalog: Path, folder: Path, kills: int, shard_rows: int, seed: int = 0) -> list[dict]:
    """kill -9 an `huse embed` at random moments, --resume, compare with an uninterrupted run."""
    args = [sys.executable, "-m", "huse.runtime.cli", "embed", bundle, "--data", str(catalog), "--no-progress",
            "--shard-rows", str(shard_rows)]
    ref = folder / "ref"
    t0 = time.perf_counter()
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True)
    duration = time.perf_counter() - t0
    ref_vec, ref_meta = read_embeddings(ref)
    rng, out = random.Random(seed), []
    for k in range(kills):
        dest = folder / f"run{k}"
        proc = subprocess.Popen(args + ["--out", str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.9) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest = dest.with_name(dest.name + ".partial") / "_manifest.json"
        kept = sum(e["count"] for e in json.loads(manifest.read_text())["shards"].values()) if manifest.is_file() else 0
        r = subprocess.run(args + ["--out", str(dest), "--resume"], capture_output=True, text=True)
        vec, meta = read_embeddings(dest) if r.returncode == 0 else (None, None)
        said = re.search(r"(\d+) of \d+ shards kept", r.stdout)
        shards_kept = int(said.group(1)) if said else 0
        # Shards are written in order, one at a time, while the next one runs, so the rows redone are
        # those of the shard being written and the one running at the kill: at most 2 * shard_rows,
        # provided the resumed run kept every shard the manifest lists.
        out.append({"kill": k, "rows_kept": kept, "shards_kept": shards_kept,
                    "kept_all_finished": shards_kept * shard_rows == kept,
                    "rows_left_after_kill": len(ref_meta) - kept, "rows_redone_at_most": 2 * shard_rows,
                    "rc": r.returncode,
                    "identical": vec is not None and vec.tobytes() == ref_vec.tobytes() and meta == ref_meta})
        shutil.rmtree(dest, ignore_errors=True)
    return out


def compare_local(bundle: str, precision: str, catalog: Path, common: dict, tmp: Path, sc: dict,
                  threads: int | None, workers: int | None) -> list[dict]:
    """Model-only vs end to end, interleaved over `rounds` so drift hits both alike; medians and spreads.

    Thread layouts: "default" (onnxruntime gets the cores, the engine's default prepare pool),
    "default-idle" (the same with `--prepare-priority idle`: the pool runs only on cores onnxruntime
    leaves) and, on a machine with spare cores, "split" (one onnxruntime thread, the other cores preparing
    batches), each compared with the model alone at the same onnxruntime threads."""
    cores = os.cpu_count() or 1
    layouts = {"default": (threads, workers, "normal"), "default-idle": (threads, workers, "idle")}
    if threads is None and workers is None and cores > 1:
        layouts["split"] = (1, cores - 1, "normal")
    out = []
    for name, (th, wk, priority) in layouts.items():
        model, e2e, top1 = [], [], set()
        for _ in range(sc["rounds"]):
            model.append(model_only(bundle, precision, catalog, sc["iters"], th))
            job = BulkJob(out=str(tmp / f"e2e-{precision}"), precision=precision,
                          **dict(common, threads=th, workers=wk, prepare_priority=priority))
            r = end_to_end(job)
            e2e.append(r["items_s"])
            top1.add(r["top1"])
        ratios = [e / m for e, m in zip(e2e, model)]
        out.append({"precision": precision, "config": name, "threads": th, "workers": wk, "prepare_priority": priority,
                    "top1": sorted(top1, key=str),  # fused top-1 on the catalog's classes, per round
                    "model_items_s": float(np.median(model)), "e2e_items_s": float(np.median(e2e)),
                    "e2e_vs_model": float(np.median(ratios)), "e2e_vs_model_range": [min(ratios), max(ratios)],
                    "model_runs": model, "e2e_runs": e2e})
        print(f"{precision} {name} (onnxruntime threads {th or 'all'}, prepare workers {wk or 'default'}): model "
              f"{np.median(model):.0f} items/s, end to end {np.median(e2e):.0f} ({100 * np.median(ratios):.0f}%, "
              f"{100 * min(ratios):.0f}-{100 * max(ratios):.0f}%), fused top-1 {sorted(top1, key=str)}", flush=True)
    return out


def stage_costs(bundle: str, catalog: Path, precisions: list[str], common: dict, batches: int = 30) -> dict:
    """Core-microseconds per item of each stage, one thread each: what the cores must share.

    prepare: catalog batch -> model feeds (validate, decode, resize, normalise, stack, tokenise), and
    `prepare_stages_us`: its read, decode, resize, normalise and tokenise steps one at a time;
    model_1t: the fused graph alone on one onnxruntime thread; finish: process_batch on a prepared
    batch minus the model (post-processing, rows). With C cores end to end can be at most
    C / (prepare + model_1t + finish) items/s, whatever the threading."""
    from huse.benchmarks.prepare import stage_breakdown
    from huse.runtime.bulk import prepare_batch, process_batch

    recs = [r for _, r in zip(range(64 * batches), iter_catalog(catalog))]
    chunks = [recs[s:s + 64] for s in range(0, len(recs), 64)]
    out: dict = {"cores": os.cpu_count()}
    for p in precisions:
        job = BulkJob(out="unused", precision=p, **dict(common, threads=1))
        with Classifier(bundle, precision=p, threads=1, spinning=False) as clf:
            process_batch(clf, chunks[0], job)  # load the graph
            t0 = time.perf_counter()
            ready = [prepare_batch(clf, c, job) for c in chunks]
            prep = (time.perf_counter() - t0) / len(recs)
            t0 = time.perf_counter()
            for c, r in zip(chunks, ready):
                process_batch(clf, c, job, r)
            rest = (time.perf_counter() - t0) / len(recs)
            sample = recs[:256]
            stages = stage_breakdown([Path(r.image) for r in sample], clf.image_spec, [r.name or "" for r in sample],
                                     clf.tokenizer, seconds=0.3)
        model = 1 / model_only(bundle, p, catalog, 20, 1)
        cores = os.cpu_count() or 1
        out[p] = {"prepare_us": prep * 1e6, "model_1t_us": model * 1e6, "finish_us": max(0.0, rest - model) * 1e6,
                  "bound_items_s": cores / (prep + rest), "prepare_stages_us": stages}
        print(f"{p} prepare stages: " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in stages.items()) + " us/item",
              flush=True)
        print(f"{p}: per item prepare {prep * 1e6:.0f} us, model (1 thread) {model * 1e6:.0f} us, finish "
              f"{max(0.0, rest - model) * 1e6:.0f} us -> at most {cores / (prep + rest):.0f} items/s on {cores} cores",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--catalog", type=Path, help="source catalog (default: huse data export fashion-products)")
    ap.add_argument("--run", help="training run for the PyTorch baseline (default: the bundle's source run)")
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    ap.add_argument("--workers", type=int, help="decode threads (default: the engine's)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: torch,rss,kill,ray")
    a = ap.parse_args(argv)
    sc, skip = SCALES[a.scale], set(filter(None, a.skip.split(",")))
    manifest = load_manifest(a.bundle, verify=False)
    precisions = [p for p in ("fp32", "int8-cpu") if p in manifest["models"]]
    result: dict = {"scale": a.scale, "bundle": a.bundle, "cores": os.cpu_count(), "threads": a.threads,
                    "workers": a.workers}
    with tempfile.TemporaryDirectory(prefix="huse-bulk-") as tmp:
        tmp = Path(tmp)
        catalog = make_catalog(tmp, sc["rows"], a.catalog)
        common = dict(bundle=a.bundle, data=str(catalog), batch_size=64, mode="fused", progress=False,
                      threads=a.threads, workers=a.workers)
        rows = []
        for p in precisions:
            rows += compare_local(a.bundle, p, catalog, common, tmp, sc, a.threads, a.workers)
        result["local"] = rows
        result["stage_costs"] = stage_costs(a.bundle, catalog, precisions, common)
        for r in rows:  # what the cores allow at best, against this layout's model-only figure
            r["cpu_bound_vs_model"] = result["stage_costs"][r["precision"]]["bound_items_s"] / r["model_items_s"]
        # fused top-1 on the catalog's classes: one value per precision, whatever the layout or round
        result["top1_same_in_every_layout"] = all(
            len({x for r in rows if r["precision"] == p for x in r["top1"]}) == 1 for p in precisions)
        gated = [r for r in rows if r["config"] == "default" and
                 manifest.get("accuracy", {}).get(r["precision"], {}).get("passed", r["precision"] == "fp32")]
        best = max(gated, key=lambda r: r["e2e_items_s"])
        if "torch" not in skip:
            from huse.benchmarks.suite import TorchClassifier

            run = Path(a.run or manifest.get("source_run") or "")
            if (run / "model.safetensors").is_file():
                t = end_to_end(BulkJob(out=str(tmp / "e2e-torch"), classifier=lambda: TorchClassifier(
                    Path(a.bundle), run, threads=a.threads, batch_size=64), **common))
                result["torch"] = {"e2e_items_s": t["items_s"], "best": best["precision"],
                                   "speedup": best["e2e_items_s"] / t["items_s"]}
                print(f"{best['precision']} vs PyTorch eager, same engine: {result['torch']['speedup']:.2f}x", flush=True)
            else:
                result["torch"] = {"skipped": f"training run {run} not found; pass --run"}
        if "rss" not in skip:
            result["rss_mib"] = {}
            for n in sc["rss"]:
                cat = make_catalog(tmp, n, catalog)
                result["rss_mib"][n] = peak_rss(a.bundle, cat, tmp / f"rss-{n}", best["precision"])
                cat.unlink()
                shutil.rmtree(tmp / f"rss-{n}", ignore_errors=True)
            small, large = (result["rss_mib"][n] for n in sc["rss"])
            result["rss_ratio"] = large / small
            print(f"peak RSS {sc['rss'][0]} rows {small:.0f} MiB, {sc['rss'][1]} rows {large:.0f} MiB", flush=True)
        if "kill" not in skip:
            shard_rows = max(50, sc["rows"] // 20)
            kills = kill_resume(a.bundle, catalog, tmp, sc["kills"], shard_rows)
            result["kill_resume"] = {"shard_rows": shard_rows, "runs": kills,
                                     "all_identical": all(k["identical"] for k in kills),
                                     "all_kept_finished_shards": all(k["kept_all_finished"] for k in kills)}
            print(f"kill -9 + resume: {sum(k['identical'] for k in kills)}/{len(kills)} identical", flush=True)
        if "ray" not in skip:
            shard_rows = max(64, sc["rows"] // 8)
            job = dict(common, precision=best["precision"], shard_rows=shard_rows, threads=1, mode="fused")
            loc = end_to_end(BulkJob(out=str(tmp / "ray-local"), **dict(job, threads=a.threads)))
            ray = end_to_end(BulkJob(out=str(tmp / "ray"), engine="ray", actors=2, **job))
            same = read_predictions(tmp / "ray-local") == read_predictions(tmp / "ray")
            result["ray"] = {"local_items_s": loc["items_s"], "ray_items_s": ray["items_s"],
                             "ratio": ray["items_s"] / loc["items_s"], "identical": same, "actors": 2}
            print(f"ray 2 actors {ray['items_s']:.0f} items/s vs local {loc['items_s']:.0f} (identical: {same})", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
