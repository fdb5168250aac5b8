"""A synthetic huse-bench result, built from the same stats functions the suite uses."""

from __future__ import annotations

import numpy as np
import pytest

from huse.benchmarks.compare import SCHEMA
from huse.benchmarks.stats import repeat_summary, summarize, throughput

# Base p50 latency per item in ms; the baseline (torch) is the slowest, int8 the fastest.
_PER_ITEM_MS = {("torch", "fp32"): 4.0, ("onnxrt", "fp32"): 2.0, ("onnxrt", "fp16"): 1.8,
                ("onnxrt", "int8"): 1.5}
_MODE_FACTOR = {"image": 1.0, "text": 0.5}


def make_row(backend, precision, mode, kind, batch, *, slowdown=1.0, spread=0.02):
    """One result row from fake samples: 3 repeats whose medians differ by `spread`."""
    base = _PER_ITEM_MS[(backend, precision)] * _MODE_FACTOR[mode] * (1 + 0.1 * batch)
    base *= 1.3 if kind == "e2e" else 1.0
    base *= slowdown
    # Repeat medians at base*(1 - spread/2), base, base*(1 + spread/2): a relative range of
    # `spread`. Each repeat's samples are spread +-1% symmetrically so the median is exact.
    jitter = 1 + np.linspace(-0.01, 0.01, 21)
    repeats = [base * f / 1e3 * jitter for f in (1 - spread / 2, 1.0, 1 + spread / 2)]
    samples = np.concatenate(repeats)
    return {
        "backend": backend, "precision": precision, "mode": mode, "kind": kind, "batch": batch,
        "status": "ok", "reason": None,
        "latency_ms": summarize(samples, scale=1e3),
        "repeat_spread": repeat_summary(repeats, scale=1e3),
        "throughput_items_s": throughput(batch * samples.size, samples.sum()),
    }


def make_result(*, slow=None, slowdown=1.2, spread=0.02):
    """A whole result; `slow` names one configuration key to make `slowdown` times slower."""
    rows = []
    for backend, precision in _PER_ITEM_MS:
        for mode in _MODE_FACTOR:
            for kind in ("model", "e2e"):
                for batch in (1, 8, 32):
                    key = (backend, precision, mode, kind, batch)
                    rows.append(make_row(*key, slowdown=slowdown if key == slow else 1.0,
                                         spread=spread))
    rows.append({"backend": "trt", "precision": "fp16", "mode": "image", "kind": "model",
                 "batch": 1, "status": "skipped", "reason": "no usable NVIDIA GPU"})
    accuracy = [
        {"backend": b, "precision": p, "mode": m, "n": 1000,
         "top1": {"fp32": 0.85, "fp16": 0.85, "int8": 0.84}[p], "top1_agreement": 1.0}
        for b, p in _PER_ITEM_MS for m in _MODE_FACTOR
    ]
    memory = [{"backend": b, "precision": p, "mode": "image", "peak_rss_mib": 300.0,
               "gpu_memory_mib": None} for b, p in _PER_ITEM_MS]
    return {
        "schema": SCHEMA,
        "created": "2026-11-20T10:00:00Z",
        "machine": {"cpu": {"model": "Test CPU", "logical_cores": 2}, "gpu": None,
                    "libraries": {"onnxruntime": "1.32.0"}},
        "config": {"bundle": "tiny.bundle", "repeats": 3},
        "results": rows,
        "accuracy": accuracy,
        "memory": memory,
        "efficiency": {"peaks": {"cpu": {"flop_s": 5e10}}, "flops": {}, "rows": []},
    }


@pytest.fixture
def synthetic():
    """The `make_result` factory (tests build variants of it)."""
    return make_result
