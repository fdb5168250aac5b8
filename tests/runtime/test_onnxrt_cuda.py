"""onnxruntime on CUDA: used only when its CUDA provider really starts, never a silent CPU run.

onnxruntime-gpu lists CUDAExecutionProvider on every machine; where the GPU, driver or CUDA
libraries are missing, a session quietly falls back to the CPU (seen with onnxruntime-gpu
1.31.1 on a machine without a GPU: "Failed to load ... libcublasLt.so.13", providers in use
['CPUExecutionProvider']). The CPU-only wheel does the same when asked for CUDA, so listing
CUDA as available reproduces that machine exactly.
"""

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from huse.runtime.backends import resolve_backend  # noqa: E402
from huse.runtime.backends.onnxrt import runner as onnxrt  # noqa: E402
from huse.runtime.errors import HuseError  # noqa: E402

CUDA_WORKS, CUDA_REASON = onnxrt.cuda_provider_status()


@pytest.fixture
def cuda_listed_but_unusable(monkeypatch):
    if CUDA_WORKS:
        pytest.skip("onnxruntime's CUDA provider works here; this checks the fallback machine")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    onnxrt.cuda_provider_status.cache_clear()
    yield
    onnxrt.cuda_provider_status.cache_clear()


def test_probe_model_is_the_documented_identity_graph():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7, producer_name="")
    onnx.checker.check_model(model)
    assert model.SerializeToString() == onnxrt.PROBE_MODEL
    session = ort.InferenceSession(onnxrt.PROBE_MODEL, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": np.array([3.5], np.float32)})[0], [3.5])


def test_listed_cuda_that_does_not_start_is_not_usable(cuda_listed_but_unusable):
    usable, reason = onnxrt.cuda_provider_status()
    assert not usable
    assert "could not start" in reason and "device='cpu'" in reason


def test_auto_backend_falls_to_cpu_and_says_why(cuda_listed_but_unusable):
    backend, device, reason = resolve_backend("auto")
    assert (backend, device) == ("onnxruntime", "cpu")
    assert "not onnxruntime-cuda: onnxruntime lists CUDAExecutionProvider but could not start it" in reason


def test_cuda_runner_refuses_to_run_on_the_cpu(cuda_listed_but_unusable, tiny_bundle):
    runner = onnxrt.OnnxrtRunner(tiny_bundle / "text.onnx", device="cuda")
    with pytest.raises(HuseError, match=r"could not start its CUDA provider for .*text\.onnx.*CPUExecutionProvider"):
        runner.activate()
    assert runner.session is None


def test_cpu_runner_is_unaffected(cuda_listed_but_unusable, tiny_bundle):
    with onnxrt.OnnxrtRunner(tiny_bundle / "text.onnx", device="cpu") as runner:
        assert runner.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_WORKS, reason=f"onnxruntime CUDA is not usable here: {CUDA_REASON}")
def test_cuda_runner_matches_cpu(tiny_bundle):
    """Atol 1e-3: cuDNN may pick different convolution algorithms (TF32 off by default in onnxruntime)."""
    from huse.runtime.classifier import Classifier

    titles = ["red cotton shirt", "leather boots", "a bag"]
    with Classifier(tiny_bundle, backend="onnxruntime", device="cpu") as cpu, \
            Classifier(tiny_bundle, backend="onnxruntime", device="cuda") as gpu:
        np.testing.assert_allclose(gpu.predict_proba(titles=titles), cpu.predict_proba(titles=titles), atol=1e-3)
