"""The one-time GPU acceptance behind `huse doctor --gpu BUNDLE` (on an NVIDIA GPU or a Jetson).

It builds FP32/FP16/INT8 engines from the bundle's ONNX, compares each with
onnxruntime on held-out products through Polygraphy (max abs difference, top-1 agreement),
runs the gpu-marked tests and a TensorRT latency measurement, and writes one JSON report.
On a machine without a usable GPU it says why and exits 1: it never reports a GPU result it
did not measure.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from huse.runtime.errors import HuseError

__all__ = ["gpu_acceptance"]


def gpu_acceptance(bundle: Path, out_dir: Path, eval_size: int = 1000, environment: dict | None = None) -> dict[str, Any]:
    """Engines for every precision, Polygraphy comparison with onnxruntime, gpu tests, latency.

    Args:
        bundle: the bundle directory.
        out_dir: where engines, the timing cache and the benchmark result go.
        eval_size: held-out products for the comparison.
        environment: `huse.runtime.doctor.environment()` as already read, recorded in the report.
    Returns:
        The report dict (`huse doctor --gpu` writes it as report.json).
    Raises:
        HuseError: no usable GPU and TensorRT here (with the reason).
    """
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    from huse.export.api import EvalData
    from huse.runtime.backends.trt.loader import build_engine, engine_support, token_range
    from huse.runtime.bundle import CPU_ONLY_PRECISIONS, load_manifest
    from huse.runtime.preprocess import ImageSpec
    from huse.runtime.tokenizer import load_tokenizer

    ok, why = engine_support()
    if not ok:
        raise HuseError(f"GPU acceptance needs a usable NVIDIA GPU and TensorRT: {why}")
    m = load_manifest(bundle)
    data = EvalData(m["data"], "test", eval_size, ImageSpec.from_dict(m["preprocessing"]),
                    load_tokenizer(m["tokenizer"], bundle), m["labels"])
    if environment is None:
        from huse.runtime.doctor import environment as read_environment

        environment = read_environment()
    report: dict[str, Any] = {"bundle": str(bundle), "environment": environment, "engines": [], "comparisons": []}
    for precision, models in sorted(m["models"].items()):
        if precision in CPU_ONLY_PRECISIONS:  # uint8 graphs for onnxruntime's CPU kernels: TensorRT never runs them
            continue
        for graph, onnx_file in models.items():
            engine = out_dir / f"{precision}-{graph}.engine"
            t = time.perf_counter()
            entry = build_engine(bundle / onnx_file, engine, batch=(1, 8, 64), timing_cache=out_dir / "timing.cache",
                                 precision=precision, tokens=token_range(m))
            entry.update(graph=graph, build_seconds=time.perf_counter() - t)
            report["engines"].append(entry)
            feeds = data.feeds(m["graphs"][graph]["inputs"], batch=64)
            runners = [OnnxrtRunner(SessionFromOnnx(str(bundle / onnx_file)), name="onnxruntime"),
                       TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt")]
            (_, ort_iters), (_, trt_iters) = Comparator.run(runners, data_loader=feeds)
            key = "probs" if graph == "fused" else "logits"
            ref = np.concatenate([np.asarray(r[key]) for r in ort_iters])
            got = np.concatenate([np.asarray(r[key]) for r in trt_iters])
            row = {"precision": precision, "graph": graph, "n": len(ref),
                   "max_abs_diff": float(np.abs(ref - got).max()),
                   "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
                   "top1_tensorrt": float((got.argmax(1) == data.labels[: len(got)]).mean())}
            if "visual" in m["graphs"][graph]["outputs"]:  # the visual-similarity vectors (unit rows)
                vr = np.concatenate([np.asarray(r["visual"]) for r in ort_iters])
                vg = np.concatenate([np.asarray(r["visual"]) for r in trt_iters])
                row.update(visual_max_abs_diff=float(np.abs(vr - vg).max()),
                           visual_min_cosine=float((vr * vg).sum(1).min()))
            report["comparisons"].append(row)
    tests_dir = Path(__file__).resolve().parents[1] / "tests"  # present in a source checkout
    if tests_dir.is_dir():
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", str(tests_dir)],
                               capture_output=True, text=True, cwd=tests_dir.parent)
        report["gpu_tests"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-3:]}
    else:
        report["gpu_tests"] = {"skipped": "no tests/ folder: run from a source checkout to include them"}
    bench = subprocess.run([sys.executable, "-m", "huse.benchmarks.cli", "run", str(bundle), "--out", str(out_dir / "bench"),
                            "--batches", "1,8,64", "--no-cold-start"], capture_output=True, text=True)
    report["benchmark"] = {"returncode": bench.returncode, "result": str(out_dir / "bench" / "result.json")}
    return report
