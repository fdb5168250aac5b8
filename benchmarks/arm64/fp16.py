"""Where the fp16 graph's error on Arm comes from: the fused graph with intermediate outputs, and copies of it
that keep chosen node sets in fp32, run on x86 and on aarch64 (under QEMU) on the same products.

    python -m huse.benchmarks.arm64 fp16 BUNDLE --data CATALOG.csv --out arm64-fp16.json

onnxruntime on x86 runs an fp16 graph's Conv and Gemm nodes as fp32 kernels between Casts; on an Arm core
with fp16 arithmetic (Armv8.2 FP16: Graviton2, Jetson Orin's Cortex-A78AE) it runs them as fp16 kernels.
This script measures, on the products whose fp32 top-2 margin is smallest (the ones a small error can flip):
- per tensor (backbone features, embeddings, per-tower softmax, fused probs), the largest difference from
  x86's fp32 graph on each side;
- per variant (nothing more in fp32 than the export's default; the head after the backbone; the shared
  classifier and softmax; the first k convolutions; every convolution), the fused probs' error on each side,
  the size of the fp16 file, and the top-1 flips against fp32 and between the sides;
- the head alone: x86's fp32 head fed each side's fp16 backbone features, which separates the backbone's
  share of the error from the head's.

`run` is the part both sides execute (standard library, numpy and onnxruntime only, like the runtime):

    python -m huse.benchmarks.arm64.fp16 run MODEL FEEDS.npz OUT.npz
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["fp16_trace", "run_graph"]

BATCH = 64  # `huse classify`'s default batch
BACKBONE = "/backbone/"  # the image graph's frozen CNN, as the train export names its nodes
FEATURES = "/backbone/Concat_output_0"  # the multi-scale backbone features the head reads


def run_graph(model: str | Path, feeds_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Run an ONNX graph on feeds (one intra-op thread, batches of 64) and save every output as float32.

    Args:
        model: the ONNX file.
        feeds_path: an .npz with one array per graph input (`|` in its keys stands for `/`).
        out: the .npz to write (`/` in tensor names becomes `|`).

    Returns:
        {"machine", "onnxruntime", "rows", "seconds"}.
    """
    import platform

    import onnxruntime as ort

    feeds = {k.replace("|", "/"): v for k, v in np.load(feeds_path).items()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    n, t0 = len(next(iter(feeds.values()))), time.perf_counter()
    parts = [session.run(names, {k: v[s:s + BATCH] for k, v in feeds.items()}) for s in range(0, n, BATCH)]
    np.savez(out, **{nm.replace("/", "|"): np.concatenate([p[i] for p in parts]).astype(np.float32)
                     for i, nm in enumerate(names)})
    return {"machine": platform.machine(), "onnxruntime": ort.__version__, "rows": n,
            "seconds": round(time.perf_counter() - t0, 1)}


def _expose(src: Path, dst: Path, tensors: list[str]) -> list[str]:
    """Copy a graph adding those of `tensors` it computes as outputs; return the ones added."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    made = {o for n in model.graph.node for o in n.output}
    typed = {v.name: v for v in model.graph.value_info}
    added = [t for t in tensors if t in made and t in typed]
    model.graph.output.extend(typed[t] for t in added)
    onnx.save(model, str(dst))
    return added


def _variants(model) -> dict[str, list[str]]:
    """Node sets to keep in fp32 on top of the export's default, by what they are in the fused graph."""
    nodes = list(model.graph.node)
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    head = [n.name for n in nodes if not n.name.startswith(BACKBONE)]
    classifier = [n.name for n in nodes if n.name.startswith("/classifier") or n.op_type == "Softmax"]
    return {"default": [], "head": head, "classifier": classifier, "first_10_convs": convs[:10],
            "first_22_convs": convs[:22], "all_convs": convs}


def _margin(p: np.ndarray, order: np.ndarray) -> np.ndarray:
    """p[top-1] - p[top-2], with top-1/top-2 taken from the reference's order."""
    rows = np.arange(len(p))
    return p[rows, order[:, 0]] - p[rows, order[:, 1]]


def fp16_trace(bundle: str | Path, data: str | Path, work: str | Path, *, limit: int = 200, rows: int = 16,
               split: str | None = "test", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure where the fused fp16 graph's error comes from on aarch64 versus x86 (see the module docstring).

    Args:
        bundle: a bundle with fp32 graphs (its run's export options are not needed: the variants are made here).
        data: a CSV catalog; `limit` rows of it, spread evenly, as `make arm64-check` samples them.
        work: a scratch folder (graphs, feeds and both sides' outputs stay there).
        limit: products sampled; all of them run on x86 in fp32 to find the smallest margins.
        rows: how many of those, smallest fp32 margin first, run on both sides (emulation is slow).
        split: take products from this split where the catalog has a `split` column.
        say: progress lines.

    Returns:
        The report (JSON-ready).
    """
    import subprocess

    import onnx
    from onnx.utils import extract_model

    from huse.benchmarks.arm64.check import TIMEOUT_S, sample_catalog
    from huse.benchmarks.arm64.env import build_env, qemu_version
    from huse.export.precision import convert_fp16
    from huse.runtime.bundle import load_manifest
    from huse.runtime.classifier import Classifier
    from huse.runtime.errors import HuseError

    bundle, work = Path(bundle).resolve(), Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fused32 = bundle / load_manifest(bundle)["models"]["fp32"]["fused"]
    env = build_env(work, say=say)
    sample = work / "sample.csv"
    n = sample_catalog(Path(data).resolve(), sample, limit, split)
    with open(sample, newline="", encoding="utf-8") as f:
        items = list(csv.DictReader(f))
    with Classifier(bundle, precision="fp32", backend="onnxruntime", threads=1) as clf:
        prepared = clf.prepare([it["image"] for it in items], [it["name"] for it in items], mode="fused")
    if "fused" not in prepared.groups or len(prepared.groups["fused"][0]) != n:
        raise HuseError(f"{sample}: every sampled product needs a photo and a title for the fused graph")
    feeds = prepared.groups["fused"][1]
    np.savez(work / "all.npz", **feeds)

    def run(side: str, model: Path, feeds_file: Path, out: Path) -> dict[str, Any]:
        prefix, environ = ([sys.executable], None) if side == "x86_64" else (env.python(), env.environ())
        r = subprocess.run(prefix + ["-m", "huse.benchmarks.arm64.fp16", "run", str(model), str(feeds_file), str(out)],
                           capture_output=True, text=True, env=environ, timeout=TIMEOUT_S)
        if r.returncode != 0:
            raise HuseError(f"running {model.name} on {side} failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")
        return json.loads(r.stdout)

    run("x86_64", fused32, work / "all.npz", work / "all-fp32.npz")
    probs = np.load(work / "all-fp32.npz")["probs"]
    top2 = np.sort(probs, 1)[:, -2:]
    picked = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:rows]
    np.savez(work / "feeds.npz", **{k: v[picked] for k, v in feeds.items()})

    model = onnx.load(str(fused32))
    watch = [f"/backbone/ReduceMean{s}_output_0" for s in ("", "_1", "_2", "_3", "_4")] + [FEATURES, "/Softmax_output_0",
                                                                                             "/Softmax_1_output_0"]
    graphs = {"fp32": work / "fp32.onnx"}
    _expose(fused32, graphs["fp32"], watch)
    sizes = {}
    for name, keep in _variants(model).items():
        plain = work / f"fp16-{name}-plain.onnx"
        info = convert_fp16(fused32, plain, keep_fp32_nodes=keep)
        sizes[name] = round(info["size_ratio"], 3)
        graphs[name] = work / f"fp16-{name}.onnx"
        _expose(plain, graphs[name], watch)
    outs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    timing = {}
    for name, path in graphs.items():
        for side in (("x86_64",) if name == "fp32" else ("x86_64", "aarch64")):
            say(f"{name} on {side}, {len(picked)} products")
            out = work / f"{side}-{name}.npz"
            timing[side, name] = run(side, path, work / "feeds.npz", out)
            outs[side, name] = dict(np.load(out))

    ref = outs["x86_64", "fp32"]
    order = np.argsort(-ref["probs"], 1)
    top1 = order[:, 0]
    report: dict[str, Any] = {"bundle": str(bundle), "data": str(data), "split": split, "sampled": n,
                              "rows": [int(i) for i in picked], "fp32_margins": [round(float(m), 4) for m in
                                                                                 _margin(ref["probs"], order)],
                              "qemu": qemu_version(), "cpu": env.cpu,
                              "onnxruntime": {s: timing[s, "default"]["onnxruntime"] for s in ("x86_64", "aarch64")}}
    # Per tensor: how far each side's default fp16 graph is from fp32 (relative to the tensor's largest value).
    tensors = {}
    for key in ref:
        if key in outs["x86_64", "default"] and key in outs["aarch64", "default"]:
            scale = float(np.abs(ref[key]).max()) or 1.0
            tensors[key.replace("|", "/")] = {
                side: round(float(np.abs(outs[side, "default"][key] - ref[key]).max()) / scale, 5)
                for side in ("x86_64", "aarch64")}
    report["default_relative_error"] = tensors
    variants = {}
    for name in graphs:
        if name == "fp32":
            continue
        a, x = outs["aarch64", name]["probs"], outs["x86_64", name]["probs"]
        variants[name] = {
            "size_ratio": sizes[name],
            "max_probs_error": {"x86_64": round(float(np.abs(x - ref["probs"]).max()), 5),
                                "aarch64": round(float(np.abs(a - ref["probs"]).max()), 5)},
            "flips_vs_fp32": {"x86_64": int((x.argmax(1) != top1).sum()), "aarch64": int((a.argmax(1) != top1).sum())},
            "flips_aarch64_vs_x86": int((a.argmax(1) != x.argmax(1)).sum()),
            "margins": {"x86_64": [round(float(m), 4) for m in _margin(x, order)],
                        "aarch64": [round(float(m), 4) for m in _margin(a, order)]}}
    report["variants"] = variants
    features = FEATURES.replace("/", "|")
    if features in ref:
        head = work / "head-fp32.onnx"
        extract_model(str(fused32), str(head), [FEATURES, "input_ids"], ["probs"])
        hybrid = {}
        for side in ("x86_64", "aarch64"):
            f = work / f"head-{side}.npz"
            np.savez(f, **{features: outs[side, "default"][features],
                           "input_ids": np.load(work / "feeds.npz")["input_ids"]})
            run("x86_64", head, f, work / f"head-{side}-out.npz")
            p = np.load(work / f"head-{side}-out.npz")["probs"]
            hybrid[side] = {"max_probs_error": round(float(np.abs(p - ref["probs"]).max()), 5),
                            "flips_vs_fp32": int((p.argmax(1) != top1).sum()),
                            "margins": [round(float(m), 4) for m in _margin(p, order)]}
        report["fp32_head_on_fp16_features"] = hybrid
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a graph on feeds and save its outputs (both sides execute this)")
    r.add_argument("model")
    r.add_argument("feeds")
    r.add_argument("out")
    args = parser.parse_args(argv)
    print(json.dumps(run_graph(args.model, args.feeds, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
