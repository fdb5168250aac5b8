"""count_flops against MAC counts worked out by hand on one-node graphs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="count_flops reads ONNX graphs: pip install 'huse-edge[export]'")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from huse.benchmarks.flops import count_flops  # noqa: E402
from huse.runtime.errors import HuseError  # noqa: E402


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def _conv_model(cin, cout, group, k=3, stride=1, hw=8):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cin, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], group=group, kernel_shape=[k, k],
        pads=[k // 2] * 4, strides=[stride, stride],
    )
    return _model([node], [x], [y], [_weight("w", (cout, cin // group, k, k))])


def test_conv_counts_output_elements_times_kernel_volume():
    # 3->4 channels, 3x3, pad 1 on 8x8: 4*8*8 outputs, each 3*3*3 MACs.
    r = count_flops(_conv_model(cin=3, cout=4, group=1))
    assert r["macs_per_item"] == 4 * 8 * 8 * 3 * 3 * 3 == 6912
    assert r["flops_per_item"] == 2 * 6912
    assert r["by_op_type"] == {"Conv": 6912}


def test_strided_conv_uses_the_inferred_output_size():
    # stride 2 on 8x8 with pad 1 gives 4x4 outputs.
    r = count_flops(_conv_model(cin=3, cout=4, group=1, stride=2))
    assert r["macs_per_item"] == 4 * 4 * 4 * 3 * 3 * 3


def test_depthwise_conv_counts_one_input_channel_per_output():
    # groups == channels == 4: each output takes 1*3*3 MACs, 36x fewer than the dense count.
    r = count_flops(_conv_model(cin=4, cout=4, group=4))
    assert r["macs_per_item"] == 4 * 8 * 8 * 1 * 3 * 3 == 2304


def test_grouped_conv():
    # 8->8 channels in 2 groups: each output sees 4 input channels.
    r = count_flops(_conv_model(cin=8, cout=8, group=2, k=1))
    assert r["macs_per_item"] == 8 * 8 * 8 * 4


def test_gemm_with_transposed_weight():
    # [N,16] x [10,16]^T: 10 outputs per item, 16 MACs each.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    m = _model([node], [x], [y], [_weight("w", (10, 16)), _weight("b", (10,))])
    assert count_flops(m)["macs_per_item"] == 160


def test_matmul_broadcasts_over_leading_axes():
    # [N,5,16] x [16,8]: 5*8 outputs per item, 16 MACs each.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    m = _model([node], [x], [y], [_weight("w", (16, 8))])
    assert count_flops(m)["macs_per_item"] == 640


def test_batch_scales_the_total_but_not_the_per_item_count():
    m = _conv_model(cin=3, cout=4, group=1)
    r = count_flops(m, batch=4)
    assert r["batch"] == 4
    assert r["macs"] == 4 * 6912
    assert r["macs_per_item"] == 6912
    # The caller's model keeps its symbolic batch axis.
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_chain_adds_up_and_elementwise_is_reported_separately():
    # Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, like a tiny image tower.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    m = _model(nodes, [x], [y], [_weight("w", (4, 3, 3, 3)), _weight("fc", (10, 4))])
    r = count_flops(m, batch=2)
    assert r["by_op_type"] == {"Conv": 6912, "Gemm": 40}
    assert r["macs_per_item"] == 6952
    assert r["counted_nodes"] == 2
    assert r["elementwise_per_item"] == 4 * 8 * 8 + 4  # Relu outputs + pooled outputs
    assert r["unresolved"] == [] and r["uncounted"] == {}


def test_qdq_conv_counts_like_float():
    # Q/DQ graphs keep a float Conv fed by DequantizeLinear of int8 weights.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [_weight("wq", (4, 3, 3, 3), np.int8), _weight("ws", (4,))]
    assert count_flops(_model(nodes, [x], [y], inits))["macs_per_item"] == 6912


def test_symbolic_sequence_axis_needs_a_value(tmp_path):
    # A text tower: [batch, seq, 16] x [16, 8]; the count depends on seq.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], [_weight("w", (16, 8))])
    with pytest.raises(HuseError, match="seq"):
        count_flops(m)
    path = tmp_path / "text.onnx"
    onnx.save(m, str(path))
    assert count_flops(path, dim_values={"seq": 32})["macs_per_item"] == 32 * 8 * 16


def test_unmodelled_ops_are_reported_not_silently_zero():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Einsum", ["x", "w"], ["y"], equation="bi,ij->bj")
    r = count_flops(_model([node], [x], [y], [_weight("w", (4, 4))]))
    assert r["macs_per_item"] == 0
    assert r["uncounted"] == {"Einsum": 1}
