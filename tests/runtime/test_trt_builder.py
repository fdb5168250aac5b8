"""Engine building: the no-GPU answers run everywhere; the build itself needs a GPU + TensorRT."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from huse.runtime.backends.trt.gpu import gpu_status, load_cudart  # noqa: E402
from huse.runtime.backends.trt.loader import build_engine, engine_support, read_sidecar  # noqa: E402
from huse.runtime.errors import HuseError  # noqa: E402

GPU_USABLE, GPU_REASON, GPU_INFO = gpu_status()
CAN_BUILD, BUILD_REASON = engine_support()
needs_engine_build = pytest.mark.skipif(not CAN_BUILD, reason=BUILD_REASON)
needs_no_gpu = pytest.mark.skipif(GPU_USABLE, reason="a usable GPU is present; this checks the no-GPU answer")


def tiny_model(batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        h.make_node("Conv", ["image", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        h.make_node("Flatten", ["g"], ["embedding"], name="flatten"),
        h.make_node("Gemm", ["embedding", "fc_w"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
        nh.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc_w"),
    ]
    graph = h.make_graph(
        nodes,
        "tiny",
        [h.make_tensor_value_info("image", T.FLOAT, [batch, 3, 8, 8])],
        [h.make_tensor_value_info("embedding", T.FLOAT, [batch, 4]), h.make_tensor_value_info("logits", T.FLOAT, [batch, 5])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.fixture
def tiny_onnx(tmp_path):
    path = tmp_path / "image.onnx"
    onnx.save(tiny_model(), path)
    return path


# -- runs on any machine ------------------------------------------------------------------------


@needs_no_gpu
def test_engine_support_says_why_not_here():
    supported, reason = engine_support()
    assert supported is False
    assert "GPU" in reason or "cuda-python" in reason or "tensorrt" in reason


@needs_no_gpu
def test_cuda_python_reports_the_missing_driver():
    if load_cudart() is None:
        pytest.skip("cuda-python is not installed")
    usable, reason, info = gpu_status()
    assert usable is False and info["binding"] == "cuda-python"
    # 35 without a driver, 100 with a driver but no GPU: both are codes, not crashes.
    assert "cudaErrorInsufficientDriver (35)" in reason or "cudaErrorNoDevice (100)" in reason


def test_no_cuda_binding_at_all_names_the_trt_extra(monkeypatch):
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    usable, reason, info = gpu_status()
    assert usable is False and info["binding"] is None
    assert "huse-edge[trt-cu12]" in reason and "huse-edge[trt-cu13]" in reason
    supported, why = engine_support()
    assert supported is False and "huse-edge[trt-cu12]" in why


@needs_no_gpu
def test_build_engine_without_gpu_raises_with_the_reason(tiny_onnx, tmp_path):
    with pytest.raises(HuseError, match="cannot build a TensorRT engine") as err:
        build_engine(tiny_onnx, tmp_path / "image.engine", precision="fp32")
    assert engine_support()[1] in str(err.value)
    assert not (tmp_path / "image.engine").exists()


def test_build_engine_refuses_a_bad_profile_before_anything_else(tiny_onnx, tmp_path):
    with pytest.raises(HuseError, match=r"1 <= min <= opt <= max"):
        build_engine(tiny_onnx, tmp_path / "x.engine", precision="fp32", batch=(8, 1, 64))


# -- needs a usable NVIDIA GPU and TensorRT --------------------------------------------------------


@pytest.mark.gpu
@needs_engine_build
def test_build_engine_writes_engine_and_manifest_entry(tiny_onnx, tmp_path):
    import tensorrt as trt

    engine = tmp_path / "image.fp32.engine"
    entry = build_engine(tiny_onnx, engine, precision="fp32", batch=(1, 4, 8))
    assert entry["file"] == engine.name
    assert entry["sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert entry["precision"] == "fp32"
    assert entry["tensorrt_version"] == trt.__version__
    assert entry["compute_capability"] == GPU_INFO["compute_capability"]
    assert entry["gpu_name"] == GPU_INFO["name"]
    assert entry["profile"] == {"image": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}
    assert entry["dla_core"] is None
    assert read_sidecar(engine) == json.loads(json.dumps(entry))


@pytest.mark.gpu
@needs_engine_build
def test_timing_cache_is_written_and_reused(tiny_onnx, tmp_path):
    cache = tmp_path / "timing.cache"
    build_engine(tiny_onnx, tmp_path / "a.engine", precision="fp32", batch=(1, 2, 4), timing_cache=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    first = cache.stat().st_size
    build_engine(tiny_onnx, tmp_path / "b.engine", precision="fp32", batch=(1, 2, 4), timing_cache=cache)  # loads it back
    assert cache.stat().st_size >= first


@pytest.mark.gpu
@needs_engine_build
def test_incompatible_graph_is_refused_naming_the_node(tmp_path, capfd):
    graph = h.make_graph(
        [h.make_node("Det", ["x"], ["y"], name="det_node")],
        "det",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N"])],
    )
    path = tmp_path / "det.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    with pytest.raises(HuseError, match="ONNX parser rejected"):
        build_engine(path, tmp_path / "det.engine", precision="fp32")
    captured = capfd.readouterr()
    assert "det_node" in captured.out + captured.err  # Polygraphy logs each parser error, node named


@pytest.mark.gpu
@needs_engine_build
def test_dla_core_on_a_device_without_dla_is_refused(tiny_onnx, tmp_path):
    import tensorrt as trt

    if trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores > 0:
        pytest.skip("this device has DLA cores")
    with pytest.raises(HuseError, match="DLA core 0"):
        build_engine(tiny_onnx, tmp_path / "dla.engine", precision="fp32", dla_core=0)
