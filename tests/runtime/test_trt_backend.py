"""TensorRT backend. GPU tests compare against onnxruntime; CPU tests cover what a CPU can prove."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from huse.runtime.backends.trt import loader
from huse.runtime.backends.trt.gpu import Cuda, gpu_status
from huse.runtime.backends.trt.loader import engine_cache_path, load_or_build, sidecar_path
from huse.runtime.backends.trt.runner import TrtRunner
from huse.runtime.errors import HuseError

# Parity tolerance by precision, stated next to it (torch2trt's habit). Only fp32 is built here.
TOLERANCE = {"fp32": 1e-3}

GPU_USABLE, GPU_REASON, _ = gpu_status()
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


def _can_build() -> tuple[bool, str]:
    try:
        from huse.runtime.backends.trt.loader import engine_support
    except Exception as e:  # the [export] extra is missing
        return False, f"huse.runtime.backends.trt.loader unavailable ({e})"
    return engine_support()


CAN_BUILD, BUILD_REASON = _can_build()
needs_trt_gpu = pytest.mark.skipif(not CAN_BUILD, reason=BUILD_REASON)


# -- runs on any machine ------------------------------------------------------------------------


@pytest.mark.skipif(TRT_INSTALLED, reason="tensorrt is installed here; this checks the missing-tensorrt message")
def test_runner_without_tensorrt_names_the_trt_extra(tmp_path):
    with pytest.raises(HuseError, match=r"huse-edge\[trt-cu12\]. or .huse-edge\[trt-cu13\]"):
        TrtRunner(tmp_path / "model.engine")


def test_runner_modules_import_no_heavy_dependency():
    code = (
        "import sys, huse.runtime.backends.trt.runner, huse.runtime.backends.trt.loader, huse.runtime.backends.trt.gpu\n"
        "heavy = ['tensorrt', 'cuda', 'polygraphy', 'onnx', 'onnxruntime', 'torch']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_cache_path_changes_with_every_key_part(tmp_path):
    base = dict(
        trt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        precision="fp16",
        profile=(1, 8, 64),
        onnx_sha256="ab" * 32,
    )
    path = engine_cache_path(tmp_path, **base)
    assert path.parent == tmp_path and path.suffix == ".engine"
    assert engine_cache_path(tmp_path, **base) == path  # deterministic
    changes = dict(
        trt_version="10.3.1",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="int8",
        profile=(1, 8, 32),
        onnx_sha256="cd" * 32,
    )
    paths = {path}
    for key, value in changes.items():
        changed = engine_cache_path(tmp_path, **{**base, key: value})
        assert changed != path, key
        paths.add(changed)
    assert len(paths) == 1 + len(changes)
    # The per-input profile form is accepted and keyed too.
    mapping = {"image": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [64, 3, 224, 224]}}
    assert engine_cache_path(tmp_path, **{**base, "profile": mapping}) not in paths


def test_cuda_results_of_an_unexpected_length_are_refused():
    """cuda-python 11 returns three values from cudaGraphInstantiate; that must not become a None graph."""
    cuda = Cuda.__new__(Cuda)  # the result check only: success codes never reach a driver
    cuda.device, cuda.rt = 0, SimpleNamespace(cudaMalloc=lambda n: (0, 1234), cudaFree=lambda p: (0,),
                                              cudaGraphInstantiate=lambda g, f: (0, object(), b""))
    assert cuda("cudaMalloc", 8) == 1234
    assert cuda("cudaFree", 1234) is None
    with pytest.raises(HuseError, match="cudaGraphInstantiate returned 2 values; huse needs cuda-python 12"):
        cuda("cudaGraphInstantiate", None, 0)


def test_runner_is_refused_before_activation(tmp_path):
    """Every runner's infer checks that it is active (BaseRunner's template method)."""
    from huse.runtime.backends.base import BaseRunner
    from huse.runtime.backends.onnxrt.runner import OnnxrtRunner

    for runner in (OnnxrtRunner(tmp_path / "m.onnx"), BaseRunner(tmp_path / "m.engine")):
        with pytest.raises(HuseError, match="is not active"):
            runner.infer({"x": np.zeros(1, np.float32)})


@pytest.mark.skipif(CAN_BUILD, reason="TensorRT and a GPU are present")
def test_load_or_build_without_gpu_or_tensorrt_says_why(tmp_path):
    onnx_file = tmp_path / "image.onnx"
    onnx_file.write_bytes(b"not needed: the check comes first")
    with pytest.raises(HuseError, match=r"huse-edge\[trt-cu1[23]\]|no usable NVIDIA GPU"):
        load_or_build(onnx_file, tmp_path / "cache", precision="fp32")


# -- needs a usable NVIDIA GPU and TensorRT --------------------------------------------------------


def fused_model():
    """A tiny stand-in for fused.onnx: image (N,3,8,8) float32 + input_ids (N,6) int32 -> probs."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = {
        "conv_w": rng.standard_normal((4, 3, 3, 3)),
        "table": rng.standard_normal((50, 4)),
        "fc_w": rng.standard_normal((5, 8)),
        "fc_b": rng.standard_normal(5),
    }
    nodes = [
        h.make_node("Conv", ["image", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"]),
        h.make_node("GlobalAveragePool", ["r"], ["g"]),
        h.make_node("Flatten", ["g"], ["image_embedding"]),
        h.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        h.make_node("ReduceMean", ["tokens"], ["text_embedding"], axes=[1], keepdims=0),
        h.make_node("Concat", ["image_embedding", "text_embedding"], ["both"], axis=1),
        h.make_node("Gemm", ["both", "fc_w", "fc_b"], ["logits"], transB=1),
        h.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = h.make_graph(
        nodes,
        "fused",
        [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, 8, 8]), h.make_tensor_value_info("input_ids", T.INT32, ["N", 6])],
        [
            h.make_tensor_value_info("probs", T.FLOAT, ["N", 5]),
            h.make_tensor_value_info("image_embedding", T.FLOAT, ["N", 4]),
            h.make_tensor_value_info("text_embedding", T.FLOAT, ["N", 4]),
        ],
        [nh.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def make_feed(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32),
        "input_ids": rng.integers(0, 50, size=(batch, 6)).astype(np.int32),
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(onnx path, engine path, manifest entry, onnxruntime session) for the tiny fused model."""
    if not CAN_BUILD:
        pytest.skip(BUILD_REASON)
    import onnx
    import onnxruntime as ort

    root = tmp_path_factory.mktemp("trt")
    onnx_path = root / "fused.onnx"
    onnx.save(fused_model(), onnx_path)
    engine_path = root / "fused.fp32.engine"
    entry = loader.build_engine(onnx_path, engine_path, precision="fp32", batch=(1, 4, 8))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return onnx_path, engine_path, entry, session


def assert_matches_onnxruntime(session, feed, outputs, tol):
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    assert sorted(outputs) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.gpu
@needs_trt_gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_trt_matches_onnxruntime_fp32(built, batch):
    _, engine_path, entry, session = built
    feed = make_feed(batch, seed=batch)
    with TrtRunner(engine_path, manifest_entry=entry) as runner:
        assert runner.input_names == ["image", "input_ids"]
        assert_matches_onnxruntime(session, feed, runner.infer(feed), TOLERANCE["fp32"])


@pytest.mark.gpu
@needs_trt_gpu
def test_cuda_graph_mode_equals_normal_mode(built):
    _, engine_path, _, session = built
    feeds = {b: make_feed(b, seed=10 + b) for b in (1, 3, 4)}
    with TrtRunner(engine_path) as plain:
        normal = {b: plain.infer(f) for b, f in feeds.items()}
    with TrtRunner(engine_path, cuda_graph_batches=(1, 4)) as graphed:
        for _ in range(2):  # replaying twice must give the same answer: buffers are reused
            for b, feed in feeds.items():  # batch 3 has no graph and runs normally in between
                out = graphed.infer(feed)
                for name in normal[b]:
                    np.testing.assert_allclose(out[name], normal[b][name], rtol=1e-6, atol=1e-6, err_msg=f"{name} b={b}")
                assert_matches_onnxruntime(session, feed, out, TOLERANCE["fp32"])


@pytest.mark.gpu
@needs_trt_gpu
def test_infer_from_several_threads(built):
    _, engine_path, _, session = built
    errors: list[BaseException] = []

    with TrtRunner(engine_path, cuda_graph_batches=(2,)) as runner:

        def worker(seed: int) -> None:
            try:
                for i in range(10):
                    feed = make_feed(1 + (seed + i) % 8, seed=100 * seed + i)
                    assert_matches_onnxruntime(session, feed, runner.infer(feed), TOLERANCE["fp32"])
            except BaseException as e:  # surfaced in the main thread below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


@pytest.mark.gpu
@needs_trt_gpu
def test_batch_outside_the_profile_is_refused(built):
    _, engine_path, _, _ = built
    with TrtRunner(engine_path) as runner, pytest.raises(HuseError, match=r"profile 1\.\.8"):
        runner.infer(make_feed(9, seed=0))


@pytest.mark.gpu
@needs_trt_gpu
def test_engine_from_another_tensorrt_is_refused(built, tmp_path):
    _, engine_path, entry, _ = built
    copy = tmp_path / engine_path.name
    shutil.copy(engine_path, copy)
    sidecar_path(copy).write_text(json.dumps({**entry, "tensorrt_version": "0.0.0"}))
    with pytest.raises(HuseError, match=r"built with TensorRT 0\.0\.0"):
        TrtRunner(copy).activate()
    with pytest.raises(HuseError, match=r"compute capability 1\.0"):
        TrtRunner(engine_path, manifest_entry={**entry, "compute_capability": "1.0"}).activate()


@pytest.mark.gpu
@needs_trt_gpu
def test_load_or_build_builds_once_then_reuses(built, tmp_path, monkeypatch):
    onnx_path, _, _, session = built
    calls = []
    build_engine = loader.build_engine

    def counting_build(*args, **kwargs):
        calls.append(args)
        return build_engine(*args, **kwargs)

    monkeypatch.setattr(loader, "build_engine", counting_build)
    cache = tmp_path / "cache"
    first_path, first_entry = load_or_build(onnx_path, cache, precision="fp32", batch=(1, 2, 4))
    again_path, again_entry = load_or_build(onnx_path, cache, precision="fp32", batch=(1, 2, 4))
    assert len(calls) == 1 and first_path == again_path and first_entry == again_entry
    with TrtRunner(again_path, manifest_entry=again_entry) as runner:
        feed = make_feed(2, seed=7)
        assert_matches_onnxruntime(session, feed, runner.infer(feed), TOLERANCE["fp32"])


@pytest.mark.gpu
@needs_trt_gpu
def test_infer_phases_times_each_phase_and_returns_the_same_outputs(built):
    _, engine_path, _, _ = built
    feed = make_feed(4, seed=42)
    with TrtRunner(engine_path) as plain, TrtRunner(engine_path, cuda_graph_batches=(4,)) as graphed:
        reference = plain.infer(feed)
        out, phases = plain.infer_phases(feed)
        assert set(phases) == {"h2d_ms", "compute_ms", "d2h_ms"} and all(v >= 0 for v in phases.values())
        assert phases["compute_ms"] > 0
        out_g, phases_g = graphed.infer_phases(feed)
        assert set(phases_g) == {"graph_ms"} and phases_g["graph_ms"] > 0
        for name in reference:
            np.testing.assert_allclose(out[name], reference[name], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(out_g[name], reference[name], rtol=1e-6, atol=1e-6)
