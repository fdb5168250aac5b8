"""The arm64 check: the same `huse` commands under emulated aarch64 and on x86, in one run, compared.

Both sides run the CLI a user runs (`huse info`, `huse classify`, `huse search`) as subprocesses on
the same products; x86 is this Python (the project's venv), aarch64 the emulated one of env.py. Bars:
fp32 top-1 identical and every top-k score within 1e-4; fp16 and int8-cpu top-1 agreement with x86
at least the export's own gates (99.9% and 99%); search hits identical and scores within 1e-4.
Kernel counts (ops.py) are reported side by side; emulated time is not measured (it says nothing
about Arm hardware).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from huse.benchmarks.arm64.env import CPU, PINS, Arm64Env, build_env, qemu_version
from huse.runtime.errors import HuseError

__all__ = ["FP32_SCORE_ATOL", "compare_predictions", "run_check", "sample_catalog"]

FP32_SCORE_ATOL = 1e-4  # fp32 on two instruction sets: same math, other summation order and kernels
TIMEOUT_S = 3600  # one emulated command; 200 products through three precisions take minutes, not hours


def _gates() -> dict[str, float]:
    from huse.export.precision import FP16_MIN_AGREEMENT, INT8_MIN_AGREEMENT

    return {"fp16": FP16_MIN_AGREEMENT, "int8": INT8_MIN_AGREEMENT, "int8-cpu": INT8_MIN_AGREEMENT}


def sample_catalog(data: Path, out: Path, limit: int, split: str | None = None) -> int:
    """Write `limit` rows of a CSV catalog to `out`, evenly spread over it (catalogs are often sorted by class),
    with absolute image paths so that `out` can live anywhere.

    Args:
        data: the catalog (CSV; image paths relative to its folder, as `huse classify` reads them).
        out: the sample CSV to write.
        limit: how many rows at most.
        split: keep only the rows of this split when the catalog has a `split` column (held-out products).

    Returns:
        The number of rows written.
    """
    if data.suffix.lower() != ".csv":
        raise HuseError(f"the arm64 check reads a CSV catalog; got {data}. Export one with `huse data export`")
    with open(data, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    if split and "split" in (fields or []):
        rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise HuseError(f"{data} has no rows" + (f" of split {split!r}" if split else ""))
    picked = [dict(rows[i * len(rows) // min(limit, len(rows))]) for i in range(min(limit, len(rows)))]
    for row in picked:
        if row.get("image"):
            row["image"] = str((data.parent / row["image"]).resolve())
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(picked)
    return len(picked)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_predictions(arm: list[dict], x86: list[dict]) -> dict[str, Any]:
    """Top-1 agreement and the largest top-k score difference between two `huse classify` outputs.

    Args:
        arm, x86: the JSONL rows of the same catalog.

    Returns:
        n, errors (rows with an error on either side), agreement (% of rows with the same top-1),
        max_score_diff (over the top-k labels both sides list), disagreements (first 5 rows that differ).
    """
    if len(arm) != len(x86):
        raise HuseError(f"aarch64 classified {len(arm)} rows and x86 {len(x86)}: the outputs cannot be compared")
    same, diff, errors, differ = 0, 0.0, 0, []
    for a, b in zip(arm, x86):
        if a.get("error") or b.get("error"):
            errors += 1
            continue
        if a["label"] == b["label"]:
            same += 1
        elif len(differ) < 5:
            differ.append({"row": a.get("row"), "aarch64": [a["label"], a["score"]], "x86": [b["label"], b["score"]]})
        sb = {t["label"]: t["score"] for t in b["top_k"]}
        diff = max([diff] + [abs(t["score"] - sb[t["label"]]) for t in a["top_k"] if t["label"] in sb])
    n = len(arm) - errors
    return {"n": n, "errors": errors, "agreement": 100.0 * same / n if n else 0.0, "max_score_diff": diff,
            "disagreements": differ}


def _compare_hits(arm: list[dict], x86: list[dict]) -> dict[str, Any]:
    same, diff, n = 0, 0.0, 0
    for a, b in zip(arm, x86):
        for ha, hb in zip(a["hits"], b["hits"]):
            n += 1
            same += ha["item"] == hb["item"]
            diff = max(diff, abs(ha["score"] - hb["score"]))
    return {"queries": len(x86), "hits": n, "same_hits": same, "max_score_diff": diff,
            "passed": len(arm) == len(x86) and n > 0 and same == n and diff <= FP32_SCORE_ATOL}


def run_check(bundle: str | Path, data: str | Path, work: str | Path, *, precisions: tuple[str, ...] = ("fp32",
              "fp16", "int8-cpu"), limit: int = 200, split: str | None = "test", search: bool = True, cpu: str = CPU,
              pins: tuple[str, ...] = PINS, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the check and return its report (the JSON the CLI writes).

    Args:
        bundle: a bundle holding every precision asked.
        data: a CSV catalog; `limit` rows of it, spread evenly, are classified (emulation is slow).
        work: a scratch folder (outputs of both sides stay there for inspection).
        precisions: what to classify; fp32 is always included (the reference of the bars).
        limit: products to classify.
        split: take them from this split where the catalog has a `split` column (None: any row).
        search: also build a flat index on x86 and search it from both sides.
        cpu: QEMU's -cpu model.
        pins: the aarch64 requirements.
        say: progress lines.

    Returns:
        The report: environment, per-precision comparisons and bars, search, kernel counts, passed.
    """
    bundle, data, work = Path(bundle).resolve(), Path(data).resolve(), Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    precisions = ("fp32",) + tuple(p for p in precisions if p != "fp32")
    from huse.runtime.bundle import load_manifest

    have = load_manifest(bundle)["models"]
    missing = [p for p in precisions if p not in have]
    if missing:
        raise HuseError(f"{bundle} has no {', '.join(missing)} graphs (it has {', '.join(sorted(have))}); "
                        f"export them (huse-export RUN --fp16 --int8-cpu) or pass --precisions {','.join(sorted(have))}")
    t0 = time.perf_counter()
    env = build_env(work, pins=pins, cpu=cpu, say=say)
    setup_s = time.perf_counter() - t0
    sample = work / "sample.csv"
    n = sample_catalog(data, sample, limit, split)
    sides: dict[str, tuple[list[str], dict | None]] = {"x86_64": ([sys.executable], None),
                                                       "aarch64": (env.python(), env.environ())}

    def run(side: str, args: list[str], what: str) -> str:
        prefix, environ = sides[side]
        r = subprocess.run(prefix + args, capture_output=True, text=True, env=environ, timeout=TIMEOUT_S)
        if r.returncode != 0:
            raise HuseError(f"{what} failed on {side} (exit {r.returncode}):\n" + (r.stderr or r.stdout)[-3000:])
        return r.stdout

    cli = ["-m", "huse.runtime.cli"]
    report: dict[str, Any] = {"bundle": str(bundle), "data": str(data), "split": split, "products": n, "cpu": cpu,
                              "qemu": qemu_version(), "pins": list(pins), "sysroot": str(env.sysroot)}
    probe = ("import json, platform, sys, importlib.util as u; import numpy, PIL, click, onnxruntime; "
             "from importlib.metadata import version as v; print(json.dumps({'machine': platform.machine(), "
             "'python': platform.python_version(), 'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__, "
             "'Pillow': PIL.__version__, 'click': v('click'), 'heavy_installed': [m for m in ('torch', 'onnx', "
             "'polygraphy', 'tensorrt') if u.find_spec(m)]}))")
    report["versions"] = {s: json.loads(run(s, ["-c", probe], "the version probe")) for s in sides}
    if report["versions"]["aarch64"]["machine"] != "aarch64":
        raise HuseError(f"the emulated Python reports {report['versions']['aarch64']['machine']}, not aarch64")
    say(f"aarch64 under {report['qemu']} (-cpu {cpu}): " + ", ".join(
        f"{k} {report['versions']['aarch64'][k]}" for k in ("python", "onnxruntime", "numpy", "Pillow")))
    report["info"] = {s: run(s, cli + ["info", str(bundle)], "huse info") for s in sides}

    preds = {}
    for side in sides:
        for p in precisions:
            say(f"huse classify {n} products, {p}, on {side}")
            out = work / f"{side}-{p}.jsonl"
            out.unlink(missing_ok=True)
            run(side, cli + ["classify", str(bundle), "--data", str(sample), "--out", str(out), "--precision", p,
                             "--backend", "onnxruntime", "--threads", "1", "--workers", "0", "--no-progress"],
                f"huse classify --precision {p}")
            preds[side, p] = _read_jsonl(out)
    gates, results = _gates(), {}
    for p in precisions:
        r = compare_predictions(preds["aarch64", p], preds["x86_64", p])
        r["agreement_with_x86_fp32"] = compare_predictions(preds["aarch64", p], preds["x86_64", "fp32"])["agreement"]
        for side in sides:
            known = [row for row in preds[side, p] if row.get("classes") and not row.get("error")]
            right = sum(row["label"] == row["classes"] for row in known)
            r[f"top1_{side}"] = 100.0 * right / len(known) if known else None
        if p == "fp32":
            r["bar"] = f"top-1 identical, scores within {FP32_SCORE_ATOL:g}"
            r["passed"] = r["agreement"] == 100.0 and r["max_score_diff"] <= FP32_SCORE_ATOL
        else:
            r["bar"] = f"top-1 agreement with x86 >= {gates[p]}%"
            r["passed"] = r["agreement"] >= gates[p]
        r["passed"] = bool(r["passed"] and r["errors"] == 0 and r["n"] > 0)
        results[p] = r
        say(f"{p}: top-1 agreement {r['agreement']:.2f}% over {r['n']} products, max score difference "
            f"{r['max_score_diff']:.2e} ({r['bar']}): {'passed' if r['passed'] else 'FAILED'}")
    report["precisions"] = results

    if search:
        say("huse index build on x86, huse search from both sides")
        index = work / "index"
        run("x86_64", cli + ["index", "build", str(bundle), "--data", str(sample), "--out", str(index), "--kind", "flat",
                             "--threads", "1", "--overwrite"], "huse index build")
        queries = work / "queries.csv"
        sample_catalog(sample, queries, 16)
        hits = {}
        for side in sides:
            out = work / f"{side}-hits.jsonl"
            run(side, cli + ["search", str(index), "--batch", str(queries), "--target", "product", "-k", "5",
                             "--out", str(out)], "huse search")
            hits[side] = _read_jsonl(out)
        report["search"] = _compare_hits(hits["aarch64"], hits["x86_64"])
        say(f"search: {report['search']['same_hits']}/{report['search']['hits']} hits identical, max score difference "
            f"{report['search']['max_score_diff']:.2e}: {'passed' if report['search']['passed'] else 'FAILED'}")

    say("kernel counts from onnxruntime's profiler on both sides")
    ops = {s: json.loads(run(s, ["-m", "huse.benchmarks.arm64.ops", str(bundle), "--precisions", ",".join(precisions)],
                             "kernel counting")) for s in sides}
    report["kernels"] = {p: {g: {"aarch64": ops["aarch64"][p][g], "x86_64": ops["x86_64"][p][g],
                                 "only_aarch64": sorted(set(ops["aarch64"][p][g]) - set(ops["x86_64"][p][g])),
                                 "only_x86_64": sorted(set(ops["x86_64"][p][g]) - set(ops["aarch64"][p][g]))}
                             for g in ops["x86_64"][p]} for p in precisions}
    report["setup_s"] = round(setup_s, 1)
    report["check_s"] = round(time.perf_counter() - t0 - setup_s, 1)  # the CI cost, not a speed of Arm
    report["passed"] = all(r["passed"] for r in results.values()) and report.get("search", {}).get("passed", True)
    return report
