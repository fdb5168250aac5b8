"""MiniLM's text graph in INT8 forms onnxruntime offers on the CPU: speed against agreement (issue 24).

    python benchmarks/experiments/minilm_int8_forms.py BUNDLE --catalog data/phosphor-icons/catalog.csv \\
        --out benchmarks/results/cpu-2core/text-minilm-int8-forms.json --rounds 25
    (BUNDLE: a MiniLM bundle, e.g. `huse-train --data data/phosphor-icons/catalog.csv --out RUN` then `huse-export RUN
    --out BUNDLE`, whose text graph skips padding as export writes it; docs/performance.md "Title-only classification"; about 2
    minutes, alone on the machine)

MiniLM is MatMul-bound, so only cheaper MatMuls can move its text graph towards 1.5x PyTorch; the bundle's
int8-cpu precision keeps it in float because static and dynamic INT8 failed the gate before. Each form
here starts from the bundle's fp32 text.onnx with every Gemm over a constant weight rewritten as MatMul
(+ Add), which both quantizers need:

- weight-only INT8 and INT4 (`MatMulNBitsQuantizer`: symmetric blocks of 32, 64 or 128 along K; accuracy level 4
  quantises the activations per block to int8 for the product, level 0 computes in float);
- dynamic INT8 (`quantize_dynamic`, weights per channel, activations per tensor at run time), on every
  MatMul, on the feed-forward MatMuls only, or on every MatMul but the K most sensitive ones (each MatMul
  quantised alone, ranked by the mean squared change of the logits on the training titles), as a sensitivity
  analysis would exclude them.

Timing: one random batch of 64 distinct titles, each form's session with 2 intra-op threads, --rounds interleaved
rounds (default 15), p50 and its ratio to the fp32 graph's in the same rounds. Agreement: top-1 of each form against
fp32 on the distinct titles of each split of the catalog (the export's INT8 gate asks 99% on held-out items).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def gemm_as_matmul(model):
    """Every Gemm over a constant weight (alpha = beta = 1, no transA) as MatMul (+ Add): the same function."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w = np.ascontiguousarray(w.T if attrs.get("transB", 0) else w)
        model.graph.initializer.append(numpy_helper.from_array(w, n.input[1] + "_kn"))
        product = n.output[0] + "_mm" if len(n.input) > 2 else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1] + "_kn"], [product], name=n.name + "_mm"))
        if len(n.input) > 2:
            nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=n.name + "_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def forms(src: Path, tmp: Path, sensitivity) -> dict[str, Path]:
    """Each form's graph in `tmp`; `sensitivity(path)` scores a graph with one MatMul quantised (higher: worse),
    or is None to skip the forms that need the ranking."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    base = tmp / "matmul.onnx"
    onnx.save(gemm_as_matmul(onnx.load(str(src))), str(base))
    out = {"fp32": src}
    for bits, block, level in [(8, 32, 4), (8, 64, 4), (8, 128, 4), (4, 32, 4), (8, 32, 0)]:
        q = MatMulNBitsQuantizer(onnx.load(str(base)), algo_config=DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=True, accuracy_level=level, bits=bits))
        q.process()
        path = out[f"weight-only int{bits}, block {block}, accuracy level {level}"] = tmp / f"nbits{bits}-{block}-{level}.onnx"
        q.model.save_model_to_file(str(path), False)
    m = onnx.load(str(base))
    shapes = {i.name: numpy_helper.to_array(i).shape for i in m.graph.initializer}
    matmuls = [(n.name, shapes[n.input[1]]) for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    ffn = max(max(s) for _, s in matmuls)  # the feed-forward width (1536 in all-MiniLM-L6-v2)
    groups = {"every MatMul": [n for n, _ in matmuls], "feed-forward MatMuls": [n for n, s in matmuls if ffn in s]}
    def dynamic(nodes: list[str], path: Path) -> Path:
        quantize_dynamic(str(base), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"])
        return path

    for label, nodes in groups.items():
        out[f"dynamic int8, {label} ({len(nodes)})"] = dynamic(nodes, tmp / f"dynamic-{len(nodes)}.onnx")
    if sensitivity is None:
        return out
    score = {n: sensitivity(dynamic([n], tmp / "one.onnx")) for n, _ in matmuls}
    ranked = sorted(score, key=score.get, reverse=True)
    for k in (1, 2, 4, 8, 12):
        out[f"dynamic int8, every MatMul but the {k} most sensitive"] = dynamic(ranked[k:], tmp / f"dynamic-but-{k}.onnx")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--catalog", required=True, type=Path, help="titles to measure agreement on (its `name` column)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--splits", default="train,val,test,all", help="the catalog's splits to measure agreement on")
    ap.add_argument("--no-sensitivity", action="store_true",
                    help="skip the sensitivity ranking (one pass over the training titles per MatMul: long on a large catalog)")
    a = ap.parse_args()
    import onnxruntime as ort

    from huse.runtime.classifier import Classifier
    from huse.runtime.tokenizer import normalise_title

    clf = Classifier(a.bundle)
    rows = list(csv.DictReader(open(a.catalog, newline="")))
    splits = {s: sorted({r["name"] for r in rows if r.get("split", "all") == s}) for s in ("train", "val", "test", "all")}
    splits = {s: t for s, t in splits.items() if t and s in a.splits.split(",")}
    titles = sorted({r["name"] for r in rows})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2

    def session(path: Path):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def feed(ts):
        f = clf.tokenizer.inputs([normalise_title(t) or "" for t in ts])
        return {k: f[k] for k in ("input_ids", "attention_mask")}

    def run(s, ts) -> np.ndarray:
        return np.concatenate([s.run(["logits"], feed(ts[i:i + 64]))[0] for i in range(0, len(ts), 64)])

    calibration = splits.get("train", titles)
    reference = None if a.no_sensitivity else run(session(a.bundle / "text.onnx"), calibration)
    with tempfile.TemporaryDirectory() as tmp:
        paths = forms(a.bundle / "text.onnx", Path(tmp), None if a.no_sensitivity else
                      lambda p: float(((run(session(p), calibration) - reference) ** 2).mean()))
        sessions = {k: session(p) for k, p in paths.items()}
    logits = {k: {sp: run(s, ts) for sp, ts in splits.items()} for k, s in sessions.items()}
    batch = feed([titles[i] for i in np.random.default_rng(0).choice(len(titles), 64, replace=False)])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, batch)
    for _ in range(a.rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, batch)
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["fp32"])
    rows = []
    for k in sessions:
        agree = {sp: round(float((logits[k][sp].argmax(1) == logits["fp32"][sp].argmax(1)).mean()), 4) for sp in splits}
        ratios = [f / t for f, t in zip(times["fp32"], times[k])]
        rows.append({"form": k, "p50_ms": round(1e3 * statistics.median(times[k]), 2),
                     "speedup_vs_fp32": round(ref / statistics.median(times[k]), 3),
                     "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)], "top1_agreement": agree})
        print(f"{k:56s} p50 {rows[-1]['p50_ms']:7.2f} ms  {rows[-1]['speedup_vs_fp32']:.2f}x fp32  agreement "
              + ", ".join(f"{sp} {100 * v:.2f}%" for sp, v in agree.items()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"bundle": str(a.bundle), "titles": {sp: len(t) for sp, t in splits.items()},
                                 "batch": 64, "rounds": a.rounds,
                                 "threads": 2, "onnxruntime": ort.__version__, "forms": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
