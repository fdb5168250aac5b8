"""The static TensorRT check: each rule on a tiny graph built here with onnx.helper."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from huse.export.trt_compat import assert_trt_compat, check_trt_compat  # noqa: E402
from huse.runtime.errors import HuseError  # noqa: E402

RNG = np.random.default_rng(0)


def const(name: str, array) -> onnx.TensorProto:
    return nh.from_array(np.asarray(array), name)


def model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset), *extra_opsets])


def image_tower(batch="N", opset=17) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: the shape of the HUSE image tower."""
    nodes = [
        h.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        h.make_node("Flatten", ["g"], ["embedding"], name="flatten"),
        h.make_node("Gemm", ["embedding", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        const("conv_w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        const("conv_b", RNG.standard_normal(4).astype(np.float32)),
        const("fc_w", RNG.standard_normal((5, 4)).astype(np.float32)),
        const("fc_b", RNG.standard_normal(5).astype(np.float32)),
    ]
    m = model(
        nodes,
        [h.make_tensor_value_info("image", T.FLOAT, [batch, 3, 8, 8])],
        [h.make_tensor_value_info("embedding", T.FLOAT, [batch, 4]), h.make_tensor_value_info("logits", T.FLOAT, [batch, 5])],
        inits,
        opset=opset,
    )
    onnx.checker.check_model(m)
    return m


def qdq_conv(weight_axis=0, act_zero_point=0, act_scale=(0.02,), weight_zp_dtype=np.int8) -> onnx.ModelProto:
    """image -> Q/DQ (activation) -> Conv with a DQ'd int8 weight: the int8 variant's pattern."""
    w = RNG.integers(-127, 127, size=(4, 3, 3, 3)).astype(np.int8)
    w_scale = np.full(w.shape[weight_axis], 0.01, np.float32)
    nodes = [
        h.make_node("QuantizeLinear", ["image", "a_scale", "a_zp"], ["image_q"], name="image_q"),
        h.make_node("DequantizeLinear", ["image_q", "a_scale", "a_zp"], ["image_dq"], name="image_dq"),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq", axis=weight_axis),
        h.make_node("Conv", ["image_dq", "w"], ["out"], name="conv"),
    ]
    scale = np.asarray(act_scale, np.float32)
    inits = [
        const("a_scale", scale[0] if scale.size == 1 else scale),
        const("a_zp", np.int8(act_zero_point) if scale.size == 1 else np.zeros(scale.size, np.int8)),
        const("w_q", w),
        const("w_scale", w_scale),
        const("w_zp", np.zeros(w_scale.size, weight_zp_dtype)),
    ]
    return model(
        nodes,
        [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("out", T.FLOAT, ["N", 4, 6, 6])],
        inits,
    )


def rules(issues) -> set[tuple[str, str]]:
    return {(i.rule, i.node) for i in issues}


def test_clean_graph_passes(tmp_path):
    m = image_tower()
    assert check_trt_compat(m) == []
    assert_trt_compat(m)  # no raise
    path = tmp_path / "image.onnx"
    onnx.save(m, path)
    assert check_trt_compat(path) == []  # and from a file


def test_unsupported_op_fails_naming_the_node():
    m = model(
        [h.make_node("Det", ["x"], ["y"], name="det_node")],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N"])],
    )
    assert rules(check_trt_compat(m)) == {("unsupported-op", "det_node")}
    with pytest.raises(HuseError, match=r"det_node \(Det\)"):
        assert_trt_compat(m)


def test_unnamed_node_is_named_by_its_output():
    m = model(
        [h.make_node("Unique", ["x"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, ["N"])],
        [h.make_tensor_value_info("y", T.FLOAT, [None])],
    )
    [issue] = check_trt_compat(m)
    assert issue.node == "<Unique -> y>" and issue.rule == "unsupported-op"


def test_custom_domain_op_fails():
    # onnxruntime's graph optimiser fuses Conv+Relu into com.microsoft FusedConv: TRT cannot parse it.
    m = model(
        [h.make_node("FusedConv", ["x", "w"], ["y"], name="fused", domain="com.microsoft", activation="Relu")],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 6, 6])],
        [const("w", np.zeros((4, 3, 3, 3), np.float32))],
        extra_opsets=[h.make_opsetid("com.microsoft", 1)],
    )
    [issue] = check_trt_compat(m)
    assert (issue.rule, issue.node) == ("unsupported-op", "fused") and "com.microsoft" in issue.why


def test_unsupported_op_inside_an_if_branch_is_found():
    then_branch = h.make_graph(
        [h.make_node("Det", ["x"], ["d"], name="det_in_branch")], "then", [], [h.make_tensor_value_info("d", T.FLOAT, ["N"])]
    )
    else_branch = h.make_graph(
        [h.make_node("ReduceSum", ["x"], ["s"], name="sum_in_branch", keepdims=0, axes=[1, 2])],
        "else",
        [],
        [h.make_tensor_value_info("s", T.FLOAT, ["N"])],
    )
    m = model(
        [h.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N"])],
        opset=13,
    )
    found = rules(check_trt_compat(m))
    assert ("unsupported-op", "det_in_branch") in found
    assert not any(node == "sum_in_branch" for _, node in found)


def test_symmetric_int8_qdq_with_per_output_channel_weights_passes():
    assert check_trt_compat(qdq_conv()) == []


def test_qdq_with_non_zero_zero_point_fails():
    issues = check_trt_compat(qdq_conv(act_zero_point=3))
    assert rules(issues) == {("qdq", "image_q"), ("qdq", "image_dq")}
    assert all("zero point is [3]" in i.why for i in issues)


def test_quantize_without_zero_point_is_uint8_and_fails():
    m = model(
        [
            h.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q_uint8"),
            h.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq_uint8"),
        ],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        [const("s", np.float32(0.1))],
    )
    found = {i.node: i.why for i in check_trt_compat(m)}
    assert "UINT8" in found["q_uint8"] and "UINT8" in found["dq_uint8"]


def test_weight_scales_on_the_wrong_axis_fail():
    # Conv weights are (out, in, kh, kw): per-channel scales must run along axis 0.
    [issue] = check_trt_compat(qdq_conv(weight_axis=1))
    assert (issue.rule, issue.node) == ("qdq", "w_dq") and "axis 1" in issue.why and "axis 0" in issue.why


def test_per_channel_activation_scale_fails():
    issues = check_trt_compat(qdq_conv(act_scale=(0.1, 0.2, 0.3)))
    assert rules(issues) == {("qdq", "image_q"), ("qdq", "image_dq")}
    assert all("per-tensor" in i.why for i in issues)


def test_gemm_trans_b_weights_take_axis_0():
    def gemm(axis):
        w = RNG.integers(-127, 127, size=(5, 4)).astype(np.int8)  # (N, K) with transB=1
        return model(
            [
                h.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_dq", axis=axis),
                h.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1),
            ],
            [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
            [h.make_tensor_value_info("y", T.FLOAT, ["N", 5])],
            [
                const("w_q", w),
                const("w_s", np.full(w.shape[axis], 0.01, np.float32)),
                const("w_zp", np.zeros(w.shape[axis], np.int8)),
            ],
        )

    assert check_trt_compat(gemm(0)) == []
    assert rules(check_trt_compat(gemm(1))) == {("qdq", "w_dq")}


def test_int32_bias_dequantize_fails_with_the_fix():
    m = model(
        [
            h.make_node("DequantizeLinear", ["b_q", "b_s", "b_zp"], ["b"], name="bias_dq"),
            h.make_node("Add", ["x", "b"], ["y"], name="add"),
        ],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        [const("b_q", np.arange(4, dtype=np.int32)), const("b_s", np.float32(0.001)), const("b_zp", np.int32(0))],
    )
    [issue] = check_trt_compat(m)
    assert issue.node == "bias_dq" and "INT32" in issue.why and "QuantizeBias=False" in issue.why


def test_static_batch_axis_fails_naming_the_input():
    [issue] = check_trt_compat(image_tower(batch=1))
    assert (issue.rule, issue.node) == ("batch-axis", "image") and "fixed to 1" in issue.why
    with pytest.raises(HuseError, match="image"):
        assert_trt_compat(image_tower(batch=1))


def test_dynamic_non_batch_dim_fails():
    m = model(
        [h.make_node("Relu", ["x"], ["y"], name="relu")],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", "C"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", "C"])],
    )
    [issue] = check_trt_compat(m)
    assert (issue.rule, issue.node) == ("batch-axis", "x") and "dim 1" in issue.why


def test_old_opset_fails():
    assert rules(check_trt_compat(image_tower(opset=11))) == {("opset", "<model>")}


def test_int64_matmul_fails_but_int64_indices_pass():
    # int64 reaching MatMul: TensorRT lists MatMul for FP32/FP16/BF16 only.
    matmul = model(
        [h.make_node("MatMul", ["ids", "w"], ["y"], name="int_matmul")],
        [h.make_tensor_value_info("ids", T.INT64, ["N", 6])],
        [h.make_tensor_value_info("y", T.INT64, ["N", 4])],
        [const("w", np.ones((6, 4), np.int64))],
    )
    [issue] = check_trt_compat(matmul)
    assert (issue.rule, issue.node) == ("dtype", "int_matmul") and "INT64" in issue.why
    # int64 token ids into an embedding Gather: native INT64 in TensorRT 10+, so nothing to flag.
    gather = model(
        [
            h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            h.make_node("ReduceMean", ["e"], ["y"], name="pool", axes=[1], keepdims=0),
        ],
        [h.make_tensor_value_info("ids", T.INT64, ["N", 6])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        [const("table", RNG.standard_normal((50, 4)).astype(np.float32))],
    )
    assert check_trt_compat(gather) == []


def test_unknown_trt_version_is_refused():
    with pytest.raises(HuseError, match=r"knows \['10', '11'\]"):
        check_trt_compat(image_tower(), trt_versions=("8",))


def test_fp16_variant_passes():
    float16 = pytest.importorskip("onnxconverter_common.float16")
    m = float16.convert_float_to_float16(image_tower(), keep_io_types=True)
    assert check_trt_compat(m) == []


def test_onnxruntime_qdq_needs_quantize_bias_false(tmp_path):
    """The int8 recipe from TOOLCHAIN.md, run for real: int32 biases unless QuantizeBias=False."""
    quant = pytest.importorskip("onnxruntime.quantization")
    src = tmp_path / "fp32.onnx"
    onnx.save(image_tower(), src)

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": RNG.random((2, 3, 8, 8), dtype=np.float32)} for _ in range(3)])

        def get_next(self):
            return next(self.batches, None)

    def quantize(extra):
        out = tmp_path / f"int8_{len(extra)}.onnx"
        quant.quantize_static(
            str(src), str(out), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
            activation_type=quant.QuantType.QInt8, weight_type=quant.QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **extra},
        )
        return out

    default = check_trt_compat(quantize({}))
    assert default and all(i.rule == "qdq" and "INT32" in i.why for i in default)
    assert check_trt_compat(quantize({"QuantizeBias": False})) == []


def test_unused_opset_domains_are_stripped_and_used_ones_kept():
    from huse.export.onnx_graph import strip_unused_opsets

    m = image_tower()
    m.graph.node.append(h.make_node("Gelu", ["logits"], ["gelu_out"], name="ms_gelu", domain="com.microsoft"))
    for domain in ("com.microsoft.nchwc", "org.pytorch.aten", "ai.onnx.training", "com.microsoft"):
        m.opset_import.append(h.make_opsetid(domain, 1))
    assert strip_unused_opsets(m) == ["ai.onnx.training", "com.microsoft.nchwc", "org.pytorch.aten"]
    assert sorted(o.domain for o in m.opset_import) == ["", "com.microsoft"]  # used by ms_gelu; default stays
    assert strip_unused_opsets(m) == []


def test_producers_consumers_reads_each_node_once():
    from huse.export.onnx_graph import producers_consumers

    graph = h.make_graph([h.make_node("Mul", ["x", "x"], ["sq"], name="sq"), h.make_node("Relu", ["sq"], ["y"], name="r")],
                         "g", [h.make_tensor_value_info("x", T.FLOAT, [1])], [h.make_tensor_value_info("y", T.FLOAT, [1])])
    producers, consumers = producers_consumers(graph)
    assert producers["sq"].name == "sq" and producers["y"].name == "r" and "x" not in producers
    assert [n.name for n in consumers["x"]] == ["sq"] and [n.name for n in consumers["sq"]] == ["r"]


def test_exported_bundle_graphs_import_only_the_domains_they_use(tiny_bundle):
    """onnxruntime's optimiser declares com.microsoft.nchwc & co.; the exported files must not."""
    for path in sorted(tiny_bundle.rglob("*.onnx")):
        m = onnx.load(str(path), load_external_data=False)
        used = {n.domain or "" for n in m.graph.node} | {""}
        declared = {o.domain if o.domain != "ai.onnx" else "" for o in m.opset_import}
        assert declared <= used, (path.name, sorted(declared - used))
