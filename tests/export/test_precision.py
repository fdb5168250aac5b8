"""FP16 / INT8 conversion and the accuracy gate, on tiny graphs built here (seconds, no downloads)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("onnxconverter_common")

import torch.nn.functional as F
from huse.export import precision as P
from huse.export.trt_compat import qdq_issues
from huse.runtime.errors import HuseError
from onnx import numpy_helper
from torch import nn

SIZE, CLASSES, VOCAB, SEQ = 16, 10, 100, 12


class TinyImage(nn.Module):
    """The image graph's shape in miniature: conv stem + ReLU6 + pooling + tower + L2 norm + shared Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.tower = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128))
        self.classifier = nn.Linear(128, CLASSES)

    def embed(self, x):
        h = F.relu6(self.conv2(F.relu6(self.conv1(x)))).mean(dim=(2, 3))
        return F.normalize(self.tower(h), dim=-1)

    def forward(self, x):
        e = self.embed(x)
        return e, self.classifier(e)


class TinyText(nn.Module):
    """The text graph in miniature: Embedding -> Conv1d -> ReLU -> global max -> Linear -> L2 -> shared Linear."""

    def __init__(self, classifier: nn.Linear | None = None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.proj = nn.Linear(32, 128)
        self.classifier = classifier or nn.Linear(128, CLASSES)

    def embed(self, ids):
        h = F.relu(self.conv(self.emb(ids).transpose(1, 2))).amax(dim=2)
        return F.normalize(self.proj(h), dim=-1)

    def forward(self, ids):
        e = self.embed(ids)
        return e, self.classifier(e)


class TinyFused(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = TinyImage()
        self.text = TinyText(classifier=self.image.classifier)  # one shared classifier, as in HUSE

    def forward(self, x, ids):
        ei, et = self.image.embed(x), self.text.embed(ids)
        probs = 0.5 * F.softmax(self.image.classifier(ei), -1) + 0.5 * F.softmax(self.image.classifier(et), -1)
        return probs, ei, et


def _export(model, args, path, inputs, outputs):
    axes = {n: {0: "batch"} for n in inputs + outputs}
    torch.onnx.export(model.eval(), args, str(path), dynamo=False, opset_version=17,
                      input_names=inputs, output_names=outputs, dynamic_axes=axes)
    return path


def _images(n, seed):
    # Smooth images in [-1, 1] (upsampled noise), closer to photos than per-pixel noise.
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(-1, 1, (n, 3, 4, 4)).astype(np.float32))
    return F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()


def _ids(n, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("graphs")
    x, ids = torch.from_numpy(_images(2, 0)), torch.from_numpy(_ids(2, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation warnings
        image = _export(TinyImage(), (x,), d / "image.onnx", ["image"], ["embedding", "logits"])
        text = _export(TinyText(), (ids,), d / "text.onnx", ["input_ids"], ["embedding", "logits"])
        fused = _export(TinyFused(), (x, ids), d / "fused.onnx", ["image", "input_ids"],
                        ["probs", "image_embedding", "text_embedding"])
    return {"image": image, "text": text, "fused": fused, "dir": d}


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _image_feeds(n_batches=8, batch=16, seed=1):
    return [{"image": _images(batch, seed + k)} for k in range(n_batches)]


def _consts(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ---------------------------------------------------------------------------------------------------------
# FP16


def test_fp16_keeps_float32_io_and_halves_the_file(graphs, tmp_path):
    info = P.convert_fp16(graphs["image"], tmp_path / "fp16.onnx")
    m = onnx.load(info["path"])
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [f32, f32]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    assert info["size_ratio"] <= 0.55  # the bundle bar; weights halve, the graph structure does not
    assert info["size_bytes"] == (tmp_path / "fp16.onnx").stat().st_size


def test_fp16_default_keeps_only_the_l2_normalisation_in_fp32(graphs, tmp_path):
    info = P.convert_fp16(graphs["image"], tmp_path / "fp16.onnx")
    src = onnx.load(graphs["image"])
    ops = {n.name: n.op_type for n in src.graph.node}
    assert sorted(ops[n] for n in info["blocked_nodes"]) == ["Clip", "Div", "Expand", "ReduceL2"]
    # ReLU6 is also a Clip: it must stay FP16, or every activation would get a pair of Casts.
    relu6 = [n for n, op in ops.items() if op == "Clip" and n not in info["blocked_nodes"]]
    assert relu6
    converted = onnx.load(info["path"])
    producers = {o: n for n in converted.graph.node for o in n.output}
    reduce_l2 = next(n for n in converted.graph.node if n.op_type == "ReduceL2")
    cast = producers[reduce_l2.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT


def test_fp16_keeps_nodes_with_constants_beyond_fp16_in_fp32(tmp_path):
    # FeatureNorm's inv_std is 1 / (std + 1e-6): 1e6 for a feature that never varied in training. Converted,
    # it would be clamped to 1e4 and that feature's contribution cut 100-fold.
    from onnx import helper

    scale = np.array([1.0, 1e6], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "inv_std"], ["z"], name="feature_norm_mul"),
         helper.make_node("Relu", ["z"], ["y"], name="relu")],
        "norm", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(scale, "inv_std")])
    src = tmp_path / "norm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    info = P.convert_fp16(src, tmp_path / "norm16.onnx")
    assert info["large_constant_nodes"] == ["feature_norm_mul"]
    x = np.array([[0.5, 1e-5]], np.float32)  # a dead feature that moves a little at test time
    np.testing.assert_allclose(_run(info["path"], {"x": x})["y"], [[0.5, 10.0]], rtol=1e-3)


def test_fp16_unknown_keep_name_raises(graphs, tmp_path):
    with pytest.raises(HuseError, match="l2norm"):
        P.convert_fp16(graphs["image"], tmp_path / "x.onnx", keep_fp32_ops=["l2-norm"])


# ---------------------------------------------------------------------------------------------------------
# Parity of both precisions with FP32 on onnxruntime. The embedding is unit-length, so these are absolute
# bounds on a vector whose entries lie in [-1, 1].
# fp16: 11-bit mantissa, relative step ~5e-4 per rounding; through 5 layers 1e-2 leaves a 10x margin.
# int8: activations are rounded to 1/127 of their calibrated range and weights to 1/127 of each channel's
#   range; each of the 5 quantised layers adds up to about half a step of relative error, and the errors add
#   across layers: a few percent of a unit vector. 0.1 (measured 0.02-0.04 here) catches a broken scale or
#   axis, which moves the embedding by O(1).


# The embedding must stay unit-length for retrieval: FP16 rounds the output once (2^-11 relative); INT8 leaves
# the L2 normalisation and the output in float, so only float32 rounding remains.
@pytest.mark.parametrize("precision, tol, norm_tol", [("fp16", 1e-2, 1e-3), ("int8", 0.1, 1e-5)])
def test_reduced_precision_matches_fp32(graphs, tmp_path, precision, tol, norm_tol):
    dst = tmp_path / f"{precision}.onnx"
    if precision == "fp16":
        P.convert_fp16(graphs["image"], dst)
    else:
        P.quantize_int8(graphs["image"], dst, _image_feeds(), method="minmax")
    x = _images(64, 99)  # not the calibration images
    ref, out = _run(graphs["image"], {"image": x}), _run(dst, {"image": x})
    assert np.abs(out["embedding"] - ref["embedding"]).max() < tol
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=norm_tol)


# ---------------------------------------------------------------------------------------------------------
# INT8 graph form


def test_int8_graph_is_tensorrt_style_qdq(graphs, tmp_path):
    info = P.quantize_int8(graphs["image"], tmp_path / "int8.onnx", _image_feeds(), method="minmax")
    m = onnx.load(info["path"])
    consts = _consts(m)
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 13
    for n in q + dq:  # symmetric int8: zero point 0 of type int8 everywhere
        zp = consts[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    weight_dq = [n for n in dq if n.input[0] in consts]
    assert len(weight_dq) == 5  # 2 Conv + 3 Gemm weights
    for n in weight_dq:
        w, scale = consts[n.input[0]], consts[n.input[1]]
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        assert w.dtype == np.int8
        assert axis == 0 and scale.shape == (w.shape[0],), n.name  # one scale per output channel
    for n in q:  # activations: one scale per tensor
        assert consts[n.input[1]].size == 1, n.name
    # Biases stay float: TensorRT's DequantizeLinear takes no int32 input.
    assert not any(a.dtype == np.int32 for a in consts.values())
    assert info["quantized_nodes"] == 5 and qdq_issues(m) == []
    assert info["size_ratio"] <= 0.35  # int8 weights; the bundle bar (30%) is for the real model


def test_trt_qdq_check_catches_asymmetric_and_per_tensor_weights():
    from onnx import helper

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp_u8"], ["xq"], name="q_x"),
         helper.make_node("DequantizeLinear", ["xq", "s", "zp_u8"], ["xd"], name="dq_x"),
         helper.make_node("DequantizeLinear", ["w", "s", "zp_i8"], ["wd"], name="dq_w"),
         helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")],
        "bad", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
        [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
         numpy_helper.from_array(np.array(128, np.uint8), "zp_u8"),
         numpy_helper.from_array(np.array(0, np.int8), "zp_i8")])
    problems = {(i.node, i.why) for i in qdq_issues(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))}
    assert any(node == "q_x" and "UINT8" in why for node, why in problems)
    assert any(node == "dq_w" and why.startswith("per-tensor weight scale") for node, why in problems)


def test_int8_text_graph_leaves_the_embedding_lookup_alone(graphs, tmp_path):
    feeds = [{"input_ids": _ids(16, k)} for k in range(4)]
    info = P.quantize_int8(graphs["text"], tmp_path / "text8.onnx", feeds, method="minmax")
    m = onnx.load(info["path"])
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    producers = {o: n for n in m.graph.node for o in n.output}
    gather = next(n for n in m.graph.node if n.op_type == "Gather")
    assert gather.input[0] in _consts(m) and _consts(m)[gather.input[0]].dtype == np.float32
    assert gather.input[0] not in producers  # a float table, no DequantizeLinear in front of the lookup
    assert info["quantized_nodes"] == 3  # Conv1d, projection, classifier
    ids = _ids(32, 50)
    ref, out = _run(graphs["text"], {"input_ids": ids}), _run(info["path"], {"input_ids": ids})
    assert np.abs(out["embedding"] - ref["embedding"]).max() < 0.1


def test_int8_excluded_nodes_stay_float(graphs, tmp_path):
    names = P.sensitive_nodes(onnx.load(graphs["image"]))
    excluded = names["first_conv"] + names["classifier"]
    info = P.quantize_int8(graphs["image"], tmp_path / "int8.onnx", _image_feeds(), method="minmax",
                           exclude_nodes=excluded)
    m = onnx.load(info["path"])
    producers = {o: n for n in m.graph.node for o in n.output}
    for node in (n for n in m.graph.node if n.name in excluded):
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    assert info["quantized_nodes"] == 3 and info["excluded_nodes"] == excluded


def test_int8_unknown_excluded_node_raises(graphs, tmp_path):
    with pytest.raises(HuseError, match="no_such_conv"):
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", _image_feeds(1), exclude_nodes=["no_such_conv"])


def _two_conv_graph(path):
    """image -> Conv -> Relu -> Conv, from onnx.helper: few tensors, so entropy calibration stays quick."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["out"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "two_conv", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", 8, SIZE, SIZE])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_entropy_is_not_minmax_in_disguise(tmp_path):
    # onnxruntime's quantize_static gives entropy 128 bins for 128 levels: one candidate, the full range, so
    # entropy came out identical to minmax. Heavy-tailed activations (rare bright outliers) must get a range
    # clipped below their maximum.
    src = _two_conv_graph(tmp_path / "two_conv.onnx")
    feeds = _image_feeds(2)
    for k, f in enumerate(feeds):
        f["image"] = f["image"] * 0.3
        f["image"][:, :, k, k] = 1.0  # rare outliers
    scales = {}
    for method in ("minmax", "entropy"):
        m = onnx.load(P.quantize_int8(src, tmp_path / f"{method}.onnx", feeds, method=method)["path"])
        c = _consts(m)
        scales[method] = {n.input[0]: float(c[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["entropy"]["r1"] < 0.9 * scales["minmax"]["r1"]


def test_unknown_calibration_method_lists_the_known_ones(graphs, tmp_path):
    with pytest.raises(HuseError) as e:
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", _image_feeds(1), method="kl")
    assert all(m in str(e.value) for m in ("entropy", "percentile", "minmax"))
    with pytest.raises(HuseError, match="ort"):
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", _image_feeds(1), quantizer="tensorrt")


def test_calibration_feeds_must_match_the_graph_inputs(graphs, tmp_path):
    with pytest.raises(HuseError, match="input_ids"):
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", [{"input_ids": _ids(2, 0)}])
    with pytest.raises(HuseError, match="at least one"):
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", [])


def test_modelopt_missing_says_how_to_install(graphs, tmp_path, monkeypatch):
    for mod in ("modelopt", "modelopt.onnx", "modelopt.onnx.quantization"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails, whether or not it is installed
    with pytest.raises(HuseError, match="pip install .*nvidia-modelopt"):
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", _image_feeds(1), quantizer="modelopt")


def test_modelopt_has_no_percentile(graphs, tmp_path):
    with pytest.raises(HuseError, match="entropy"):
        P.quantize_int8(graphs["image"], tmp_path / "x.onnx", _image_feeds(1), quantizer="modelopt",
                        method="percentile")


# ---------------------------------------------------------------------------------------------------------
# sensitive_nodes


def test_sensitive_nodes_names_the_stem_and_the_classifier(graphs):
    m = onnx.load(graphs["image"])
    names = P.sensitive_nodes(m)
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    logits_producer = next(n for n in m.graph.node if "logits" in n.output)
    assert names == {"first_conv": [convs[0]], "classifier": [logits_producer.name]}
    assert P.sensitive_nodes(m, first_convs=2)["first_conv"] == convs[:2]


def test_sensitive_nodes_on_the_fused_graph_finds_both_towers(graphs):
    m = onnx.load(graphs["fused"])
    names = P.sensitive_nodes(m)
    nodes = {n.name: n for n in m.graph.node}
    assert len(names["first_conv"]) == 2  # image stem and text Conv1d
    assert len(names["classifier"]) == 2
    # both are the one shared classifier: the same weight initializer
    assert len({nodes[n].input[1] for n in names["classifier"]}) == 1


# ---------------------------------------------------------------------------------------------------------
# accuracy gate


def _predictions(n=1000, classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    probs = rng.random((n, classes))
    correct = rng.random(n) < 0.8  # an 80%-accurate reference
    probs[np.arange(n)[correct], labels[correct]] += 2.0
    return probs / probs.sum(1, keepdims=True), labels


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_gate_passes_identical_predictions(precision):
    probs, labels = _predictions()
    g = P.accuracy_gate(probs, probs.copy(), labels, precision=precision)
    assert g["passed"] and g["agreement"] == 100.0 and g["drop_points"] == 0.0 and not g["failures"]


def test_gate_fails_int8_with_a_one_point_drop():
    probs, labels = _predictions()
    cand = probs.copy()
    right = np.flatnonzero(probs.argmax(1) == labels)[:10]  # 10 of 1000: exactly one point
    cand[right] = np.roll(cand[right], 1, axis=1)
    wrong_now = cand[right].argmax(1) != labels[right]
    assert wrong_now.all()
    g = P.accuracy_gate(probs, cand, labels, precision="int8")
    assert not g["passed"]
    assert g["drop_points"] == pytest.approx(1.0)
    assert g["agreement"] == pytest.approx(99.0)  # still meets the 99% agreement bar: only the drop fails
    assert len(g["failures"]) == 1
    assert "drop 1.00 points > 0.5" in g["message"] and "by 0.50" in g["message"]


def test_gate_fails_fp16_on_agreement_and_says_by_how_much():
    probs, labels = _predictions()
    cand = probs.copy()
    cand[:2] = np.roll(cand[:2], 1, axis=1)  # 2 of 1000 flipped: 99.8% < 99.9%
    g = P.accuracy_gate(probs, cand, labels, precision="fp16")
    assert not g["passed"]
    assert "agreement 99.80% < 99.9%" in g["message"] and "by 0.10" in g["message"]


def test_gate_rejects_unknown_precision_and_mismatched_shapes():
    probs, labels = _predictions(10)
    with pytest.raises(HuseError, match="fp16"):
        P.accuracy_gate(probs, probs, labels, precision="bf16")
    with pytest.raises(HuseError, match="N, C"):
        P.accuracy_gate(probs, probs[:5], labels, precision="int8")


# ---------------------------------------------------------------------------------------------------------
# INT8 for onnxruntime's CPU kernels


def test_int8_cpu_graph_has_uint8_activations_and_stays_close(graphs, tmp_path):
    """uint8 activations with zero points (what onnxruntime's u8s8 CPU kernels take), int8 per-channel weights,
    Conv/Clip/Add quantised and the towers float; same 0.1 embedding bound as the TensorRT form (see above)."""
    info = P.quantize_int8_cpu(graphs["image"], tmp_path / "cpu8.onnx", _image_feeds(), method="minmax")
    m = onnx.load(info["path"])
    consts = _consts(m)
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(consts[n.input[2]].dtype == np.uint8 for n in q)
    consts_dq = [consts[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts]
    assert [w.shape for w in consts_dq if w.dtype == np.int8] == [(16, 3, 3, 3), (32, 16, 3, 3)]  # the 2 Convs
    assert all(w.dtype in (np.int8, np.int32) for w in consts_dq)  # int32: the Convs' biases; the Gemms stay float
    assert info["quantized_node_names"] and info["activations"] == "uint8, asymmetric"
    assert any("UINT8" in i.why for i in qdq_issues(m))  # not a graph for TensorRT
    x = _images(64, 99)
    ref, out = _run(graphs["image"], {"image": x}), _run(info["path"], {"image": x})
    assert np.abs(out["embedding"] - ref["embedding"]).max() < 0.1
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)


def test_int8_cpu_fused_probabilities_stay_float(graphs, tmp_path):
    """The fused graph ends in an Add (the two modalities' probabilities, weighted). Quantised, it rounded every
    probability to a step of its range / 255: most became 0 and rows no longer summed to 1."""
    feeds = [{"image": _images(16, k), "input_ids": _ids(16, k)} for k in range(8)]
    info = P.quantize_int8_cpu(graphs["fused"], tmp_path / "fused8.onnx", feeds, method="minmax")
    assert info["quantized_node_names"]  # the convs are quantised
    x, ids = _images(64, 99), _ids(64, 99)
    ref, out = _run(graphs["fused"], {"image": x, "input_ids": ids}), _run(info["path"], {"image": x, "input_ids": ids})
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, atol=1e-6)
    assert (out["probs"] > 0).all() and len(np.unique(out["probs"])) > 0.9 * out["probs"].size
    assert (out["probs"].argmax(1) == ref["probs"].argmax(1)).mean() > 0.9


@pytest.mark.parametrize("form", ["int8", "int8-cpu"])
def test_a_ranges_file_from_another_rung_gives_the_graph_a_fresh_calibration_gives(graphs, tmp_path, form):
    # The export's float-convs ladder quantises one graph with more convs left in float at each rung; the
    # calibration ranges do not depend on that, so each graph calibrates once.
    quantize = P.quantize_int8_cpu if form == "int8-cpu" else P.quantize_int8
    first = P.sensitive_nodes(onnx.load(graphs["image"]))["first_conv"]
    ranges = tmp_path / "ranges.json"
    quantize(graphs["image"], tmp_path / "rung0.onnx", _image_feeds(), method="percentile", ranges=ranges)
    assert ranges.is_file()
    reused = quantize(graphs["image"], tmp_path / "rung1.onnx", _image_feeds(seed=7), method="percentile",
                      exclude_nodes=first, ranges=ranges)  # other images: had it calibrated again, the scales would differ
    fresh = quantize(graphs["image"], tmp_path / "fresh.onnx", _image_feeds(), method="percentile", exclude_nodes=first)
    assert reused["quantized_node_names"] == fresh["quantized_node_names"] and reused["excluded_nodes"] == first
    a, b = _consts(onnx.load(reused["path"])), _consts(onnx.load(fresh["path"]))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_int8_cpu_unknown_excluded_node_raises(graphs, tmp_path):
    with pytest.raises(HuseError, match="no_such_conv"):
        P.quantize_int8_cpu(graphs["image"], tmp_path / "x.onnx", _image_feeds(1), exclude_nodes=["no_such_conv"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_takes_a_short_last_batch(tmp_path, method):
    # A small catalog's calibration set is rarely a multiple of the batch (e.g. 91 products in batches of 64):
    # onnxruntime's histogram calibrators stacked the batches' outputs and failed on the short one.
    src = _two_conv_graph(tmp_path / "two_conv.onnx")
    feeds = _image_feeds(2)
    feeds[1] = {k: v[:5] for k, v in feeds[1].items()}
    info = P.quantize_int8(src, tmp_path / f"{method}.onnx", feeds, method=method)
    m = onnx.load(info["path"])
    assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)


def test_export_notes_a_single_mode_that_loses_more_than_the_int8_bar():
    """The gate reads the fused answer; a photo-only answer that a precision costs 3 points (mdi-icons' int8-cpu image
    graph: 56.8% -> 53.2%) is said in a note, and a mode within the bar is not."""
    from huse.export.finish import single_mode_notes

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    ref = np.eye(5)[labels] + 0.1 * rng.random((200, 5))  # fp32: every item right
    worse = ref.copy()
    worse[:6] = np.roll(worse[:6], 1, axis=1)  # 6 of 200 items wrong: 3 points
    gates = {"image": P.accuracy_gate(ref, worse, labels, precision="int8-cpu"),
             "text": P.accuracy_gate(ref, ref, labels, precision="int8-cpu"),
             "fused": P.accuracy_gate(ref, ref, labels, precision="int8-cpu")}
    assert single_mode_notes("int8-cpu", gates) == [
        "note: int8-cpu image-only top-1 is 3.00 points below fp32's (more than the 0.5-point INT8 bar; the gate reads "
        "the fused answer): items classified by photo alone lose that at this precision; fp32 keeps them"]
    worse[:5] = ref[:5]  # 1 item: 0.5 points, within the bar
    gates["image"] = P.accuracy_gate(ref, worse, labels, precision="int8-cpu")
    assert single_mode_notes("int8-cpu", gates) == []
