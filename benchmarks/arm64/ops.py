"""Which kernels onnxruntime runs for each graph of a bundle, counted from its own profiler.

    python -m huse.benchmarks.arm64.ops BUNDLE --precisions fp32,int8-cpu     # prints JSON

Run by the arm64 check under both Pythons (x86 and emulated aarch64): after graph optimisation the
CPU provider replaces nodes by fused and layout-specific kernels (FusedConv, NchwcConv, QLinearConv,
MatMulIntegerToFloat, ...), and which ones it picks depends on the architecture. Counting the kernels
each precision's graph runs on both sides shows a fallback to slower generic kernels on Arm, which
emulated timings could not. Imports only the standard library, numpy and onnxruntime, like the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from huse.runtime.backends.onnxrt.weights import float32_model_with_float16_weights

__all__ = ["count_kernels"]

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def count_kernels(path: str | Path, batch: int = 2, weights: str | Path | None = None) -> dict[str, int]:
    """Run one batch of zeros through `path` with onnxruntime's CPU provider and count its kernels.

    The session options are the runtime's (huse.runtime.backends.onnxrt.runner: full graph
    optimisation), with one thread so both sides schedule alike.

    Args:
        path: an .onnx file.
        batch: the size of the dynamic batch axis.
        weights: an FP16 graph whose weights replace `path`'s, as the runtime runs FP16 bundles on a CPU.

    Returns:
        kernel (op) name -> how many nodes ran it, from the profile's per-node events.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    model = str(path) if weights is None else float32_model_with_float16_weights(path, weights)
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        feed = {i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape], _DTYPES[i.type])
                for i in session.get_inputs()}
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return dict(sorted(Counter(e["args"]["op_name"] for e in events
                               if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")).items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="fp32", help="Comma-separated precisions of the bundle.")
    args = ap.parse_args(argv)
    from huse.runtime.backends.onnxrt.runner import onnx_files
    from huse.runtime.bundle import load_manifest

    m = load_manifest(args.bundle)
    bundle, out = Path(args.bundle), {}
    for p in args.precisions.split(","):
        out[p] = {}
        for g in sorted(m["models"][p]):  # what the runtime runs (fp16: the fp32 graphs with the fp16 weights)
            path, weights = onnx_files(m["models"], p, g)
            out[p][g] = count_kernels(bundle / path, weights=bundle / weights if weights else None)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
