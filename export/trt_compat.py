"""Static TensorRT-compatibility check of an ONNX graph: runs on CPU with only `onnx`.

The engine build only happens on the target (a Jetson, a GPU server), often minutes after
export and far from the exporting machine. This check catches on the development machine what
would make TensorRT's ONNX parser or builder refuse the graph there, and names the node.

Rules (each issue carries one of these `rule` ids):
  * "opset":          default-domain opset in [13, 24]. 13 is where QuantizeLinear got `axis`
                      (per-channel weight scales); 24 is the newest the parser documents.
  * "unsupported-op": the op is in TensorRT's ONNX operator support list (table below).
  * "dtype":          the op's data input has a type TensorRT lists for that op. This is where
                      int64 is judged. Since TensorRT 9 the parser imports INT64 natively (it no
                      longer casts it down to INT32; INT64 graph IO gets INT64 bindings), and 10.x
                      lists INT64 for the shape, index and elementwise ops (Shape, Gather,
                      Reshape, Concat, Add, ...). So int64 initializers, shape tensors and int64
                      graph inputs are fine; int64 reaching an op whose list lacks INT64 (MatMul,
                      Conv, Gemm, Softmax, CumSum, Sqrt, ...) is flagged at that node.
  * "qdq":            int8 Q/DQ, zero point 0, weight scales per output channel, activation
                      scales per tensor, scales and zero points constant.
  * "batch-axis":     every graph input has a dynamic dim 0 and static other dims, except the
                      token inputs' length (dim 1), whose profile comes from the tokenizer spec.

The table reflects onnx-tensorrt `docs/operators.md` for **TensorRT 10.15** ("supports operators
in the inclusive range of opset 9 to opset 24"). No TensorRT 11 operator list was available to
check against, so "11" uses the same table: 11.x removed weak typing and builder precision flags,
not ONNX operators, and onnx-tensorrt's changelog only ever adds importers. The parser on the
target stays the final word; this check is the early warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huse.export.onnx_graph import producers_consumers
from huse.runtime._lazy import lazy_import
from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import TOKEN_INPUTS

if TYPE_CHECKING:  # onnx is the [export] extra: imported lazily at call time
    import onnx

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear `axis` (per-channel) needs opset 13
MAX_OPSET = 24  # highest opset the TensorRT 10.15 parser documents

# -- TensorRT's ONNX operator support list -------------------------------------------------------
# Source: onnx-tensorrt docs/operators.md, TensorRT 10.15 ("Supported = Y" rows and their
# "Supported Types" column). Ops marked N, and any op not listed, are unsupported.
# Type tokens are the document's: FP32 FP16 BF16 FP8 FP4 INT4 INT8 INT32 INT64 UINT8 BOOL.
_FP = "FP32 FP16 BF16"
_FPI = _FP + " INT32 INT64"
_FPIB = _FPI + " BOOL"
_TRT10_OPS_TEXT: dict[str, str] = {
    "Abs": _FPI, "Acos": _FP, "Acosh": _FP, "Add": _FPI, "And": "BOOL",
    "ArgMax": _FPI, "ArgMin": _FPI, "Asin": _FP, "Asinh": _FP, "Atan": _FP, "Atanh": _FP,
    "Attention": _FP + " INT8 FP8", "AveragePool": _FP, "BatchNormalization": _FP,
    "BlackmanWindow": "FP32 FP16", "Cast": _FPI + " UINT8 BOOL", "CastLike": _FPI + " UINT8 BOOL",
    "Ceil": _FP, "Celu": _FP, "Clip": _FP, "Concat": _FPIB,
    "Constant": _FP + " FP8 FP4 INT4 INT32 INT64 BOOL",
    "ConstantOfShape": _FP + " FP8 FP4 INT4 INT32 INT64 BOOL",
    "Conv": _FP, "ConvTranspose": _FP, "Cos": _FP, "Cosh": _FP, "CumSum": _FP,
    "DeformConv": "FP32 FP16", "DepthToSpace": _FPI, "DequantizeLinear": "INT8 FP8 FP4 INT4",
    "Div": _FPI, "Dropout": _FP, "Einsum": _FP, "Elu": _FP, "Equal": _FPI, "Erf": _FP,
    "Exp": _FP, "Expand": _FPIB, "EyeLike": _FPIB, "Flatten": _FPIB, "Floor": _FP,
    "Gather": _FPIB, "GatherElements": _FPIB, "GatherND": _FPIB, "Gelu": _FP + " INT8 INT32 INT64",
    "Gemm": _FP, "GlobalAveragePool": _FP, "GlobalLpPool": _FP, "GlobalMaxPool": _FP,
    "Greater": _FPI, "GreaterOrEqual": _FPI, "GridSample": "FP32 FP16", "GroupNormalization": _FP,
    "GRU": _FP, "HammingWindow": "FP32 FP16", "HannWindow": "FP32 FP16", "HardSigmoid": _FP,
    "HardSwish": _FP, "Hardmax": _FP, "Identity": _FPIB, "If": _FPIB, "ImageScaler": _FP,
    "InstanceNormalization": _FP, "IsInf": _FP, "IsNaN": _FPI, "LayerNormalization": _FP,
    "LeakyRelu": _FP, "Less": _FPI, "LessOrEqual": _FPI, "Log": _FP, "LogSoftmax": _FP,
    "Loop": _FPIB, "LRN": _FP, "LSTM": _FP, "LpNormalization": _FP, "LpPool": _FP,
    "MatMul": _FP, "Max": _FPI, "MaxPool": _FP, "Mean": _FP + " FP8 INT32 INT64",
    "MeanVarianceNormalization": _FP, "Min": _FPI, "Mish": "FP32 FP16", "Mod": _FPI, "Mul": _FPI,
    "Neg": _FPI, "NonMaxSuppression": "FP32 FP16", "NonZero": "FP32 FP16", "Not": "BOOL",
    "OneHot": _FPIB, "Or": "BOOL", "Pad": _FPI, "ParametricSoftplus": _FP, "Pow": _FPI,
    "PRelu": _FP, "QuantizeLinear": _FP, "RandomNormal": _FP, "RandomNormalLike": _FP,
    "RandomUniform": _FP, "RandomUniformLike": _FP, "Range": _FPI, "Reciprocal": _FP,
    "ReduceL1": _FPI, "ReduceL2": _FPI, "ReduceLogSum": _FPI, "ReduceLogSumExp": _FPI,
    "ReduceMax": _FPI, "ReduceMean": _FPI, "ReduceMin": _FPI, "ReduceProd": _FPI,
    "ReduceSum": _FPI, "ReduceSumSquare": _FPI, "Relu": _FPI, "Reshape": _FPIB, "Resize": _FP,
    "ReverseSequence": _FPIB, "RMSNormalization": _FP, "RNN": _FP, "RoiAlign": "FP32 FP16",
    "RotaryEmbedding": _FP, "Round": _FP, "STFT": "FP32", "ScaledTanh": _FP, "Scan": _FP,
    "Scatter": _FPI, "ScatterElements": _FPI, "ScatterND": _FPI, "Selu": _FP, "Shape": _FPIB,
    "Shrink": _FPI, "Sigmoid": _FP, "Sign": _FPI, "Sin": _FP, "Sinh": _FP, "Size": _FPIB,
    "Slice": _FPIB, "Softmax": _FP, "Softplus": _FP, "Softsign": _FP, "SpaceToDepth": _FPI,
    "Split": _FPIB, "Sqrt": _FP, "Squeeze": _FPIB, "Sub": _FPI, "Sum": _FPI, "Tan": _FP,
    "Tanh": _FP, "TensorScatter": _FP + " INT32", "ThresholdedRelu": _FP, "Tile": _FPIB,
    "TopK": _FPI, "Transpose": _FPIB, "Trilu": _FPIB, "Unsqueeze": _FPIB, "Upsample": _FP,
    "Where": _FPIB, "Xor": "BOOL",
}
TRT10_SUPPORTED_OPS: dict[str, frozenset[str]] = {op: frozenset(t.split()) for op, t in _TRT10_OPS_TEXT.items()}

# Which table each targeted major version is checked against (see module docstring for "11").
SUPPORTED_OPS: dict[str, dict[str, frozenset[str]]] = {"10": TRT10_SUPPORTED_OPS, "11": TRT10_SUPPORTED_OPS}
TABLE_SOURCE = "onnx-tensorrt docs/operators.md for TensorRT 10.15"

# Which input carries the data whose type the table's "Supported Types" column means. The other
# inputs of most ops are int64 index/shape/axes tensors, which TensorRT 10+ takes natively.
_DATA_INPUT = {"Where": 1}  # Where(condition, X, Y): condition is always bool
# Ops whose inputs are control values (trip counts, conditions, loop state): their bodies are
# checked node by node instead. Q/DQ have their own, stricter rule.
_NO_DTYPE_CHECK = {"If", "Loop", "Scan", "Constant", "QuantizeLinear", "DequantizeLinear"}

# Weight consumers and the axis of their weight input that holds the output channels: the only
# axis TensorRT accepts for per-channel weight scales.
#   Conv W is (M, C/group, kH, kW)                -> 0
#   ConvTranspose W is (C, M/group, kH, kW)       -> 1
#   Gemm B is (K, N), or (N, K) with transB=1     -> 1, or 0
#   MatMul B is (..., K, N)                       -> last
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class CompatIssue:
    """One reason TensorRT would refuse the graph.

    Args:
        node: the node's name (or "<OpType -> first output>" when unnamed), a graph input's name
            for "batch-axis", or "<model>" for "opset".
        op_type: the node's op type ("graph-input" / "model" for graph-level rules).
        rule: "opset", "unsupported-op", "dtype", "qdq" or "batch-axis".
        why: what was found and what TensorRT needs.
    """

    node: str
    op_type: str
    rule: str
    why: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.why}"


def _type_token(onnx_mod, elem_type: int) -> str:
    """The operators.md type token for an ONNX element type."""
    tp = onnx_mod.TensorProto
    tokens = {
        tp.FLOAT: "FP32",
        # "limited support for DOUBLE: TensorRT will attempt to cast DOUBLE down to FLOAT" -- so
        # double is judged as fp32 (and clamps to +-FLT_MAX).
        tp.DOUBLE: "FP32",
        tp.FLOAT16: "FP16",
        tp.BFLOAT16: "BF16",
        tp.INT32: "INT32",
        tp.INT64: "INT64",
        tp.INT8: "INT8",
        tp.UINT8: "UINT8",
        tp.BOOL: "BOOL",
        tp.FLOAT8E4M3FN: "FP8",
    }
    for name, token in (("INT4", "INT4"), ("FLOAT4E2M1", "FP4")):  # newer onnx only
        if hasattr(tp, name):
            tokens[getattr(tp, name)] = token
    return tokens.get(elem_type, tp.DataType.Name(elem_type))


def _node_label(node, index: int) -> str:
    if node.name:
        return node.name
    first = node.output[0] if node.output else f"#{index}"
    return f"<{node.op_type} -> {first}>"


class _Scope:
    """Types, constants and consumers of one graph, chained to the enclosing graph's scope."""

    def __init__(self, onnx_mod, graph, parent: "_Scope | None" = None):
        self.parent = parent
        self.types: dict[str, int] = {}
        self.consts: dict[str, object] = {}  # name -> TensorProto (initializer or Constant value)
        self.producers, self.consumers = producers_consumers(graph)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.consts[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx_mod.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = attr.t
                        self.types[node.output[0]] = attr.t.data_type

    def _lookup(self, table: str, name: str):
        scope = self
        while scope is not None:
            found = getattr(scope, table).get(name)
            if found is not None:
                return found
            scope = scope.parent
        return None

    def dtype(self, name: str) -> int | None:
        return self._lookup("types", name)

    def const(self, name: str):
        return self._lookup("consts", name)

    def producer(self, name: str):
        return self._lookup("producers", name)


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper  # the [export] extra; already imported once nodes exist

            return helper.get_attribute_value(a)
    return default


def _check_qdq(onnx_mod, node, label: str, scope: _Scope) -> list[CompatIssue]:
    """Q/DQ as TensorRT's explicit quantization takes it (and as huse's int8 variants are made)."""
    np_helper = onnx_mod.numpy_helper
    issues: list[CompatIssue] = []

    def issue(why: str) -> None:
        issues.append(CompatIssue(label, node.op_type, "qdq", why))

    is_q = node.op_type == "QuantizeLinear"
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""

    # -- type: int8. UINT8 is only an IO type in TensorRT; FP8/FP4/INT4 need Ada/Hopper/Blackwell
    #    GPUs, not the Jetson Orin (sm87) huse targets. An INT32 DequantizeLinear is how
    #    onnxruntime's quantize_static stores quantized biases: TensorRT has no INT32 DQ.
    int8 = onnx_mod.TensorProto.INT8
    q_type = None  # the integer type being quantized to / dequantized from
    if zp_name:
        zp = scope.const(zp_name)
        if zp is None:
            issue(f"zero point '{zp_name}' is computed at run time; TensorRT needs a constant zero point of 0")
        else:
            q_type = zp.data_type
            values = np_helper.to_array(zp)
            if q_type == int8 and values.size and (values != 0).any():
                shown = values.reshape(-1)[:4].tolist()
                issue(f"zero point is {shown}{'...' if values.size > 4 else ''}; TensorRT requires 0 (symmetric int8)")
    elif not is_q:
        q_type = scope.dtype(node.input[0])
    elif _attr(node, "output_dtype", 0):
        q_type = _attr(node, "output_dtype")
    else:
        issue("has no zero point, so ONNX quantizes to UINT8; TensorRT needs INT8 with an explicit zero point of 0")
    if q_type is not None and q_type != int8:
        hint = ""
        if not is_q and q_type == onnx_mod.TensorProto.INT32:
            hint = (" (an int32-quantized bias, as onnxruntime's quantize_static writes by default: "
                    "pass extra_options QuantizeBias=False)")
        verb = "quantizes to" if is_q else "dequantizes"
        issue(f"{verb} {_type_token(onnx_mod, q_type)}{hint}; TensorRT Q/DQ here must be INT8")
    if _attr(node, "block_size", 0):
        issue("uses block quantization; TensorRT takes per-tensor or per-channel int8 scales only")

    # -- scale granularity: per output channel for weights, per tensor for activations.
    scale = scope.const(scale_name) if scale_name else None
    if scale is None:
        # Calibrated scales are constants; TensorRT folds them into the fused int8 kernels.
        issue(f"scale '{scale_name}' is computed at run time; TensorRT's int8 fusions need a constant scale")
        return issues
    scale_size = int(np_helper.to_array(scale).size)
    src = node.input[0]
    is_weight = scope.const(src) is not None
    if not is_weight and not is_q:  # DQ(Q(constant weight)) -- the fake-quantized-weight pattern
        producer = scope.producer(src)
        is_weight = producer is not None and producer.op_type == "QuantizeLinear" and scope.const(producer.input[0]) is not None
    if not is_weight:
        if scale_size > 1:
            issue(f"activation scale has {scale_size} values; TensorRT takes per-tensor activation scales")
        return issues
    weight = scope.const(src) if scope.const(src) is not None else scope.const(scope.producer(src).input[0])
    rank = len(weight.dims)
    if scale_size <= 1:
        # TensorRT runs it, but one scale for every output channel costs the accuracy huse's gates
        # are set for: its int8 variants (and TensorRT's own Q/DQ guide) use per-channel weights.
        if rank > 1 and weight.dims[0] > 1:
            issue("per-tensor weight scale; huse's int8 form uses per-output-channel weight scales")
        return issues
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    expected = _output_channel_axis(node, scope, rank)
    if expected is not None and axis != expected[0]:
        issue(
            f"per-channel weight scale is along axis {axis}, but {expected[1]} weights have their "
            f"output channels on axis {expected[0]}; TensorRT only takes per-output-channel weight scales"
        )
    return issues


def _output_channel_axis(node, scope: _Scope, rank: int) -> tuple[int, str] | None:
    """(axis, consumer op) of the weight's output channels, or None when no weight consumer is found."""
    tensor = node.output[0]
    reads = [(c, tensor) for c in scope.consumers.get(tensor, [])]  # (consumer, the tensor it reads)
    if node.op_type == "QuantizeLinear":  # Q(weight) -> DQ -> consumer
        reads = [(c, dq.output[0]) for dq, _ in reads if dq.op_type == "DequantizeLinear"
                 for c in scope.consumers.get(dq.output[0], [])]
    for consumer, read in reads:
        index = _WEIGHT_INPUT.get(consumer.op_type)
        if index is None or len(consumer.input) <= index or consumer.input[index] != read:
            continue
        if consumer.op_type == "Conv":
            return 0, "Conv"
        if consumer.op_type == "ConvTranspose":
            return 1, "ConvTranspose"
        if consumer.op_type == "Gemm":
            return (0, "Gemm (transB=1)") if _attr(consumer, "transB", 0) else (1, "Gemm")
        return rank - 1, "MatMul"
    return None  # e.g. DQ -> Transpose -> MatMul: left to the parser


def _check_batch_axis(graph, scope: _Scope) -> list[CompatIssue]:
    issues = []
    initializer_names = {i.name for i in graph.initializer}  # IR < 4 lists initializers as inputs
    for inp in graph.input:
        if inp.name in initializer_names or not inp.type.HasField("tensor_type"):
            continue

        def issue(why: str, name: str = inp.name) -> None:
            issues.append(CompatIssue(name, "graph-input", "batch-axis", why))

        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            issue("has no shape; TensorRT's optimization profile needs static non-batch dims")
            continue
        dims = list(tt.shape.dim)
        if not dims:
            issue("is a scalar; every input needs a batch axis (dim 0)")
            continue
        first = dims[0]
        if first.HasField("dim_value") and first.dim_value > 0:
            issue(
                f"batch axis is fixed to {first.dim_value}; export with a dynamic dim 0 (a symbolic "
                "name) so one engine serves every batch size in its profile"
            )
        for i, d in enumerate(dims[1:], start=1):
            if i == 1 and inp.name in TOKEN_INPUTS:  # MiniLM's title length: the profile takes the tokenizer's range
                continue
            if not (d.HasField("dim_value") and d.dim_value > 0):
                shown = d.dim_param or "?"
                issue(f"dim {i} is dynamic ('{shown}'); only the batch axis may be dynamic, the profile pins the others")
    return issues


def _walk(onnx_mod, graph, scope: _Scope, tables: dict[str, dict], issues: list[CompatIssue]) -> None:
    versions = "/".join(tables)
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        if node.domain not in ("", "ai.onnx"):
            issues.append(CompatIssue(label, node.op_type, "unsupported-op",
                                      f"is in domain '{node.domain}', which TensorRT's ONNX parser does not import "
                                      "(it would need a plugin); export with standard ONNX ops only"))
        else:
            missing = [v for v, table in tables.items() if node.op_type not in table]
            if missing:
                issues.append(CompatIssue(label, node.op_type, "unsupported-op",
                                          f"is not supported by the TensorRT {'/'.join(missing)} ONNX parser "
                                          f"({TABLE_SOURCE}); rewrite it with supported ops"))
            elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                issues.extend(_check_qdq(onnx_mod, node, label, scope))
            elif node.op_type not in _NO_DTYPE_CHECK:
                issues.extend(_check_dtype(onnx_mod, node, label, scope, tables, versions))
        # Control flow: check the bodies too, with this graph's names visible inside them.
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx_mod.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                _walk(onnx_mod, sub, _Scope(onnx_mod, sub, scope), tables, issues)


def _check_dtype(onnx_mod, node, label, scope, tables, versions) -> list[CompatIssue]:
    issues = []
    index = _DATA_INPUT.get(node.op_type, 0)
    checked: list[tuple[str, int]] = []
    if len(node.input) > index and node.input[index]:
        t = scope.dtype(node.input[index])
        if t is not None:  # unknown after shape inference: nothing to judge
            checked.append((f"input '{node.input[index]}'", t))
    if node.op_type in ("Cast", "ConstantOfShape"):
        to = _attr(node, "to") if node.op_type == "Cast" else getattr(_attr(node, "value"), "data_type", None)
        if to is not None:
            checked.append(("output", to))
    for what, t in checked:
        token = _type_token(onnx_mod, t)
        refusing = [v for v, table in tables.items() if token not in table[node.op_type]]
        if refusing:
            allowed = " ".join(sorted(tables[refusing[0]][node.op_type]))
            issues.append(CompatIssue(label, node.op_type, "dtype",
                                      f"{what} is {token}; TensorRT {versions} runs {node.op_type} on {allowed} only"))
    return issues


def _load(model: "str | Path | onnx.ModelProto"):
    onnx_mod = lazy_import("onnx", "export")
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise HuseError(f"cannot check {path} for TensorRT: no such file; pass the bundle's .onnx file")
        return onnx_mod, onnx_mod.load(str(path)), str(path)
    return onnx_mod, model, model.graph.name or "<ModelProto>"


def check_trt_compat(model: "str | Path | onnx.ModelProto", trt_versions: tuple[str, ...] = ("10", "11")) -> list[CompatIssue]:
    """List everything that would stop TensorRT from building an engine from `model`.

    Args:
        model: an ONNX file path or a loaded `onnx.ModelProto` (not modified).
        trt_versions: TensorRT major versions the engine must build on; an op must be supported
            by all of them.
    Returns:
        The issues found, in graph order (empty when the graph is compatible).
    Raises:
        HuseError: unknown TensorRT version, or a path that does not exist.
    """
    onnx_mod, proto, _ = _load(model)
    versions = tuple(str(v).split(".")[0] for v in trt_versions)
    unknown = [v for v in versions if v not in SUPPORTED_OPS]
    if unknown or not versions:
        raise HuseError(
            f"TensorRT version(s) {list(trt_versions)} asked for; this check knows {sorted(SUPPORTED_OPS)}; "
            "pass trt_versions from those"
        )
    tables = {v: SUPPORTED_OPS[v] for v in versions}
    issues: list[CompatIssue] = []

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        issues.append(CompatIssue("<model>", "model", "opset",
                                  f"default-domain opset is {opset}; huse needs {MIN_OPSET}..{MAX_OPSET} "
                                  f"(per-channel Q/DQ needs >= {MIN_OPSET}; the TensorRT 10.15 parser documents <= {MAX_OPSET}); "
                                  "re-export with a supported opset_version"))

    # Model-local functions: TensorRT imports them by expanding the body, so check the expansion.
    if proto.functions:
        proto = onnx_mod.inliner.inline_local_functions(proto)
    # Shape inference fills value_info, which is where intermediate tensor types come from.
    try:
        proto = onnx_mod.shape_inference.infer_shapes(proto)
    except Exception:  # an invalid or exotic graph: judge what the file itself declares
        pass

    scope = _Scope(onnx_mod, proto.graph)
    issues.extend(_check_batch_axis(proto.graph, scope))
    _walk(onnx_mod, proto.graph, scope, tables, issues)
    return issues


def qdq_issues(model: "str | Path | onnx.ModelProto") -> list[CompatIssue]:
    """Only the opset and Q/DQ rules of `check_trt_compat`: what a quantiser's output must meet.

    `huse.export.precision.quantize_int8` checks its own output with this, so the quantiser and
    the compatibility check hold one copy of what TensorRT takes in a Q/DQ graph.
    """
    return [i for i in check_trt_compat(model) if i.rule in ("opset", "qdq")]


def assert_trt_compat(model: "str | Path | onnx.ModelProto", trt_versions: tuple[str, ...] = ("10", "11")) -> None:
    """Raise a HuseError naming every offending node when `model` is not TensorRT-compatible.

    Args:
        model: an ONNX file path or a loaded `onnx.ModelProto`.
        trt_versions: TensorRT major versions to check against.
    Raises:
        HuseError: the message lists each issue as "node (op_type): why".
    """
    issues = check_trt_compat(model, trt_versions)
    if not issues:
        return
    what = str(model) if isinstance(model, (str, Path)) else (model.graph.name or "the ONNX model")
    shown = "; ".join(str(i) for i in issues[:20])
    more = f"; ... and {len(issues) - 20} more" if len(issues) > 20 else ""
    raise HuseError(
        f"{what} cannot be built with TensorRT {'/'.join(trt_versions)}: {len(issues)} problem(s): {shown}{more}. "
        "Fix the export (huse.export.trt_compat.check_trt_compat lists them), then rebuild"
    )
