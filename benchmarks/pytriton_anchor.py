"""The Triton anchor of `huse-bench serve`: Triton Inference Server and its dynamic batcher around the same
`Classifier`, through PyTriton (which bundles tritonserver with its Python backend).

Runs inside its own virtual environment (nvidia-pytriton 0.7.0 pins numpy<2), which `huse-bench serve`
creates; it never runs in the project's environment:

    VENV/bin/python -m huse.benchmarks.pytriton_anchor BUNDLE --port 8000 --max-batch 64 --delay-us 3000

The model is `huse` with the serving contract's tensors (image and title BYTES [N, 1] in; top_k_labels,
top_k_scores, path_labels, path_scores, mode, needs_review, error, warning out), and the request code is the
Triton repository's own Python-backend model (huse/export/triton_model/model.py: `run_requests`, over
`huse serve`'s model stages), so the anchor, `huse-export --triton` and `huse serve` answer alike. Every
batch Triton hands over is counted; the counts go to --stats as JSON (rewritten twice a second) for the
benchmark's batch-size distribution.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path


def _model_module():
    import huse.export

    path = Path(huse.export.__file__).parent / "triton_model" / "model.py"
    spec = importlib.util.spec_from_file_location("huse_triton_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--delay-us", type=int, default=3000, help="dynamic batcher's max_queue_delay_microseconds")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--stats", help="JSON file for the batch-size counts")
    args = ap.parse_args(argv)

    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from huse.runtime import Classifier
    from huse.runtime.serve.models import ClassifyModel

    model = _model_module()
    clf = Classifier(args.bundle, precision=args.precision, batch_size=args.max_batch, threads=args.threads,
                     spinning=False)
    classify = ClassifyModel(clf)
    depth = clf.hierarchy.depth
    sizes: Counter[int] = Counter()
    lock = threading.Lock()

    def infer(requests):
        parsed = [(r.data.get("image"), r.data.get("title"), dict(r.parameters or {})) for r in requests]
        outs = model.run_requests(classify, parsed)
        with lock:
            sizes[sum(len(o["mode"]) for o in outs if "mode" in o)] += 1
        bad = [o["_error"] for o in outs if "_error" in o]
        if bad:  # PyTriton answers a batch as a whole: a malformed request fails it (the benchmark sends none)
            raise ValueError(bad[0])
        return outs

    def dump() -> None:
        while True:
            time.sleep(0.5)
            with lock:
                data = {str(k): v for k, v in sizes.items()}
            tmp = args.stats + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, args.stats)

    photo = model._blank_png(clf.image_spec.size)
    clf.classify(images=[photo, photo, None], titles=["warm up", None, "warm up"])  # sessions load now
    if args.stats:
        threading.Thread(target=dump, daemon=True).start()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_address="127.0.0.1", metrics_port=args.metrics_port,
                          exit_timeout_secs=2)
    blob = np.object_
    with Triton(config=config) as triton:
        triton.bind(
            model_name="huse", infer_func=infer,
            inputs=[Tensor(name="image", dtype=blob, shape=(1,), optional=True),
                    Tensor(name="title", dtype=blob, shape=(1,), optional=True)],
            outputs=[Tensor(name="top_k_labels", dtype=blob, shape=(-1,)),
                     Tensor(name="top_k_scores", dtype=np.float32, shape=(-1,)),
                     Tensor(name="path_labels", dtype=blob, shape=(depth,)),
                     Tensor(name="path_scores", dtype=np.float32, shape=(depth,)),
                     Tensor(name="mode", dtype=blob, shape=(1,)),
                     Tensor(name="needs_review", dtype=np.bool_, shape=(1,)),
                     Tensor(name="error", dtype=blob, shape=(1,)),
                     Tensor(name="warning", dtype=blob, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
