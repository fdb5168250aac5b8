"""Reduced-precision copies of the bundle graphs: FP16, INT8 Q/DQ, and the gate that decides whether they ship.

TensorRT 11 builds strongly typed networks only, so the precision of an engine is decided here, in the ONNX
graph: FP16 initializers and tensors for FP16, explicit QuantizeLinear/DequantizeLinear (Q/DQ) pairs for INT8.
Both conversions run on the CPU; onnxruntime executes the results, which is how the accuracy gate measures them
before any GPU sees them.

The INT8 graphs follow the Q/DQ form TensorRT accepts: symmetric (zero point 0), int8 activations and weights,
one scale per output channel for weights (QuantizeLinear `axis` set, opset >= 13) and one scale per tensor for
activations. Only Conv, Gemm and MatMul are quantised: they are where TensorRT's INT8 kernels pay off, and
everything between them (ReLU6, Add, pooling, the L2 normalisation, Softmax) stays in float, which TensorRT fuses
around the Q/DQ boundaries anyway.

Measured on the realistic image graph (EfficientNet-Lite0 ImageNet weights, multi-scale 1984-d features, a 5x512
tower + L2 + Linear(512, 10) trained on frozen features of 4096 Fashion-MNIST photos, plus a Softmax for probs;
exported at 64x64; 256 calibration and 512 eval photos; FP32 is 21.8 MB with 84.57% top-1; onnxruntime 1.32 CPU;
the script is kept outside the repo, see the export hand-over notes). Bars: FP16 <= 55% of FP32 and >= 99.9%
agreement; INT8 <= 30%, >= 99% agreement and <= 0.5 points drop.

=========================================  =====  ==========  ==========  =========  =====  ====
candidate                                  size   max|d emb|  max|d lgt|  agreement  drop   gate
=========================================  =====  ==========  ==========  =========  =====  ====
FP16, L2 norm kept FP32 (default)          50.4%  0.0031      0.136       100%       0.00   pass
FP16 arithmetic (torch half, not ORT)      -      0.0023      0.111       99.80%     0.00   fail
INT8 percentile, all 55 Conv/Gemm          26.2%  0.21        8.55        71.09%     14.45  fail
INT8 minmax, all                           26.2%  0.21        8.13        71.68%     14.84  fail
INT8 entropy, all                          26.2%  0.23        9.95        22.66%     60.35  fail
INT8 percentile, stem + classifier float   26.3%  0.21        8.12        71.88%     14.65  fail
=========================================  =====  ==========  ==========  =========  =====  ====

What the numbers say:
- onnxruntime's CPU provider has few FP16 kernels and runs most FP16 nodes in FP32 between Casts, so on CPU the
  FP16 row measures FP16 weights and input, not FP16 arithmetic. True FP16 arithmetic flipped 1 of 512 (a sample
  whose top-2 logits were 0.038 apart); with 512 eval images the 99.9% bar allows no flip at all, so the FP16 gate
  belongs on the TensorRT engine with >= 1000 images.
- INT8 is hurt by the early layers, not by the stem or the classifier alone: this backbone amplifies small input
  changes on these photos (Gaussian noise of 0.3 grey levels flips 1.8% of top-1; rounding the input to the
  int8 grid alone flips 0.8%), so rounding errors of the first blocks reach the features. Keeping the first
  Convs in float (`sensitive_nodes(model, first_convs=k)["first_conv"]`) fixes it; how many depends on the model
  and data, so the export measures it: it walks `huse.export.finish.INT8_FLOAT_CONVS` and keeps the first k that
  passes the gate (the measured rungs are noted there and every attempt is recorded in the manifest).
- onnxruntime's entropy calibration (with 2048 bins, as TensorRT's) gives the ReLU6 outputs that feed the
  depthwise convs a range of 0.38 where minmax gives 6.0: the smallest candidate its KL search allows. It is the
  worst choice here, and percentile (99.999) is the default for that reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from huse.export.onnx_graph import producers_consumers
from huse.export.trt_compat import qdq_issues
from huse.runtime.errors import HuseError

# ---------------------------------------------------------------------------------------
# FP16

# What can be kept in FP32, by name. Patterns are matched in the graph, so "l2norm" keeps only the normalisation
# subgraph in FP32: a blanket op-type list (Clip, Div, ReduceMean) would also catch EfficientNet's 34 ReLU6 Clips
# and its global-average pools, putting Casts around every activation and breaking TensorRT's Conv+ReLU6 fusion.
FP16_PATTERNS = {
    "l2norm": "x / max(||x||, eps): ReduceL2 (or ReduceSumSquare/Sqrt, Pow/Mul+ReduceSum/Sqrt) -> Clip/Max "
              "-> Expand -> Div; the sum of squares is what can overflow FP16 (max 65504)",
    "softmax": "Softmax and LogSoftmax nodes (the fused graph's probs)",
    "reductions": "ReduceSum, ReduceMean, ReduceMax and GlobalAveragePool nodes (sums over many values)",
}
# Measured on the realistic image graph (EfficientNet-Lite0 multi-scale 1984-d features + trained 5x512 tower
# + L2 + Linear(512, 10), 512 Fashion-MNIST eval images at 64x64; see the module docstring):
# - onnxruntime CPU, nothing kept FP32: max |d embedding| 0.0031, max |d logit| 0.136, max |d prob| 0.0165,
#   top-1 agreement 100%. Keeping l2norm, softmax or all three in FP32 changed none of these beyond 4e-4:
#   accuracy never asks for the block list. (onnxruntime's CPU provider has few FP16 kernels and runs most of
#   the graph in FP32 between Casts, so this measures FP16 weights and input, not FP16 arithmetic.)
# - True FP16 arithmetic (torch half on CPU, BN folded as in the ONNX graph): agreement 99.80% (1 of 512 flips, a
#   sample whose FP32 top-2 logit margin is 0.038 against a median of 4.5); keeping L2 + classifier in FP32 gives
#   the same 99.80% (max |d logit| 0.109 vs 0.111): the flip comes from the backbone, not from the normalisation.
# - Overflow headroom: the largest sum of squares the L2 norm forms is 4365 (max |x| 7.7) against FP16's 65504,
#   only 15x, and it grows as the tower trains (the tower output's scale is unconstrained before the
#   normalisation). An overflow turns the embedding into 0 and every logit into the bias.
# So the default keeps only the l2norm subgraph in FP32: it costs a few Casts on an (N, 512) tensor and removes a
# training-dependent failure; softmax and reductions stay FP16 because measurement shows no need.
FP16_DEFAULT_KEEP_FP32: tuple[str, ...] = ("l2norm",)


def convert_fp16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    keep_fp32_ops: Iterable[str] | None = None,
    keep_fp32_nodes: Iterable[str] = (),
) -> dict[str, Any]:
    """Write an FP16 copy of an ONNX graph whose inputs and outputs stay float32.

    Float32 IO means the runtime feeds and reads the same arrays for every precision; the Casts at the edges
    cost nothing next to the network.

    Args:
        src: the FP32 ONNX file.
        dst: where to write the FP16 file (parent folders are created).
        keep_fp32_ops: what to compute in FP32 (Cast in, Cast out): pattern names from `FP16_PATTERNS`
            ("l2norm", "softmax", "reductions"), matched to the nodes that form them, and/or ONNX op types
            (e.g. "Softmax"), which keep every node of that type. None means `FP16_DEFAULT_KEEP_FP32`, the
            measured default. onnxconverter-common's own block list (ops it has no FP16 form for) always applies.
        keep_fp32_nodes: node names computed in FP32, for a finer choice.
    Returns:
        dict with `path`, `size_bytes`, `src_size_bytes`, `size_ratio` (FP16 / FP32), `blocked_ops` (what was
        asked for), `blocked_nodes` (names of the nodes of this graph that stay FP32) and `large_constant_nodes`
        (those among them kept FP32 because a constant they read does not fit FP16; always on).
    """
    onnx = _import("onnx")
    float16 = _import("onnxconverter_common.float16")
    src, dst = Path(src), Path(dst)
    model = _load(src)
    for k, n in enumerate(model.graph.node):
        n.name = n.name or f"{n.op_type}_{k}"  # the block list and the converter's Casts go by node name
    asked = tuple(FP16_DEFAULT_KEEP_FP32 if keep_fp32_ops is None else keep_fp32_ops)
    if isinstance(keep_fp32_ops, str):
        asked = (keep_fp32_ops,)  # a lone name, not its characters
    op_types, nodes = set(), list(keep_fp32_nodes)
    _check_node_names(model, nodes, what="keep in FP32")
    for name in asked:
        if name in FP16_PATTERNS:
            nodes += fp16_pattern_nodes(model, name)
        elif onnx.defs.has(name):
            op_types.add(name)
        else:
            raise HuseError(f"Cannot keep {name!r} in FP32: it is neither a pattern ({sorted(FP16_PATTERNS)}) "
                            "nor an ONNX op type; pass one of those, or node names as keep_fp32_nodes")
    out_of_range = _nodes_with_large_constants(model, _FP16_CLAMP)
    nodes += out_of_range
    # The converter's default list holds ops without FP16 kernels (Resize, TopK, Range, ...); passing our own
    # list replaces it, so the union keeps those safe too.
    op_block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | op_types)
    node_block = sorted(set(nodes))
    blocked = [n.name for n in model.graph.node if n.op_type in op_block or n.name in node_block]
    _split_consumed_outputs(model)
    try:
        with warnings.catch_warnings():
            # One warning per weight below FP16's smallest normal (truncated to 1e-7): hundreds of
            # lines, expected, and the accuracy gate measures their effect.
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=op_block, node_block_list=node_block)
    except Exception as e:  # the converter raises bare ValueError/AssertionError on graphs it cannot handle
        raise HuseError(f"FP16 conversion of {src} failed ({type(e).__name__}: {e}); "
                        "check the graph with `polygraphy inspect model` or keep the failing op in FP32 "
                        "with keep_fp32_ops") from e
    _retype_float_casts(converted, set(blocked))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dst))
    size, src_size = dst.stat().st_size, src.stat().st_size
    return {"path": str(dst), "size_bytes": size, "src_size_bytes": src_size, "size_ratio": size / src_size,
            "blocked_ops": list(asked), "blocked_nodes": blocked, "large_constant_nodes": out_of_range}


def _retype_float_casts(model, blocked: set[str]) -> None:
    """Make converted Cast-to-float32 nodes cast to float16, as their (converted) outputs now declare.

    onnxconverter-common retypes a Cast's output but not its `to` attribute, so a graph that casts an
    integer tensor to float (MiniLM's attention mask) no longer loads: "Type (tensor(float16)) of output
    arg ... does not match expected type (tensor(float))". Blocked (FP32) nodes keep their Casts.
    """
    from onnx import TensorProto

    declared = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    for n in model.graph.node:
        if n.op_type != "Cast" or n.name in blocked or declared.get(n.output[0]) != TensorProto.FLOAT16:
            continue
        for a in n.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16


# onnxconverter-common clamps every converted constant to +-1e4 (its max_finite_val; FP16 itself ends at 65504).
_FP16_CLAMP = 1e4


def _nodes_with_large_constants(model, limit: float) -> list[str]:
    """Nodes that read a float initializer with values beyond `limit`: converting it would change the model.

    Found in the bundle graphs: FeatureNorm's inv_std = 1 / (std + 1e-6) is 1e6 for a backbone feature that never
    varied in training; clamped to 1e4 it moved the FP16 embedding by 0.097 and the logits by 0.75 on the tiny
    test bundle. Such a node keeps FP32 and its constant.
    """
    from onnx import numpy_helper

    large = set()
    for t in model.graph.initializer:
        if t.data_type == 1:  # FLOAT
            a = numpy_helper.to_array(t)
            if a.size and float(np.abs(a).max()) > limit:
                large.add(t.name)
    return [n.name for n in model.graph.node if any(i in large for i in n.input)]


def fp16_pattern_nodes(model, pattern: str) -> list[str]:
    """Names of the nodes that form an FP16-sensitive pattern in a graph.

    Args:
        model: an `onnx.ModelProto`.
        pattern: a key of `FP16_PATTERNS`.
    Returns:
        node names in graph order (empty when the graph has no such pattern).
    """
    if pattern not in FP16_PATTERNS:
        raise HuseError(f"FP16 pattern {pattern!r} not found; available patterns = {sorted(FP16_PATTERNS)}")
    graph = model.graph
    if pattern == "softmax":
        return [n.name for n in graph.node if n.op_type in ("Softmax", "LogSoftmax")]
    if pattern == "reductions":
        return [n.name for n in graph.node
                if n.op_type in ("ReduceSum", "ReduceMean", "ReduceMax", "GlobalAveragePool")]
    producers, consumers = producers_consumers(graph)
    found: set[str] = set()
    for n in graph.node:
        # The norm's start: ReduceL2(x), or ReduceSumSquare(x), or ReduceSum(Pow(x, 2) | Mul(x, x)).
        if n.op_type in ("ReduceL2", "ReduceSumSquare"):
            x, chain = n.input[0], [n]
        elif n.op_type == "ReduceSum" and n.input[0] in producers and \
                producers[n.input[0]].op_type in ("Pow", "Mul"):
            sq = producers[n.input[0]]
            x, chain = sq.input[0], [sq, n]
        else:
            continue
        # Follow the norm forward through the eps clamp and broadcast to the Div that consumes x.
        frontier, path = list(n.output), []
        while frontier:
            t = frontier.pop()
            for c in consumers.get(t, []):
                if c.op_type == "Div" and c.input[0] == x:
                    found.update(m.name for m in chain + path + [c])
                elif c.op_type in ("Sqrt", "Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Identity"):
                    path.append(c)
                    frontier.extend(c.output)
    return [n.name for n in graph.node if n.name in found]


def _split_consumed_outputs(model) -> None:
    """Give every graph output that other nodes also read (image.onnx's `embedding` feeds the classifier) its own
    Identity, in place.

    keep_io_types casts such an output back to float32 but leaves its internal readers on that float32 tensor
    while their other inputs are FP16: onnxruntime then refuses the graph ("Gemm bound to different types").
    """
    from onnx import helper

    graph = model.graph
    read = {i for n in graph.node for i in n.input}
    for out in graph.output:
        if out.name not in read:
            continue
        inner = f"{out.name}__internal"
        for n in graph.node:
            for k, name in enumerate(n.output):
                if name == out.name:
                    n.output[k] = inner
            for k, name in enumerate(n.input):
                if name == out.name:
                    n.input[k] = inner
        graph.node.append(helper.make_node("Identity", [inner], [out.name], name=f"{out.name}__output"))


# ---------------------------------------------------------------------------------------
# INT8

CALIBRATION_METHODS = ("entropy", "percentile", "minmax")
QUANTIZERS = ("ort", "modelopt")
# Conv/Gemm/MatMul carry the FLOPs and have INT8 kernels in TensorRT. Gather (the text graph's embedding
# lookup) is left alone: a lookup has no arithmetic for INT8 kernels to speed up, and its indices are the int32
# input_ids. The table stays float32, which weighs on the INT8 size only when the vocabulary is large (the tiny
# test bundle's text graph: 28.7% of FP32).
QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")
# modelopt knows 'entropy' and 'max' for INT8; it has no percentile calibrator.
_MODELOPT_METHODS = {"entropy": "entropy", "minmax": "max"}


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib_feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    method: str | None = None,
    exclude_nodes: Iterable[str] = (),
    quantizer: str = "ort",
    percentile: float = 99.999,
    ranges: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write an INT8 Q/DQ copy of an ONNX graph, calibrated on real inputs, in the form TensorRT accepts.

    Args:
        src: the FP32 ONNX file.
        dst: where to write the Q/DQ file (parent folders are created).
        calib_feeds: calibration batches, each a feed dict `{input name: array}` for every graph input (e.g.
            `{"image": (N, 3, 64, 64) float32}`); a few hundred real images in all is enough.
        method: how activation ranges are chosen: "percentile" (clip at `percentile` of |x|), "minmax" (no
            clipping) or "entropy" (the KL-divergence choice TensorRT's calibrator makes; onnxruntime's version
            clips ReLU6 activations far too hard here, see the module notes). None: the best measured one the
            quantizer offers, "percentile" for ort, "minmax" for modelopt (which has no percentile).
        exclude_nodes: node names kept in float (e.g. from `sensitive_nodes`). A name that is not in the graph
            raises HuseError rather than being silently ignored.
        quantizer: "ort" (onnxruntime.quantization, always available with the export extra) or "modelopt"
            (NVIDIA TensorRT Model Optimizer, if installed).
        percentile: the percentile for method="percentile" (onnxruntime only).
        ranges: a calibration-ranges file (onnxruntime only): read when it exists, else written. The ranges
            depend on the graph, the feeds and the method, not on `exclude_nodes`, so the rungs of the export's
            float-convs ladder calibrate once.
    Returns:
        dict with `path`, `size_bytes`, `src_size_bytes`, `size_ratio`, `method`, `quantizer`,
        `quantized_nodes` (count of Conv/Gemm/MatMul with Q/DQ weight and input), `quantized_node_names`,
        `excluded_nodes`, `qdq_nodes` (QuantizeLinear + DequantizeLinear count).
    """
    if method is None:
        method = "minmax" if quantizer == "modelopt" else "percentile"
    if method not in CALIBRATION_METHODS:
        raise HuseError(f"Calibration method {method!r} not found; available methods = {list(CALIBRATION_METHODS)}")
    if quantizer not in QUANTIZERS:
        raise HuseError(f"Quantizer {quantizer!r} not found; available quantizers = {list(QUANTIZERS)}")
    onnx = _import("onnx")
    src, dst = Path(src), Path(dst)
    model = _load(src)
    feeds = _check_feeds(model, calib_feeds)
    exclude = tuple(exclude_nodes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if quantizer == "ort":
        quantized = _quantize_ort(src, dst, feeds, method, exclude, percentile, ranges)
    else:
        quantized = _quantize_modelopt(src, dst, feeds, method, exclude)
    _keep_outputs_float(quantized)
    onnx.save(quantized, str(dst))
    problems = qdq_issues(quantized)
    if problems:
        raise HuseError(f"The {quantizer} quantizer wrote {dst} with Q/DQ that TensorRT would not accept as "
                        f"intended: {'; '.join(map(str, problems[:5]))}; report this with the quantizer's version")
    return _describe_quantized(src, dst, quantized, method=method, exclude=exclude, quantizer=quantizer)


def _describe_quantized(src: Path, dst: Path, quantized, *, method: str, exclude: tuple[str, ...],
                        **extra) -> dict[str, Any]:
    """The info dict both INT8 forms return (see `quantize_int8`); `extra` adds their own keys."""
    names = _quantized_node_names(quantized)
    size, src_size = dst.stat().st_size, src.stat().st_size
    return {"path": str(dst), "size_bytes": size, "src_size_bytes": src_size, "size_ratio": size / src_size,
            "method": method, **extra, "quantized_nodes": len(names),
            "quantized_node_names": names, "excluded_nodes": list(exclude),
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quantized.graph.node)}


# INT8 for onnxruntime on CPUs ("int8-cpu"): a second INT8 form, not the TensorRT one. onnxruntime's x86 and
# Arm int8 kernels take uint8 activations with a zero point (u8s8); on the symmetric int8 activations TensorRT
# wants, its CPU provider is 5x slower than FP32 (measured: image graph, batch 64, 307 vs 65 ms). Quantising
# Conv and the ops around it (ReLU6 as Clip, the residual Add) lets it chain QLinearConv kernels through the
# backbone; the towers, the L2 normalisation and the classifier stay float (quantising those too cost 15
# points of top-1 agreement). Measured on the default recipe (fused graph, batch 64, 2 cores, minmax): 37 ms vs 60 ms
# for FP32, agreement 99.50% and drop -0.10 points with the first 10 Convs in float (all Convs: 95.9%).
CPU_INT8_OP_TYPES = ("Conv", "Clip", "Add")


def quantize_int8_cpu(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib_feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    method: str | None = None,
    exclude_nodes: Iterable[str] = (),
    percentile: float = 99.999,
    ranges: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write an INT8 copy of an ONNX graph for onnxruntime's CPU kernels (asymmetric uint8 activations).

    TensorRT does not take these graphs (uint8 zero points); `quantize_int8` writes the TensorRT form.

    Args:
        src: the FP32 ONNX file.
        dst: where to write the quantised file (parent folders are created).
        calib_feeds: calibration batches (feed dicts for every graph input), as for `quantize_int8`.
        method: "percentile" (default), "minmax" or "entropy".
        exclude_nodes: node names kept in float. A name not in the graph raises HuseError.
        percentile: the percentile for method="percentile".
        ranges: a calibration-ranges file, read when it exists, else written (as for `quantize_int8`; the two
            forms' ranges differ, so each needs its own).
    Returns:
        dict with `path`, `size_bytes`, `src_size_bytes`, `size_ratio`, `method`, `activations`
        ("uint8, asymmetric"), `quantized_nodes`, `quantized_node_names` (Conv/Gemm/MatMul with Q/DQ),
        `excluded_nodes`, `qdq_nodes`.
    """
    method = method or "percentile"
    if method not in CALIBRATION_METHODS:
        raise HuseError(f"Calibration method {method!r} not found; available methods = {list(CALIBRATION_METHODS)}")
    onnx = _import("onnx")
    q = _import("onnxruntime.quantization")
    src, dst = Path(src), Path(dst)
    model = _load(src)
    feeds = _check_feeds(model, calib_feeds)
    exclude = tuple(exclude_nodes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="huse-int8-cpu-") as tmp:
        pre = _ort_pre_process(src, Path(tmp), exclude)
        # A node that writes a graph output stays float. The fused graph's last node is an Add (the two
        # modalities' probabilities, weighted), and quantised it rounded every probability to 255 steps of its
        # range (1/510 for make demo's model): on fashion-products' test photos 62% of them became 0, rows summed to
        # 0.994-1.005, and the order after the top-1 agreed with FP32 on 69% of items (top-2) and 20% (top-5).
        outputs = {o.name for o in model.graph.output}
        exclude += tuple(n.name for n in model.graph.node
                         if n.op_type in CPU_INT8_OP_TYPES and outputs & set(n.output) and n.name not in exclude)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                q.quantize_static(
                    str(pre), str(dst), _FeedReader(feeds), calibration_cache_path=ranges,
                    quant_format=q.QuantFormat.QDQ, per_channel=True,
                    activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                    calibrate_method=_ort_method(q, method), op_types_to_quantize=list(CPU_INT8_OP_TYPES),
                    nodes_to_exclude=list(exclude), extra_options={"CalibPercentile": percentile})
        except Exception as e:
            raise HuseError(f"onnxruntime CPU INT8 quantisation of {src} failed ({type(e).__name__}: {e}); "
                            "check that the calibration feeds run on the FP32 graph") from e
    quantized = onnx.load(str(dst))
    _keep_outputs_float(quantized)
    onnx.save(quantized, str(dst))
    return _describe_quantized(src, dst, quantized, method=method, exclude=exclude, activations="uint8, asymmetric")


def _keep_outputs_float(model) -> None:
    """Make graph outputs the float tensors again where the quantizer handed out their Q/DQ copy, in place.

    onnxruntime quantises image.onnx's `embedding` for the classifier that reads it, and in doing so makes the
    graph output the dequantised copy: the embedding users retrieve with would be rounded to 1/127 of its
    range (measured: norms off by 1.3e-3). The classifier keeps reading the Q/DQ copy; the output gets the
    float value the L2 normalisation computed.
    """
    graph = model.graph
    producers, _ = producers_consumers(graph)
    for out in graph.output:
        dq = producers.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] == out.name:
            continue
        float_name, dq_name = q.input[0], f"{out.name}__dq"
        for n in graph.node:
            n.input[:] = [dq_name if i == out.name else i for i in n.input]
        dq.output[0] = dq_name
        for n in graph.node:
            n.input[:] = [out.name if i == float_name else i for i in n.input]
            n.output[:] = [out.name if o == float_name else o for o in n.output]


def _even_batches(feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The same samples cut into batches of one size (the largest divisor of the sample count up to the
    largest batch given): onnxruntime's histogram calibrators (entropy, percentile) stack each batch's
    outputs and fail on a short last batch ("inhomogeneous shape"), e.g. 91 products in batches of 64."""
    sizes = {len(next(iter(f.values()))) for f in feeds}
    if len(sizes) <= 1:
        return list(feeds)
    whole = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    n = len(next(iter(whole.values())))
    batch = max(d for d in range(1, max(sizes) + 1) if n % d == 0)
    return [{k: v[s:s + batch] for k, v in whole.items()} for s in range(0, n, batch)]


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts (re-cut into even batches)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._feeds = _even_batches(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _ort_method(q, method: str):
    """onnxruntime's CalibrationMethod for one of CALIBRATION_METHODS."""
    return {"entropy": q.CalibrationMethod.Entropy, "percentile": q.CalibrationMethod.Percentile,
            "minmax": q.CalibrationMethod.MinMax}[method]


def _ort_pre_process(src: Path, tmp: Path, exclude: tuple[str, ...]) -> Path:
    """onnxruntime's quantisation pre-processing into `tmp`/pre.onnx, after checking `exclude` names.

    It folds the constant pad arithmetic the exporter leaves in front of every 'SAME' conv and stores shapes,
    so the quantizer sees plain Pad -> Conv. Symbolic shape inference is skipped: it fails on
    EfficientNet-Lite0, and ONNX's own shape inference suffices with only the batch axis dynamic.
    """
    pre = tmp / "pre.onnx"
    _import("onnxruntime.quantization").quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    _check_node_names(_import("onnx").load(str(pre)), exclude, what="exclude from INT8")
    return pre


def _quantize_ort(src: Path, dst: Path, feeds, method: str, exclude: tuple[str, ...], percentile: float,
                  ranges: str | os.PathLike | None = None):
    onnx = _import("onnx")
    q = _import("onnxruntime.quantization")
    with tempfile.TemporaryDirectory(prefix="huse-int8-") as tmp:
        pre, cache = _ort_pre_process(src, Path(tmp), exclude), Path(ranges or Path(tmp) / "ranges.json")
        try:
            # Calibrate here rather than inside quantize_static: quantize_static gives the entropy calibrator
            # 128 histogram bins and 128 quantised bins, which leaves the KL search one candidate (the full
            # range), so "entropy" silently equals "minmax" (measured: identical scales and outputs). TensorRT's
            # entropy calibration uses 2048 bins for 128 quantised levels; so do we.
            if not cache.is_file():
                calibrator = q.create_calibrator(
                    pre, list(QUANTIZED_OP_TYPES), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=_ort_method(q, method),
                    extra_options={"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128,
                                   "percentile": percentile})
                with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints its histogram progress
                    calibrator.collect_data(_FeedReader(feeds))
                    _save_ranges(calibrator.compute_data(), cache)
                del calibrator
            q.quantize_static(
                str(pre), str(dst), None, calibration_cache_path=str(cache),
                quant_format=q.QuantFormat.QDQ, per_channel=True,
                activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                calibrate_method=_ort_method(q, method), op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                nodes_to_exclude=list(exclude),
                extra_options={
                    "ActivationSymmetric": True,  # zero point 0: what TensorRT's INT8 expects
                    "WeightSymmetric": True,
                    # Q/DQ on the inputs of Conv/Gemm/MatMul only, where TensorRT wants them (it fuses
                    # Conv+ReLU6 and requantises at the next layer's input). Quantising a Conv's output as well
                    # rounds the pre-activation, whose range (BN folded in) reaches 40-95 on EfficientNet-Lite0,
                    # at a step of up to 0.75 before ReLU6 clips it to [0, 6]: measured, top-1 agreement 70.1%
                    # with output Q/DQ, 71.7% without (minmax, every Conv/Gemm quantised).
                    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
                    # Biases stay float: ORT would otherwise write int32 biases behind a DequantizeLinear, an
                    # input type TensorRT's DequantizeLinear does not take; TensorRT folds float biases itself.
                    "QuantizeBias": False,
                })
        except HuseError:
            raise
        except Exception as e:
            raise HuseError(f"onnxruntime INT8 quantisation of {src} failed ({type(e).__name__}: {e}); "
                            "check that the calibration feeds run on the FP32 graph") from e
    return onnx.load(str(dst))


def _save_ranges(ranges, path: Path) -> None:
    try:
        from onnxruntime.quantization.calibrate import save_tensors_data
    except ImportError as e:
        import onnxruntime

        raise HuseError(f"onnxruntime {onnxruntime.__version__} cannot take precomputed calibration ranges "
                        "(no calibration cache); upgrade with `pip install -U 'onnxruntime>=1.31'`") from e
    save_tensors_data(ranges, path)


def _quantize_modelopt(src: Path, dst: Path, feeds, method: str, exclude: tuple[str, ...]):
    onnx = _import("onnx")
    if method not in _MODELOPT_METHODS:
        raise HuseError(f"Calibration method {method!r} is not offered by modelopt; its INT8 methods are "
                        f"{list(_MODELOPT_METHODS)} (or use quantizer='ort' for percentile)")
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except Exception as e:
        raise HuseError(
            f"quantizer='modelopt' needs NVIDIA TensorRT Model Optimizer, which could not be imported "
            f"({type(e).__name__}: {e}); install it beside the CPU torch and onnxruntime with "
            "`pip install torch==2.13.0 onnx onnxruntime onnx-graphsurgeon polygraphy onnxscript onnxslim "
            "onnxconverter-common ml_dtypes lief cppimport nvidia-modelopt` (a plain `pip install "
            "nvidia-modelopt` pulls CUDA torch and onnxruntime-gpu, several GB), or use quantizer='ort'") from e
    _check_node_names(_load(src), exclude, what="exclude from INT8")
    # modelopt takes all calibration samples as one array per input and splits them into steps of the shape
    # given by calibration_shapes: one step per feed we were handed.
    data = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    shapes = ",".join(f"{k}:{'x'.join(str(d) for d in v.shape)}" for k, v in feeds[0].items())
    try:
        mo_quantize(onnx_path=str(src), quantize_mode="int8", calibration_data=data,
                    calibration_method=_MODELOPT_METHODS[method], calibration_shapes=shapes,
                    calibration_eps=["cpu"], op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                    # modelopt takes regular expressions: anchor the names so 'conv' does not exclude 'conv_1'
                    nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude] or None,
                    # fp32 elsewhere: the FP16 choice is a separate, measured step (convert_fp16)
                    high_precision_dtype="fp32", output_path=str(dst))
    except Exception as e:
        raise HuseError(f"modelopt INT8 quantisation of {src} failed ({type(e).__name__}: {e}); "
                        "try quantizer='ort'") from e
    return onnx.load(str(dst))


def _quantized_node_names(model) -> list[str]:
    producers, _ = producers_consumers(model.graph)

    def from_dq(name: str) -> bool:
        p = producers.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1 and from_dq(n.input[0]) and from_dq(n.input[1])]


# ---------------------------------------------------------------------------------------
# Which nodes to keep in float


def sensitive_nodes(model, first_convs: int = 1) -> dict[str, list[str]]:
    """Name the nodes INT8 is most likely to hurt, so an export can exclude them when measurement says so.

    The first Conv sees raw pixels (3 input channels: few weights per output channel, so rounding each weight
    matters more); the shared classifier's Gemm/MatMul turns the unit-length embedding into logits, and every
    class decision passes through it.

    Args:
        model: an `onnx.ModelProto` or a path to one with a `logits` or `probs` output.
        first_convs: how many Convs to name from the start of each input's path. 1 names the stem; measured on
            EfficientNet-Lite0 at 64x64 the early layers are where INT8 hurts (quantising the stem alone flips
            2% of top-1, block 0's depthwise conv alone 5%); the export measures how many to keep in float
            (`huse.export.finish.INT8_FLOAT_CONVS`).
    Returns:
        {"first_conv": [...], "classifier": [...]}: node names. `first_conv` has the first `first_convs` Convs
        downstream of each graph input that reaches one (the image stem; the text Conv1d); `classifier` has the
        last Gemm/MatMul on every path into `logits` (or into `probs` for the fused graph, one per tower).
    """
    onnx = _import("onnx")
    if not isinstance(model, onnx.ModelProto):
        model = _load(Path(model))
    graph = model.graph
    outputs = [o.name for o in graph.output]
    targets = [t for t in ("logits", "probs") if t in outputs]
    if not targets:
        raise HuseError(f"sensitive_nodes needs a graph with a 'logits' or 'probs' output; found outputs {outputs}")
    producers, consumers = producers_consumers(graph)
    order = {id(n): k for k, n in enumerate(graph.node)}

    classifier, seen = [], set()
    stack = list(targets[:1])  # 'logits' if present: the image/text graph's own classifier
    while stack:
        t = stack.pop()
        node = producers.get(t)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("Gemm", "MatMul"):
            classifier.append(node)
            continue  # stop at the nearest matrix product on this path
        stack.extend(node.input)
    classifier_names = [n.name for n in sorted(classifier, key=lambda n: order[id(n)])]

    inits = {t.name for t in graph.initializer}
    first_conv = []
    for inp in graph.input:
        if inp.name in inits:
            continue
        reach, frontier = set(), [inp.name]
        while frontier:
            for n in consumers.get(frontier.pop(), []):
                if id(n) not in reach:
                    reach.add(id(n))
                    frontier.extend(n.output)
        convs = [n.name for n in graph.node if n.op_type == "Conv" and id(n) in reach]
        first_conv += [c for c in convs[:first_convs] if c not in first_conv]
    return {"first_conv": first_conv, "classifier": classifier_names}


# ---------------------------------------------------------------------------------------
# Accuracy gate

FP16_MIN_AGREEMENT = 99.9  # % of samples whose FP16 top-1 equals FP32's: FP16 should change almost nothing
INT8_MIN_AGREEMENT = 99.0  # %: INT8 may move a few borderline samples...
INT8_MAX_DROP = 0.5  # ...but must not cost more than half a point of top-1 accuracy
PRECISIONS = ("fp16", "int8", "int8-cpu")


def accuracy_gate(ref_probs: np.ndarray, cand_probs: np.ndarray, labels: np.ndarray, *,
                  precision: str, thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """Compare a reduced-precision candidate's predictions with the FP32 reference on labelled data.

    Bars: FP16 top-1 agreement >= 99.9 %; INT8 top-1 accuracy drop <= 0.5 points and agreement >= 99 %.
    With n eval samples one disagreement is 100/n points, so the FP16 bar allows none below 1000 samples.

    Args:
        ref_probs: (N, C) FP32 probabilities or logits (only the arg-max is used).
        cand_probs: (N, C) candidate probabilities or logits.
        labels: (N,) integer class labels, or (N, C) multi-hot label sets of a multi-label bundle (then
            `multilabel_gate` decides, with `thresholds`).
        precision: "fp16", "int8" or "int8-cpu" (the INT8 bars): which bars apply.
        thresholds: (C,) per-class thresholds of a multi-label bundle.
    Returns:
        dict with `precision`, `n`, `agreement` (%), `ref_accuracy` and `cand_accuracy` (%), `drop_points`
        (reference minus candidate, in percentage points), `passed`, `failures` (one line per failed bar) and
        `message` (one line, ready for HuseError).
    """
    if precision not in PRECISIONS:
        raise HuseError(f"Precision {precision!r} not found; available precisions = {list(PRECISIONS)}")
    if np.ndim(labels) == 2:
        return multilabel_gate(ref_probs, cand_probs, labels, thresholds, precision=precision)
    ref, cand, labels = np.asarray(ref_probs), np.asarray(cand_probs), np.asarray(labels).reshape(-1)
    if ref.ndim != 2 or ref.shape != cand.shape or len(labels) != len(ref) or len(ref) == 0:
        raise HuseError(f"accuracy_gate needs (N, C) reference and candidate and (N,) labels with N > 0; "
                        f"got {ref.shape}, {cand.shape} and {labels.shape}")
    ref_top, cand_top = ref.argmax(1), cand.argmax(1)
    agreement = 100.0 * float(np.mean(ref_top == cand_top))
    ref_acc = 100.0 * float(np.mean(ref_top == labels))
    cand_acc = 100.0 * float(np.mean(cand_top == labels))
    return _gate_verdict(precision, len(ref), agreement, ref_acc, cand_acc, agreement_name="top-1 agreement",
                         score_name="top-1 accuracy", metric="top-1")


def multilabel_gate(ref_probs: np.ndarray, cand_probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | None, *,
                    precision: str) -> dict[str, Any]:
    """`accuracy_gate` for a multi-label bundle: the predicted label SETS (every class at or above its
    threshold, runtime/labels.predict_sets) of candidate and FP32 are compared.

    Bars, the single-label ones carried over: `agreement` is the mean Jaccard index of the two predicted
    sets (%), FP16 >= 99.9 and INT8 >= 99; `drop_points` is the micro-F1 drop against the true sets, INT8
    <= 0.5 points. Returns the same keys as `accuracy_gate` (`ref_accuracy`/`cand_accuracy`: micro-F1, %).
    """
    from huse.runtime.labels import predict_sets

    ref, cand, y = np.asarray(ref_probs), np.asarray(cand_probs), np.asarray(labels) > 0
    if thresholds is None or ref.shape != cand.shape or ref.shape != y.shape or len(ref) == 0:
        raise HuseError(f"the multi-label accuracy gate needs (N, C) reference, candidate and label sets with N > 0 "
                        f"and the bundle's thresholds; got {ref.shape}, {cand.shape}, {y.shape}, thresholds "
                        f"{'missing' if thresholds is None else len(thresholds)}")
    r, c = predict_sets(ref, thresholds), predict_sets(cand, thresholds)
    union = (r | c).sum(1)
    agreement = 100.0 * float(np.mean(np.where(union > 0, (r & c).sum(1) / np.maximum(union, 1), 1.0)))

    def micro_f1(pred: np.ndarray) -> float:
        tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
        return 100.0 * 2 * tp / max(2 * tp + fp + fn, 1)

    return _gate_verdict(precision, len(ref), agreement, micro_f1(r), micro_f1(c),
                         agreement_name="label-set agreement (mean Jaccard)", score_name="micro-F1", metric="micro-F1")


def _gate_verdict(precision: str, n: int, agreement: float, ref_score: float, cand_score: float, *,
                  agreement_name: str, score_name: str, metric: str) -> dict[str, Any]:
    """The bars of every accuracy gate, one copy: agreement (FP16 >= FP16_MIN_AGREEMENT, INT8 >=
    INT8_MIN_AGREEMENT) and, for INT8, the score's drop (<= INT8_MAX_DROP points); the verdict dict
    `accuracy_gate` documents."""
    drop = ref_score - cand_score
    failures = []
    min_agree = FP16_MIN_AGREEMENT if precision == "fp16" else INT8_MIN_AGREEMENT
    if agreement < min_agree:
        failures.append(f"{agreement_name} {agreement:.2f}% < {min_agree}% by {min_agree - agreement:.2f} points")
    if precision.startswith("int8") and drop > INT8_MAX_DROP:
        failures.append(f"{score_name} drop {drop:.2f} points > {INT8_MAX_DROP} allowed by {drop - INT8_MAX_DROP:.2f} points")
    name = precision.upper()
    summary = (f"{name} vs FP32 on {n} samples: {agreement_name} {agreement:.2f}%, {score_name} "
               f"{cand_score:.2f}% vs {ref_score:.2f}% (drop {drop:.2f} points)")
    if failures:
        advice = ("keep more ops in FP32 (convert_fp16 keep_fp32_ops)" if precision == "fp16" else
                  "try another calibration method, exclude sensitive_nodes(), or ship FP16")
        message = f"{name} accuracy gate failed: {'; '.join(failures)}. {summary}. To fix: {advice}"
    else:
        message = f"{name} accuracy gate passed: {summary}"
    return {"precision": precision, "n": n, "agreement": agreement, "ref_accuracy": ref_score,
            "cand_accuracy": cand_score, "drop_points": drop, "passed": not failures, "failures": failures,
            "message": message, "metric": metric}


# The visual output is measured and recorded per precision, not gated. Its branch reads the float features
# (the centring Sub is shared with FeatureNorm, whose Mul feeds the quantised Gemm: no Q/DQ lies between the
# features and `visual` in either INT8 form, and FP16 keeps its L2 norm in FP32 like the embedding's), so only
# the backbone's own rounding reaches it. Measured on the fashion-products demo bundle (1,000 eval photos; and
# same-product I->I R@1 on 2,000 test products x 4 views, fp32 0.495): fp16 min cosine 0.9999, R@1 0.496;
# int8 0.990 / 0.497; int8-cpu 0.928 (mean 0.977) / 0.494. The nearest other photo among distinct products
# changed for 9% (int8) and 24% (int8-cpu) of photos, near-ties that do not move same-product recall.
def visual_agreement(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """How far a reduced-precision image graph moves the visual-similarity vectors (`visual` output) from FP32's.

    Args:
        ref: (N, F) FP32 visual vectors (unit rows).
        cand: (N, F) the candidate's.
    Returns:
        dict with `n`, `min_cosine` and `mean_cosine` (each row against its FP32 row) and `nn_agreement` (%: rows
        whose nearest other row, the "same product" answer, is the one FP32 finds).
    """
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    if ref.ndim != 2 or ref.shape != cand.shape or len(ref) < 2:
        raise HuseError(f"visual_agreement needs two (N, F) arrays with N >= 2; got {ref.shape} and {cand.shape}")
    cos = (ref * cand).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)

    def nearest(x: np.ndarray) -> np.ndarray:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return {"n": len(ref), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "nn_agreement": 100.0 * float(np.mean(nearest(ref) == nearest(cand)))}


# ---------------------------------------------------------------------------------------
# helpers


def _import(module: str):
    from huse.runtime._lazy import lazy_import

    return lazy_import(module, "export")


def _load(path: Path):
    onnx = _import("onnx")
    if not Path(path).is_file():
        raise HuseError(f"ONNX file {path} does not exist; export the bundle first")
    return onnx.load(str(path))


def _check_node_names(model, names: Sequence[str], *, what: str) -> None:
    known = {n.name for n in model.graph.node}
    missing = [n for n in names if n not in known]
    if missing:
        sample = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES][:5]
        raise HuseError(f"Asked to {what} nodes {missing}, which are not in the graph; node names look like "
                        f"{sample} (take them from sensitive_nodes() or `polygraphy inspect model`)")


def _check_feeds(model, calib_feeds) -> list[dict[str, np.ndarray]]:
    inits = {t.name for t in model.graph.initializer}
    wanted = sorted(i.name for i in model.graph.input if i.name not in inits)
    feeds = [dict(f) for f in calib_feeds]
    if not feeds:
        raise HuseError(f"INT8 calibration needs at least one feed dict with inputs {wanted}; got none "
                        "(pass a few hundred real samples split into batches)")
    for k, f in enumerate(feeds):
        if sorted(f) != wanted:
            raise HuseError(f"Calibration feed {k} has inputs {sorted(f)}, the graph wants {wanted}")
    if len(feeds) > 1 and any(n.op_type == "NonZero" for n in model.graph.node):
        # Tensors after a NonZero have as many rows as the data selects (MiniLM's real tokens: the batch's
        # padding removed), so their per-batch outputs differ in shape, and onnxruntime's histogram
        # calibrators stack each tensor's batches into one array. One batch of every sample calibrates
        # the same ranges; the calibrator keeps every batch's outputs in memory anyway.
        feeds = [{k: np.concatenate([f[k] for f in feeds]) for k in wanted}]
    return feeds
