"""Small facts about ONNX graphs that several export steps need: one copy each.

Only the standard library here, so the quantiser, the TensorRT check and the exporter can all
import it without pulling in torch or onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["producers_consumers", "strip_unused_opsets"]


def producers_consumers(graph) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Who writes and who reads each tensor of one `onnx.GraphProto` (not its subgraphs).

    Returns:
        (producers, consumers): tensor name -> the node that outputs it, and tensor name -> the
        nodes that take it as an input, in graph order, each node once.
    """
    producers: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        for name in dict.fromkeys(node.input):  # a node reading x twice (Mul(x, x)) is one reader
            if name:
                consumers.setdefault(name, []).append(node)
    return producers, consumers


def _used_domains(graph, used: set[str]) -> None:
    for node in graph.node:
        used.add(node.domain or "")
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _used_domains(sub, used)


def strip_unused_opsets(model) -> list[str]:
    """Drop opset imports no node uses (onnxruntime's optimiser leaves `com.microsoft.nchwc`,
    `org.pytorch.aten`, `ai.onnx.training`, ... behind), in place, so TensorRT's parser and other
    converters see a plain ONNX graph. The default domain always stays.

    Args:
        model: an `onnx.ModelProto` (functions' domains count as used).
    Returns:
        The removed domains, sorted.
    """
    used = {"", "ai.onnx"} | {f.domain for f in model.functions}
    _used_domains(model.graph, used)
    for f in model.functions:
        for node in f.node:
            used.add(node.domain or "")
    removed = sorted({o.domain for o in model.opset_import} - used)
    kept = [o for o in model.opset_import if o.domain not in removed]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return removed
