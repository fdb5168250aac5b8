"""The fp16 trace's runner (benchmarks/arm64/fp16.py): the part both sides execute, checked on x86.

The trace itself runs under QEMU for minutes (`python -m huse.benchmarks.arm64 fp16`); what it rests on
is that a graph with intermediate tensors added as outputs computes the same results as the graph
itself, and that `run` saves every output under a name the comparison can find.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from huse.benchmarks.arm64.fp16 import _expose, run_graph


def test_exposed_graph_gives_the_same_probs_and_the_watched_tensors(tiny_bundle, tmp_path):
    import onnx

    fused = tiny_bundle / "fused.onnx"
    model = onnx.load(str(fused))
    # Two intermediate tensors of the image path and one name the graph does not compute.
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    watched = [convs[0], convs[-1], "/no/such/tensor"]
    exposed = tmp_path / "exposed.onnx"
    assert _expose(fused, exposed, watched) == watched[:2]

    rng = np.random.default_rng(0)
    shapes = {i.name: [d.dim_value or 3 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    feeds = {"image": rng.standard_normal(shapes["image"]).astype(np.float32),
             "input_ids": rng.integers(1, 10, shapes["input_ids"]).astype(np.int32)}
    np.savez(tmp_path / "feeds.npz", **feeds)
    info = run_graph(fused, tmp_path / "feeds.npz", tmp_path / "plain.npz")
    assert info["rows"] == 3
    # The module's command line, as the emulated side runs it.
    r = subprocess.run([sys.executable, "-m", "huse.benchmarks.arm64.fp16", "run", str(exposed),
                        str(tmp_path / "feeds.npz"), str(tmp_path / "exposed.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 3
    plain, more = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "exposed.npz")
    assert np.array_equal(plain["probs"], more["probs"])
    for t in watched[:2]:
        assert more[t.replace("/", "|")].shape[0] == 3
