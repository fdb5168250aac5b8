"""The huse-bench result format, and comparing two results for regressions.

Result JSON (schema "huse-bench/1"), written by `huse-bench BUNDLE`, read by `huse-bench compare`
and by `report.to_markdown`/`report.plot`. Times are milliseconds, memory MiB, rates per second.

    {
      "schema": "huse-bench/1",
      "created": "2026-11-20T10:00:00Z",          # ISO 8601, UTC
      "machine": {...},                           # machine.machine_info(): CPU, cores, GPU, driver, libraries
      "config": {                                 # what was asked for
        "bundle": "path", "backends": ["onnxruntime", "torch"], "precisions": ["fp32", "fp16", "int8"],
        "modes": ["image", "text", "fused"], "batches": [1, 8, 32, 128], "kinds": ["model", "e2e"],
        "repeats": 3, "seconds_per_round": 0.5, "threads": 2, "eval_size": 1000, "wall_seconds": 149.0
      },
      "results": [                                # one row per configuration
        {
          "backend": "onnxruntime",               # also "onnxruntime-cuda", "tensorrt"; "torch" rows are the
                                                  #   PyTorch eager baseline, "torch-compile" its compiled form
          "precision": "fp32",
          "mode": "image",                        # which towers/inputs the call exercises
          "kind": "model",                        # "model": backend.infer on ready tensors;
                                                  # "e2e": decode/tokenise + infer + postprocess
          "batch": 8,
          "status": "ok",                         # or "skipped"/"error" with "reason"; such
          "reason": null,                         #   rows carry no numbers and are not compared
          "latency_ms": {...},                    # stats.summarize(all samples, scale=1e3): min, mean, p50..p99, max
          "repeat_spread": {...},                 # stats.repeat_summary(repeats, scale=1e3)
          "throughput_items_s": 123.4             # batch * calls / total time (stats.throughput)
        }
      ],
      "headline": {"backend": "onnxruntime", "precision": "fp32", "baseline": "torch", "batch": 64,
                   "items_s": 820.0, "baseline_items_s": 400.0,
                   "speedup_median": 2.1, "speedup_min": 1.9, "speedup_max": 2.4, "rounds": 7, ...},
                                                  # fused e2e, onnxruntime CPU vs torch, interleaved rounds
      "cpu_int8_headline": {...},                 # the same for onnxruntime int8-cpu vs torch fp32
      "gpu_headline": {...},                      # the same for the fastest GPU backend vs torch-cuda,
                                                  #   or {"status": "skipped", "reason": ...}
      "concurrency": [{"backend", "precision", "mode", "kind", "batch", "callers", "items_s"}],
      "accuracy": [                               # one row per backend/precision/mode measured
        {"backend": "onnxruntime", "precision": "int8", "mode": "image", "n": 1000,
         "top1": 0.84,                            # fraction correct on the labelled set
         "top1_agreement": 0.99,                  # optional: same top-1 as the fp32 reference
         "max_abs_diff": 0.39}                    # optional: largest probability change vs fp32
      ],
      "memory": [                                 # per backend/precision: files and a fresh process
        {"backend": "onnxruntime", "precision": "fp32", "mode": "all", "size_mib": 52.2, "files": ["fused", ...],
         "cold_start_s": 0.43, "cold_start_spread_s": 0.05, "peak_rss_mib": 127.0, "imports_torch": false,
         "gpu_memory_mib": null}                  # that process's GPU memory (NVML); null on CPU
      ],
      "gpu_phases": [                             # TensorRT only: CUDA-event phases, with and without a CUDA graph
        {"backend": "tensorrt", "precision": "fp16", "mode": "image", "batch": 8, "cuda_graph": false,
         "h2d_ms": 0.1, "compute_ms": 0.9, "d2h_ms": 0.02, "gpu_memory_mib": 40.0}   # "graph_ms" with a graph
      ],
      "efficiency": {                             # report.build_efficiency(...) fills "rows"
        "peaks": {"cpu": {...}},                  # machine.matmul_peak_flops(); "gpu:fp32"/"gpu:fp16"/"gpu:int8"
                                                  #   from machine.gpu_matmul_peak_flops() with a CUDA torch
        "flops": {"image": {...}},                # flops.count_flops per mode
        "rows": [{"backend", "precision", "mode", "kind", "batch", "device",
                  "flops_per_item", "achieved_flop_s", "peak_flop_s", "fraction_of_peak"}]
      },
      "import_time": {"median_s": 0.13, "min_s": 0.12, "max_s": 0.15, "repeats": 7, "imports_torch": false}
    }

A configuration is identified by (backend, precision, mode, kind, batch). `compare` matches those
between two results and decides per metric whether the second is slower by more than the noise
both runs measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from huse.runtime.errors import HuseError

SCHEMA = "huse-bench/1"
KEY_FIELDS = ("backend", "precision", "mode", "kind", "batch")
# The backend whose rows are the PyTorch eager baseline that speedups are quoted against.
BASELINE_BACKEND = "torch"
# Below this relative change nothing is called a regression, however quiet the runs were:
# a 2% difference between two runs on a shared machine is not worth anyone's afternoon.
DEFAULT_FLOOR = 0.05


def _latency(key: str):
    def get(row: dict) -> float | None:
        return (row.get("latency_ms") or {}).get(key)

    return get


# metric -> (value getter, whether higher is better, repeat_spread field holding its noise).
# Throughput is derived from the same calls as the median latency, so it shares the median's noise.
METRICS = {
    "p50_ms": (_latency("p50"), False, "spread"),
    "p99_ms": (_latency("p99"), False, "p99_spread"),
    "throughput_items_s": (lambda r: r.get("throughput_items_s"), True, "spread"),
}


@dataclass(frozen=True)
class Row:
    """One metric of one configuration in two results.

    Attributes:
        backend, precision, mode, kind, batch: the configuration.
        metric: a key of METRICS.
        a, b: the metric in the first (reference) and second result; None where absent.
        ratio: b / a.
        change: how much worse b is, relative: b/a - 1 for latencies, a/b - 1 for throughput;
            positive is slower.
        threshold: the relative change this row had to exceed to count.
        status: "regression", "improvement", "same", "only_in_a" or "only_in_b".
    """

    backend: str
    precision: str
    mode: str
    kind: str
    batch: int
    metric: str
    a: float | None
    b: float | None
    ratio: float | None
    change: float | None
    threshold: float | None
    status: str

    @property
    def regression(self) -> bool:
        return self.status == "regression"

    @property
    def config(self) -> str:
        return f"{self.backend}/{self.precision}/{self.mode}/{self.kind}/b{self.batch}"


def config_key(row: dict) -> tuple:
    """The tuple that identifies a result row's configuration (KEY_FIELDS)."""
    return tuple(row.get(f) for f in KEY_FIELDS)


def _ok_rows(result: dict) -> dict[tuple, dict]:
    return {config_key(r): r for r in result.get("results", []) if r.get("status", "ok") == "ok"}


def _sort_key(key: tuple) -> tuple:
    # Batches sort as numbers (1, 8, 32), the rest as text.
    return tuple((0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x)) for x in key)


def _spread(row: dict, field: str) -> float:
    value = (row.get("repeat_spread") or {}).get(field)
    return float(value) if value is not None and math.isfinite(value) else 0.0


def compare(
    a: dict,
    b: dict,
    *,
    threshold: float | None = None,
    floor: float = DEFAULT_FLOOR,
    metrics: tuple[str, ...] = ("p50_ms", "p99_ms", "throughput_items_s"),
) -> list[Row]:
    """Match the configurations of two results and flag the metrics that got worse.

    A change counts when it is larger than the noise of both runs: with `threshold=None` a row's
    threshold is max(floor, spread of a, spread of b), the spreads being the relative range of
    the repeat medians (or repeat p99s for p99) each run measured for that configuration. A
    difference smaller than what repeating the same run already produced is not evidence.

    Args:
        a: the reference result (e.g. main).
        b: the result under test.
        threshold: a fixed relative threshold for every row instead of the spread-based one.
        floor: the least relative change ever flagged when the threshold comes from spreads.
        metrics: which METRICS to compare.

    Returns:
        Rows sorted by configuration then metric: one per metric for configurations in both,
        one "only_in_a"/"only_in_b" row (metric "-") for configurations measured in just one.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise HuseError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    rows_a, rows_b = _ok_rows(a), _ok_rows(b)
    out: list[Row] = []
    for key in sorted(set(rows_a) | set(rows_b), key=_sort_key):
        ra, rb = rows_a.get(key), rows_b.get(key)
        if ra is None or rb is None:
            status = "only_in_b" if ra is None else "only_in_a"
            out.append(Row(*key, "-", None, None, None, None, None, status))
            continue
        for metric in metrics:
            get, higher_better, spread_field = METRICS[metric]
            va, vb = get(ra), get(rb)
            if va is None or vb is None or va <= 0 or vb <= 0:
                if va is None and vb is None:
                    continue  # a metric neither run measured is not news
                status = "only_in_a" if vb is None or vb <= 0 else "only_in_b"
                out.append(Row(*key, metric, va, vb, None, None, None, status))
                continue
            ratio = vb / va
            change = (va / vb if higher_better else ratio) - 1.0
            thr = (
                threshold
                if threshold is not None
                else max(floor, _spread(ra, spread_field), _spread(rb, spread_field))
            )
            # An improvement must beat the same noise, measured as the mirror-image change.
            better = (vb / va if higher_better else va / vb) - 1.0
            status = "regression" if change > thr else "improvement" if better > thr else "same"
            out.append(Row(*key, metric, va, vb, ratio, change, thr, status))
    return out


def format_compare(rows: list[Row], *, only_changes: bool = False) -> str:
    """Render compare() rows as a fixed-width text table with a one-line verdict.

    Args:
        rows: from `compare`.
        only_changes: leave out rows whose status is "same".

    Returns:
        The table; regressions are marked "REGRESSION" so they stand out in CI logs.
    """
    shown = [r for r in rows if not (only_changes and r.status == "same")]
    header = ("config", "metric", "a", "b", "b/a", "worse by", "threshold", "verdict")
    table = [header]
    for r in shown:
        table.append((
            r.config,
            r.metric,
            _num(r.a),
            _num(r.b),
            "-" if r.ratio is None else f"{r.ratio:.3f}",
            "-" if r.change is None else f"{r.change:+.1%}",
            "-" if r.threshold is None else f"{r.threshold:.1%}",
            "REGRESSION" if r.regression else r.status,
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    compared = [r for r in rows if r.change is not None]
    n_reg = sum(r.regression for r in rows)
    n_imp = sum(r.status == "improvement" for r in rows)
    lines.append("")
    lines.append(
        f"{n_reg} regression(s), {n_imp} improvement(s) in {len(compared)} compared metric(s)"
        + (f"; {len(rows) - len(compared)} not in both" if len(rows) > len(compared) else "")
    )
    return "\n".join(lines)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def validate_result(result: dict) -> None:
    """Check that a dict has the shape of a huse-bench result (see the module docstring).

    Args:
        result: a parsed result.
    Raises:
        HuseError: naming every problem found.
    """
    problems = []
    if not isinstance(result, dict):
        raise HuseError(f"a huse-bench result is a JSON object; got {type(result).__name__}")
    if result.get("schema") != SCHEMA:
        problems.append(f"schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    if not isinstance(result.get("results"), list):
        problems.append("'results' is missing or not a list")
    else:
        for i, row in enumerate(result["results"]):
            missing = [f for f in KEY_FIELDS if f not in row]
            if missing:
                problems.append(f"results[{i}] lacks {missing}")
            elif row.get("status", "ok") == "ok" and "latency_ms" not in row:
                problems.append(f"results[{i}] ({'/'.join(map(str, config_key(row)))}) lacks latency_ms")
    if problems:
        raise HuseError("not a huse-bench result: " + "; ".join(problems))


def load_result(path: str | Path) -> dict:
    """Read and validate a result JSON file.

    Args:
        path: a file written by huse-bench.
    Returns:
        The result dict.
    Raises:
        HuseError: the file is missing, not JSON, or not a huse-bench result.
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise HuseError(f"benchmark result {path} does not exist; run `huse-bench BUNDLE --out ...` first") from None
    except json.JSONDecodeError as e:
        raise HuseError(f"benchmark result {path} is not valid JSON ({e})") from None
    try:
        validate_result(result)
    except HuseError as e:
        raise HuseError(f"{path}: {e}") from None
    return result


def machine_mismatch(a: dict, b: dict) -> list[str]:
    """The differences between two results' machines and libraries that make a comparison
    measure the machine rather than the code.

    Args:
        a, b: results.
    Returns:
        Human-readable lines such as "cpu.model: 'AMD EPYC' vs 'Intel Xeon'"; empty if alike.
    """
    fields = [
        ("cpu", "model"), ("cpu", "logical_cores"), ("cpu", "affinity_cores"),
        ("gpu", "name"), ("gpu", "driver"),
        ("libraries", "onnxruntime"), ("libraries", "tensorrt"), ("libraries", "torch"),
        ("libraries", "numpy"),
    ]
    out = []
    ma, mb = a.get("machine") or {}, b.get("machine") or {}
    for section, field in fields:
        va = (ma.get(section) or {}).get(field)
        vb = (mb.get(section) or {}).get(field)
        if va != vb:
            out.append(f"{section}.{field}: {va!r} vs {vb!r}")
    return out
