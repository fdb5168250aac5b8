"""FP16 bundles on a CPU: the float32 graph with the FP16 graph's weights (runtime/backends/onnxrt/weights.py).

The runtime reads the float16 weights without the `onnx` package; these tests check that reader against
onnx itself, and the Classifier's answers against a reference built with onnx: the float32 graph with its
weights rounded to float16, run by plain onnxruntime.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from huse.runtime import Classifier  # noqa: E402
from huse.runtime.backends.onnxrt.weights import float16_initializers, float32_model_with_float16_weights  # noqa: E402
from huse.runtime.errors import HuseError  # noqa: E402


def test_float16_weights_read_without_onnx_equal_onnx_own(tiny_minilm_bundle):
    for graph in ("image", "text", "fused"):
        path = tiny_minilm_bundle / "fp16" / f"{graph}.onnx"
        want = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT16}
        got = float16_initializers(path)
        assert set(got) == set(want) and want
        for name, w in want.items():
            assert got[name].dtype == np.float16 and got[name].shape == w.shape
            np.testing.assert_array_equal(got[name], w)


def _rounded_reference(bundle, graph: str, path):
    """The bundle's float32 graph with the weights its FP16 graph holds in float16 rounded to float16 (onnx)."""
    fp16 = {i.name for i in onnx.load(str(bundle / "fp16" / f"{graph}.onnx")).graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT16}
    model = onnx.load(str(bundle / f"{graph}.onnx"))
    for init in model.graph.initializer:
        if init.name in fp16:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float16).astype(np.float32), init.name))
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path))


def test_fp16_on_cpu_is_the_float32_graph_with_float16_weights(tiny_minilm_bundle, tmp_path):
    """The answers of an FP16 bundle on a CPU equal the float32 graph's with its weights rounded to float16,
    on x86 and Arm alike (no float16 arithmetic): float32 rounding (the logits carry the layer's logit
    scale), not the ~1e-2 of float16 arithmetic. The image graph's convolutions too: onnxruntime's x86
    NCHWc transformer builds its blocked weights from the model's own initializers, and the model it is
    given holds the rounded ones."""
    rng = np.random.default_rng(0)
    titles = ["acme black tee", "blue denim jacket with pockets", "red dress"]
    with Classifier(tiny_minilm_bundle, backend="onnxruntime", precision="fp16") as clf, \
            Classifier(tiny_minilm_bundle, backend="onnxruntime") as ref32:
        for graph in ("image", "text"):
            inputs = [i.name for i in ref32._runner(graph).session.get_inputs()]
            if graph == "text":
                feeds = clf.tokenizer.inputs(titles)
            else:
                meta = ref32._runner(graph).session.get_inputs()[0]
                feeds = {meta.name: rng.standard_normal([3] + list(meta.shape[1:])).astype(np.float32)}
            feeds = {k: feeds[k] for k in inputs}
            got, fp32 = clf.run_graph(graph, feeds), ref32.run_graph(graph, feeds)
            sess = _rounded_reference(tiny_minilm_bundle, graph, tmp_path / f"{graph}-rounded.onnx")
            want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
            np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
            assert np.abs(got["logits"] - fp32["logits"]).max() > 0  # the float16 weights, not the float32 ones


def test_the_float32_model_holds_the_float16_weights_and_nothing_else_changes(tiny_minilm_bundle):
    for graph in ("image", "text", "fused"):
        fp32, fp16 = tiny_minilm_bundle / f"{graph}.onnx", tiny_minilm_bundle / "fp16" / f"{graph}.onnx"
        model = onnx.load_from_string(float32_model_with_float16_weights(fp32, fp16))
        original = onnx.load(str(fp32))
        rounded = float16_initializers(fp16)
        assert rounded and len(model.graph.initializer) == len(original.graph.initializer)
        changed = 0
        for got, before in zip(model.graph.initializer, original.graph.initializer):
            w = numpy_helper.to_array(got)
            assert got.name == before.name and got.data_type == before.data_type
            want = rounded[got.name].astype(np.float32) if got.name in rounded else numpy_helper.to_array(before)
            assert w.dtype == want.dtype
            np.testing.assert_array_equal(w, want)
            changed += not np.array_equal(w, numpy_helper.to_array(before))
        assert changed  # the rounding reached the model, not only the reference
        assert [n.SerializeToString() for n in model.graph.node] == [n.SerializeToString() for n in original.graph.node]


def test_float16_weights_of_another_graph_are_refused(tiny_minilm_bundle):
    with pytest.raises(HuseError, match="image.onnx.*re-export the bundle"):
        float32_model_with_float16_weights(tiny_minilm_bundle / "image.onnx", tiny_minilm_bundle / "fp16" / "text.onnx")


def test_an_unreadable_fp16_graph_is_a_clear_error(tmp_path):
    bad = tmp_path / "text.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")  # field 7, a length far past the end
    with pytest.raises(HuseError, match="text.onnx.*re-export"):
        float16_initializers(bad)
