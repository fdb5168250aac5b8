"""Bundles derived from the tiny test bundle (Polygraphy's tests/models habit): generated, never downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _prune(graph) -> None:
    """Drop the nodes (and initializers) no graph output needs any more, in place."""
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), [o.name for o in graph.output]
    while stack:
        n = producer.get(stack.pop())
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            stack.extend(n.input)
    keep = [n for n in graph.node if id(n) in needed]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def make_pre_visual_bundle(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` as huse-edge exported it before visual vectors (issue 10): every image graph gives
    only `embedding` and `logits`, and the manifest has no `visual_dim`. Returns `out`."""
    import onnx

    from huse.runtime.bundle import write_manifest

    shutil.copytree(bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    for graphs in m["models"].values():
        path = out / graphs["image"]
        model = onnx.load(str(path))
        outputs = [o for o in model.graph.output if o.name != "visual"]
        del model.graph.output[:]
        model.graph.output.extend(outputs)
        _prune(model.graph)
        onnx.save(model, str(path))
    m.pop("visual_dim")
    m["graphs"]["image"]["outputs"] = ["embedding", "logits"]
    for key in ("per_output", "limits", "rule"):  # an old bundle's parity held one figure a graph
        m["parity"].pop(key, None)
    for key in ("format", "format_version", "files"):
        m.pop(key)
    write_manifest(out, m)
    return out
