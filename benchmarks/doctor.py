"""`huse doctor [--gpu BUNDLE]`: check the environment; on a GPU or Jetson, run the acceptance once.

Without --gpu it reports what this machine can run (backends, GPU, TensorRT, CUDA bindings).
With --gpu BUNDLE it builds FP32/FP16/INT8 engines from the bundle's ONNX, compares each with
onnxruntime on held-out products through Polygraphy (max abs difference, top-1 agreement),
runs the gpu-marked tests and a TensorRT latency measurement, and writes one JSON report.
On a machine without a usable GPU it says why and exits 1: it never reports a GPU result it
did not measure.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from huse.runtime.cli import run_cli
from huse.runtime.errors import HuseError


def environment() -> dict[str, Any]:
    """What this machine has, for each backend, with the reason when something is missing."""
    from huse.runtime.backends import resolve_backend
    from huse.runtime.backends.trt.loader import engine_support
    from huse.runtime.backends.trt.gpu import gpu_status

    usable, reason, info = gpu_status()
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "jetson": Path("/etc/nv_tegra_release").exists(), "gpu": {"usable": usable, "reason": reason, **info}}
    try:
        import onnxruntime as ort

        from huse.runtime.backends.onnxrt.runner import cuda_provider_status

        cuda_ok, cuda_why = cuda_provider_status()
        env["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers(),
                              "cuda": {"usable": cuda_ok, "reason": cuda_why}}
    except ImportError as e:
        env["onnxruntime"] = {"error": f"{e}; pip install 'huse-edge[ort]'"}
    ok, why = engine_support()
    env["tensorrt_build"] = {"supported": ok, "reason": why}
    backend, device, why = resolve_backend("auto")
    env["auto_backend"] = {"backend": backend, "device": device, "reason": why}
    return env


def gpu_acceptance(bundle: Path, out_dir: Path, eval_size: int = 1000) -> dict[str, Any]:
    """Engines for every precision, Polygraphy comparison with onnxruntime, gpu tests, latency."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    from huse.export.api import EvalData
    from huse.runtime.backends.trt.loader import build_engine, engine_support
    from huse.runtime.bundle import load_manifest
    from huse.runtime.preprocess import ImageSpec
    from huse.runtime.tokenizer import load_tokenizer

    ok, why = engine_support()
    if not ok:
        raise HuseError(f"GPU acceptance needs a usable NVIDIA GPU and TensorRT: {why}")
    m = load_manifest(bundle)
    data = EvalData(m["data"], "test", eval_size, ImageSpec.from_dict(m["preprocessing"]),
                    load_tokenizer(m["tokenizer"], bundle), m["labels"])
    report: dict[str, Any] = {"bundle": str(bundle), "environment": environment(), "engines": [], "comparisons": []}
    for precision, models in sorted(m["models"].items()):
        for graph, onnx_file in models.items():
            engine = out_dir / f"{precision}-{graph}.engine"
            t = time.perf_counter()
            entry = build_engine(bundle / onnx_file, engine, batch=(1, 8, 64), timing_cache=out_dir / "timing.cache",
                                 precision=precision)
            entry.update(graph=graph, build_seconds=time.perf_counter() - t)
            report["engines"].append(entry)
            feeds = data.feeds(m["graphs"][graph]["inputs"], batch=64)
            runners = [OnnxrtRunner(SessionFromOnnx(str(bundle / onnx_file)), name="onnxruntime"),
                       TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt")]
            (_, ort_iters), (_, trt_iters) = Comparator.run(runners, data_loader=feeds)
            key = "probs" if graph == "fused" else "logits"
            ref = np.concatenate([np.asarray(r[key]) for r in ort_iters])
            got = np.concatenate([np.asarray(r[key]) for r in trt_iters])
            report["comparisons"].append({
                "precision": precision, "graph": graph, "n": len(ref),
                "max_abs_diff": float(np.abs(ref - got).max()),
                "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
                "top1_tensorrt": float((got.argmax(1) == data.labels[: len(got)]).mean())})
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


@click.command()
@click.option("--gpu", "bundle", type=click.Path(exists=True, file_okay=False),
              help="Run the GPU acceptance on this bundle (needs an NVIDIA GPU or Jetson with TensorRT).")
@click.option("--out", default="gpu-acceptance", type=click.Path(file_okay=False), show_default=True)
@click.option("--eval-size", default=1000, show_default=True)
def main(bundle, out, eval_size) -> None:
    """Check this machine; with --gpu BUNDLE, run the one-time GPU acceptance and write a report."""
    def body():
        env = environment()
        click.echo(json.dumps(env, indent=1))
        if bundle is None:
            return
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = gpu_acceptance(Path(bundle), out_dir, eval_size)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        for c in report["comparisons"]:
            click.echo(f"{c['precision']:5} {c['graph']:6} max|trt-ort| {c['max_abs_diff']:.3g}  "
                       f"top-1 agreement {100 * c['top1_agreement']:.2f}%  top-1 {100 * c['top1_tensorrt']:.2f}%")
        click.echo(f"report: {out_dir / 'report.json'}")
    run_cli(body)


if __name__ == "__main__":
    main()
