"""The GPU path's logic that a machine without a GPU can check: version pins, the answers of
gpu_status whatever cuda-python says, the engine-cache key, the IO plan of an engine and the
CUDA-graph fallback. Plain stand-ins replace cuda-python / engine objects only where the code
under test is pure logic over their answers; nothing here claims a GPU ran."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from packaging.requirements import Requirement

from huse.runtime.backends import resolve_backend
from huse.runtime.backends.trt import gpu, loader
from huse.runtime.backends.trt.gpu import driver_mismatch, gpu_status
from huse.runtime.backends.trt.loader import engine_cache_path, load_or_build, profile_shapes
from huse.runtime.backends.trt.runner import TrtRunner, describe_io
from huse.runtime.doctor import engine_lines
from huse.runtime.errors import HuseError

ROOT = Path(__file__).resolve().parents[2]


# -- version pins -------------------------------------------------------------------------------


def _extras() -> dict[str, dict[str, Requirement]]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: {Requirement(r).name: Requirement(r) for r in reqs} for name, reqs in extras.items()}


def test_each_trt_extra_pins_cuda_python_to_its_cuda_major():
    extras = _extras()
    cu12, cu13 = extras["trt-cu12"], extras["trt-cu13"]
    assert "tensorrt-cu12" in cu12 and "tensorrt-cu13" in cu13
    assert "trt" not in extras  # a bare tensorrt/cuda-python now resolves to CUDA 13 builds on any driver
    spec12, spec13 = cu12["cuda-python"].specifier, cu13["cuda-python"].specifier
    assert {v for v in ("12.2.0", "12.2.1", "12.6.0", "12.9.4", "13.0.0", "13.4.4") if spec12.contains(v)} \
        == {"12.2.1", "12.6.0", "12.9.4"}  # 12.2.1: the oldest supported, run in a side venv by CI
    assert {v for v in ("12.9.4", "13.0.0", "13.4.4", "14.0.0") if spec13.contains(v)} == {"13.0.0", "13.4.4"}


def test_export_extra_needs_a_polygraphy_that_runs_on_tensorrt_11():
    spec = _extras()["export"]["polygraphy"].specifier
    assert {v for v in ("0.49.0", "0.49.26", "0.50.3", "0.53.6") if spec.contains(v)} == {"0.50.3", "0.53.6"}
    assert loader.MIN_POLYGRAPHY == (0, 50, 3)


# -- gpu_status never raises --------------------------------------------------------------------


class _Err(int):
    """What cuda-python returns as an error code: an int-like enum."""


def _cudart(device_count, runtime=12020, driver=0):
    """A stand-in for cuda-python's runtime module with the answers a driverless machine gives."""
    def answer(value):
        return value if callable(value) else (lambda: value)

    return SimpleNamespace(
        cudaGetDeviceCount=answer(device_count),
        cudaRuntimeGetVersion=lambda: (_Err(0), runtime),
        cudaDriverGetVersion=answer(driver),
        cudaGetErrorName=lambda e: (_Err(0), b"cudaErrorInsufficientDriver"),
        cudaGetErrorString=lambda e: (_Err(0), b"CUDA driver version is insufficient for CUDA runtime version"),
    )


def _dlopen_fails():
    raise RuntimeError("Failed to dlopen libcuda.so.1")  # what cuda-python 12.2.1 to 12.8.0 raise


@pytest.mark.parametrize("cudart, expected", [
    (_cudart(_dlopen_fails, driver=_dlopen_fails), "no NVIDIA driver found"),
    (_cudart((_Err(35), None), runtime=13040, driver=(_Err(0), 0)), "cudaErrorInsufficientDriver (35)"),
    (_cudart(lambda: 1 / 0), "ZeroDivisionError"),  # anything else a binding may do: still an answer
])
def test_gpu_status_answers_instead_of_raising(monkeypatch, cudart, expected):
    monkeypatch.setattr(gpu, "load_cudart", lambda: cudart)
    usable, reason, info = gpu_status()
    assert usable is False and expected in reason and info["device"] == 0
    backend, device, why = resolve_backend("auto")
    assert (backend, device) == ("onnxruntime", "cpu") and expected in why


def test_cuda_python_built_for_a_newer_driver_is_named_with_the_fix(monkeypatch):
    versions = {"cuda_python": "13.4.4", "cuda_runtime": "13.4", "cuda_driver": "12.8"}
    line = driver_mismatch(versions)
    assert "cuda-python 13.4.4" in line and "CUDA 13 driver (580.65.06 or newer)" in line
    assert "supports CUDA 12.8" in line and "'cuda-python>=12.2.1,<13'" in line and "huse-edge[trt-cu12]" in line
    assert driver_mismatch({**versions, "cuda_driver": "13.0"}) is None
    assert driver_mismatch({**versions, "cuda_runtime": "12.9", "cuda_driver": "13.2"}) is None  # newer driver: fine
    assert driver_mismatch({**versions, "cuda_driver": None}) is None  # no driver: the device count says so
    # gpu_status puts the mismatch first: it is the one thing the user can fix.
    monkeypatch.setattr(gpu, "load_cudart", lambda: _cudart((_Err(35), None), runtime=13040, driver=(_Err(0), 12080)))
    usable, reason, info = gpu_status()
    assert usable is False and "needs a CUDA 13 driver" in reason and info["cuda_driver"] == "12.8"


def test_doctor_exits_0_and_names_the_backend_in_one_line():
    out = subprocess.run([sys.executable, "-m", "huse.runtime.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    expected = "tensorrt" if gpu_status()[0] else "onnxruntime"
    assert last.startswith(f"backend: {expected} on ") and "Traceback" not in out.stderr


def test_doctor_prints_where_a_dla_engine_runs():
    entry = {"graph": "image", "precision": "fp16", "tensorrt_version": "10.3.0", "gpu_name": "Orin",
             "compute_capability": "8.7", "profile": {"image": {"min": [8, 3, 64, 64], "max": [8, 3, 64, 64]}}}
    lines = engine_lines({"engines": [{**entry, "dla_core": 0, "dla_layers": 61, "gpu_layers": 2},
                                      {**entry, "precision": "fp32", "dla_core": None}]})
    assert lines[0] == ("fp16 image: TensorRT 10.3.0, Orin (8.7), batch 8..8, DLA core 0: 61 layers on the DLA, "
                        "2 on the GPU")
    assert "DLA" not in lines[1]
    assert "no TensorRT engines" in engine_lines({"engines": []})[0]


# -- the engine-cache key and the device asked for ----------------------------------------------


def test_engine_cache_key_covers_dla_tf32_and_workspace(tmp_path):
    base = dict(trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                profile=(8, 8, 8), onnx_sha256="ab" * 32)
    path = engine_cache_path(tmp_path, **base)
    assert engine_cache_path(tmp_path, **base, dla_core=None, tf32=False, workspace_mib=1024) == path  # the defaults
    changed = [engine_cache_path(tmp_path, **base, dla_core=0), engine_cache_path(tmp_path, **base, dla_core=1),
               engine_cache_path(tmp_path, **base, tf32=True), engine_cache_path(tmp_path, **base, workspace_mib=4096)]
    assert len({path, *changed}) == 5
    assert changed[0].name.startswith("fp16_dla0_")


def test_load_or_build_keys_and_builds_for_the_device_asked_for(monkeypatch, tmp_path):
    """Two different GPUs: the engine for device 1 is keyed by and built on device 1, not device 0."""
    onnx_file = tmp_path / "image.onnx"
    onnx_file.write_bytes(b"graph")
    gpus = {0: ("NVIDIA A10", "8.6"), 1: ("NVIDIA H100", "9.0")}
    monkeypatch.setattr(loader, "gpu_status",
                        lambda d=0: (True, "", {"name": gpus[d][0], "compute_capability": gpus[d][1]}))
    monkeypatch.setattr(loader, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0"))
    calls = []
    monkeypatch.setattr(loader, "build_engine", lambda *a, **kw: calls.append(kw) or {"file": "x"})
    path, _ = load_or_build(onnx_file, tmp_path / "cache", precision="fp16", device=1, dla_core=None, tf32=True)
    assert "_sm90_nvidia-h100_" in path.name and calls[-1]["device"] == 1 and calls[-1]["tf32"] is True
    path0, _ = load_or_build(onnx_file, tmp_path / "cache", precision="fp16")
    assert "_sm86_nvidia-a10_" in path0.name and calls[-1]["device"] == 0 and path0 != path


# -- the optimisation profile and the IO plan of an engine --------------------------------------


def test_profile_puts_the_batch_range_only_on_dynamic_batch_inputs():
    shapes = profile_shapes([("image", (-1, 3, 64, 64)), ("lengths", (1, 6))], (1, 8, 64))
    assert shapes == {"image": {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [64, 3, 64, 64]}}
    with pytest.raises(HuseError, match=r"input 'ids' of g.onnx has dynamic non-batch dims \(-1, -1\)"):
        profile_shapes([("ids", (-1, -1))], (1, 8, 64), "g.onnx")


class _FakeTrt:
    """The two names of the tensorrt module that describe_io reads, answering as TensorRT does."""

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    @staticmethod
    def nptype(dtype):
        types = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32}
        if dtype not in types:  # TensorRT: "Could not resolve TensorRT datatype to an equivalent numpy datatype."
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return types[dtype]


def _engine(tensors):
    """A stand-in engine description: name -> (mode, dtype, shape, profile or None)."""
    names = list(tensors)
    return SimpleNamespace(num_io_tensors=len(names), get_tensor_name=names.__getitem__,
                           get_tensor_mode=lambda n: tensors[n][0], get_tensor_dtype=lambda n: tensors[n][1],
                           get_tensor_shape=lambda n: tensors[n][2], get_tensor_profile_shape=lambda n, p: tensors[n][3])


class _Context:
    def __init__(self, outputs):
        self.inputs, self.outputs = {}, outputs

    def set_input_shape(self, name, shape):
        self.inputs[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.outputs[name](self.inputs)


def test_io_plan_sizes_outputs_from_the_max_input_shapes_and_keeps_static_inputs():
    engine = _engine({"image": ("input", "FLOAT", (-1, 3, 8, 8), ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))),
                      "scale": ("input", "FLOAT", (1, 4), None),
                      "logits": ("output", "HALF", (-1, 5), None)})
    context = _Context({"logits": lambda inputs: (inputs["image"][0], 5)})
    io = describe_io(_FakeTrt, engine, context, "m.engine")
    assert (io["image"].dynamic, io["image"].min_shape, io["image"].max_shape) == (True, (1, 3, 8, 8), (16, 3, 8, 8))
    assert (io["scale"].dynamic, io["scale"].max_shape) == (False, (1, 4))
    assert io["logits"].max_shape == (16, 5) and io["logits"].dtype == np.float16


def test_io_plan_refuses_data_dependent_outputs_and_types_numpy_lacks():
    image = ("input", "FLOAT", (-1, 3), ((1, 3), (1, 3), (8, 3)))
    engine = _engine({"image": image, "boxes": ("output", "FLOAT", (-1, 4), None)})
    with pytest.raises(HuseError, match=r"output 'boxes' of TensorRT engine m.engine has a data-dependent shape \(-1, 4\)"):
        describe_io(_FakeTrt, engine, _Context({"boxes": lambda inputs: (-1, 4)}), "m.engine")
    engine = _engine({"image": image, "probs": ("output", "BF16", (-1, 5), None)})
    with pytest.raises(HuseError, match=r"tensor 'probs' of TensorRT engine m.engine is BF16, which has no numpy type"):
        describe_io(_FakeTrt, engine, _Context({"probs": lambda inputs: (8, 5)}), "m.engine")


# -- CUDA graphs: a failed capture falls back to normal execution --------------------------------


def _runner_with_io(tmp_path, batches):
    runner = TrtRunner.__new__(TrtRunner)  # the capture loop only: no engine, no GPU
    runner.path, runner.cuda_graph_batches, runner._graphs = tmp_path / "m.engine", batches, {}
    cleared = []
    runner._cuda = SimpleNamespace(rt=SimpleNamespace(cudaGetLastError=lambda: cleared.append(1) or (_Err(0),)))
    runner._io = {"image": SimpleNamespace(name="image", is_input=True, dynamic=True, min_shape=(1, 3), max_shape=(8, 3))}
    return runner, cleared


def test_a_failed_cuda_graph_capture_leaves_that_batch_to_normal_execution(tmp_path, caplog):
    runner, cleared = _runner_with_io(tmp_path, (1, 4))

    def capture(batch):
        if batch == 4:
            raise HuseError("CUDA call cudaStreamEndCapture failed on GPU 0: cudaErrorStreamCaptureInvalidated (901)")
        return "context", "graph", {}

    runner._capture = capture
    with caplog.at_level(logging.WARNING, logger="huse.runtime"):
        runner._capture_graphs()
    assert list(runner._graphs) == [1] and cleared == [1]
    assert "CUDA graph capture for batch 4" in caplog.text and "runs without a CUDA graph" in caplog.text


def test_a_cuda_graph_batch_outside_the_profile_is_still_an_error(tmp_path):
    runner, _ = _runner_with_io(tmp_path, (16,))
    runner._capture = lambda batch: pytest.fail("nothing is captured for a batch the engine cannot take")
    with pytest.raises(HuseError, match=r"CUDA graph batch 16 is outside the engine's profile 1\.\.8"):
        runner._capture_graphs()


def test_execute_gets_the_stream_object_as_tensorrt_samples_pass_it(tmp_path):
    runner, _ = _runner_with_io(tmp_path, ())
    stream, seen = object(), {}
    runner._stream, runner._cuda = stream, SimpleNamespace(copy=lambda *a: None)
    runner._io["image"].host = np.zeros(8 * 3 * 4, np.uint8)
    runner._io["image"].dtype, runner._io["image"].device = np.dtype(np.float32), 1
    context = SimpleNamespace(execute_async_v3=lambda **kw: seen.update(kw) or True)
    runner._enqueue(context, {"image": (2, 3)}, {})
    assert seen == {"stream_handle": stream}


def test_an_old_polygraphy_on_tensorrt_11_is_one_clear_error():
    """What Polygraphy 0.49.x raises on TensorRT 11 becomes a HuseError naming both versions and the fix."""
    pytest.importorskip("polygraphy")
    error = AttributeError("'tensorrt.ILayer' object has no attribute 'precision_is_set'")
    err = loader._api_mismatch(SimpleNamespace(__version__="11.4.0"), error)
    assert isinstance(err, HuseError) and "TensorRT 11.4.0" in str(err) and "precision_is_set" in str(err)
    assert "polygraphy >= 0.50.3" in str(err) and "huse-edge[export]" in str(err)
