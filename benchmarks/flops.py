"""Count the arithmetic an ONNX model does per item, for the efficiency figure.

What is counted (per item = per image/text/pair in the batch):
- multiply-accumulates (MACs) of Conv (any groups, so depthwise too), ConvTranspose, Gemm,
  MatMul and their quantised forms (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger);
  Q/DQ-quantised graphs keep float Conv/MatMul nodes, so they count the same as fp32 ones.
  `flops_per_item` is 2 x MACs (a multiply and an add), the convention of
  `machine.matmul_peak_flops`, so the two divide into a fraction of peak.
- separately, and only as an order of magnitude, one op per output element of elementwise,
  activation, normalisation, pooling and softmax nodes (`elementwise_per_item`). It is not in
  `flops_per_item`: these ops are memory-bound and a FLOP count says little about their time.

Not counted: bias additions inside Conv/Gemm, nodes inside control-flow subgraphs (If/Loop/Scan),
and ops with MACs that this module does not model (Einsum, fused attention); those are listed
under "uncounted" so a count that misses work says so.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from huse.runtime._lazy import lazy_import
from huse.runtime.errors import HuseError

# op type -> (index of the input whose shape gives K or the weight, kind of count)
_MAC_OPS = {
    "Conv": (1, "conv"),
    "ConvInteger": (1, "conv"),
    "QLinearConv": (3, "conv"),
    "ConvTranspose": (1, "convtranspose"),
    "Gemm": (0, "gemm"),
    "MatMul": (0, "matmul"),
    "MatMulInteger": (0, "matmul"),
    "QLinearMatMul": (0, "matmul"),
}

_ELEMENTWISE_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal",
    "Max", "Min", "Sum", "Mean", "Where",
    "Relu", "Clip", "Sigmoid", "Tanh", "Erf", "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu",
    "Elu", "Selu", "PRelu", "Softplus", "Mish",
    "BatchNormalization", "LayerNormalization", "InstanceNormalization",
    "SimplifiedLayerNormalization", "Softmax", "LogSoftmax",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
    "ReduceMax", "ReduceL2",
}

# Ops with substantial MACs that are not modelled: reported rather than silently zero.
_UNMODELLED_OPS = {"Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM",
                   "GRU", "RNN", "FusedMatMul", "FusedConv", "If", "Loop", "Scan"}


def count_flops(model, batch: int = 1, *, dim_values: dict[str, int] | None = None) -> dict:
    """Count MACs/FLOPs per item of an ONNX model from its graph and inferred shapes.

    Args:
        model: a path to an .onnx file or an `onnx.ModelProto` (not modified). External weight
            data is not read: shapes are all this needs.
        batch: value for the first axis of every graph input whose first axis is symbolic.
        dim_values: values for other symbolic input axes by name, e.g. {"seq": 32} for a text
            tower whose input is [batch, seq]; the count of a transformer depends on it.

    Returns:
        {"batch": the batch counted with, "macs": total for the batch, "macs_per_item",
         "flops_per_item" (2 x MACs), "elementwise_per_item", "by_op_type": {op: MACs per item},
         "counted_nodes", "uncounted": {op: node count}, "unresolved": [names of MAC nodes whose
         shapes could not be inferred]}.

    Raises:
        HuseError: an input axis is symbolic and no value was given for it.
    """
    onnx = lazy_import("onnx", "export")
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    else:
        model = copy.deepcopy(model)
    dim_values = dict(dim_values or {})
    batch = _set_input_dims(model, batch, dim_values)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes = _shape_table(model)

    macs_by_op: dict[str, int] = {}
    elementwise = 0
    counted = 0
    uncounted: dict[str, int] = {}
    unresolved: list[str] = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type in _MAC_OPS:
            macs = _node_macs(node, shapes)
            if macs is None:
                unresolved.append(name)
                continue
            macs_by_op[node.op_type] = macs_by_op.get(node.op_type, 0) + macs
            counted += 1
        elif node.op_type in _ELEMENTWISE_OPS:
            out = shapes.get(node.output[0]) if node.output else None
            if out is not None:
                elementwise += math.prod(out)
        elif node.op_type in _UNMODELLED_OPS:
            uncounted[node.op_type] = uncounted.get(node.op_type, 0) + 1

    total = sum(macs_by_op.values())
    return {
        "batch": batch,
        "macs": total,
        "macs_per_item": total / batch,
        "flops_per_item": 2 * total / batch,
        "elementwise_per_item": elementwise / batch,
        "by_op_type": {op: m / batch for op, m in sorted(macs_by_op.items())},
        "counted_nodes": counted,
        "uncounted": uncounted,
        "unresolved": unresolved,
    }


def _set_input_dims(model, batch: int, dim_values: dict[str, int]) -> int:
    """Pin every symbolic input axis; returns the batch the graph will actually run with."""
    initializers = {t.name for t in model.graph.initializer}
    effective_batch = None
    missing: set[str] = set()
    for inp in model.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                if axis == 0 and effective_batch is None:
                    # A graph exported with a fixed batch runs with that batch, whatever was asked.
                    effective_batch = d.dim_value
                continue
            if d.dim_param in dim_values:
                d.dim_value = int(dim_values[d.dim_param])
            elif axis == 0:
                d.dim_value = int(batch)
            else:
                missing.add(f"{inp.name}[{axis}] '{d.dim_param or '?'}'")
                continue
            if axis == 0 and effective_batch is None:
                effective_batch = d.dim_value
    if missing:
        raise HuseError(
            f"count_flops needs every input axis fixed; symbolic axes without a value: "
            f"{sorted(missing)}; pass dim_values={{name: size}} (e.g. the text sequence length)"
        )
    return int(effective_batch or batch)


def _shape_table(model) -> dict[str, tuple[int, ...]]:
    """Tensor name -> static shape, for every tensor whose shape is fully known."""
    table: dict[str, tuple[int, ...]] = {}
    for t in model.graph.initializer:
        table[t.name] = tuple(int(d) for d in t.dims)
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            table.setdefault(vi.name, tuple(int(d.dim_value) for d in dims))
    return table


def _node_macs(node, shapes: dict[str, tuple[int, ...]]) -> int | None:
    idx, kind = _MAC_OPS[node.op_type]
    if len(node.input) <= idx or not node.output:
        return None
    operand = shapes.get(node.input[idx])
    out = shapes.get(node.output[0])
    if operand is None or out is None:
        return None
    if kind == "conv":
        # W is [Cout, Cin/groups, *kernel]: each output element takes Cin/groups * kernel MACs,
        # which covers ordinary, grouped and depthwise convolutions alike.
        return math.prod(out) * math.prod(operand[1:])
    if kind == "convtranspose":
        # W is [Cin, Cout/groups, *kernel]: each input element is scattered to that many outputs.
        x = shapes.get(node.input[0])
        return None if x is None else math.prod(x) * math.prod(operand[1:])
    if kind == "gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = operand[0] if trans_a else operand[1]
        return math.prod(out) * k
    # MatMul with numpy broadcasting: every output element is a length-K dot product,
    # K being A's last axis (also when A or B is 1-D).
    return math.prod(out) * operand[-1]
