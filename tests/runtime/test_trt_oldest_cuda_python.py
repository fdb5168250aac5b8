"""The oldest supported cuda-python 12 (12.2.1) and a cuda-python 13 on a machine without an
NVIDIA driver, for real.

cuda-python 12.2.1 to 12.8.0 raise `RuntimeError: Failed to dlopen libcuda.so.1` where later
releases return error 35, so only running that release proves the fallback. The test builds a
small side venv per cuda-python (the runtime's dependencies at the versions this suite runs with,
pytest), caches it under ~/.cache/huse/test-venvs/ keyed by those pins (shared by every checkout:
this checkout's code comes in through PYTHONPATH, laid out as pyproject's package-dir maps it),
and runs gpu_status, `huse doctor` and the TensorRT test modules in it. Cost: about 50 s and
300 MB per venv the first time (pip from its cache), then ~5 s each. It skips only when pip
cannot reach the package index.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from huse.runtime.backends.trt.gpu import gpu_status

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The floor of the trt-cu12 extra (JetPack 6.0's CUDA 12.2), and the newest 13.x checked (trt-cu13).
CUDA_PYTHONS = ("12.2.1", "13.4.4")
# The runtime's dependencies (and pytest) at the versions this suite runs with: a pinned, repeatable venv.
PINS = tuple(f"{d}=={importlib.metadata.version(d)}" for d in ("numpy", "Pillow", "click", "onnxruntime", "pytest"))
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "Could not fetch URL", "ProxyError", "ConnectTimeoutError")


def _pip(python: Path, *args: str) -> None:
    """pip install into the side venv; skip when the index is out of reach, fail on anything else."""
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        text = out.stdout + out.stderr
        if any(marker in text for marker in OFFLINE):
            pytest.skip(f"pip cannot reach the package index to build the side venv: {text.strip()[-300:]}")
        pytest.fail(f"pip install {' '.join(args)} failed:\n{text[-3000:]}")


@pytest.fixture(scope="module")
def checkout_path(tmp_path_factory) -> Path:
    """A folder that makes this checkout importable as `huse.*` without installing it: one link
    per entry of pyproject's [tool.setuptools.package-dir] (huse.runtime -> runtime/, ...)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = tmp_path_factory.mktemp("checkout-path")
    for package, folder in package_dir.items():
        link = root.joinpath(*package.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / folder, target_is_directory=True)
    return root


@pytest.fixture(scope="module", params=CUDA_PYTHONS)
def side_venv(request, checkout_path) -> tuple[str, Path]:
    """(cuda-python version, the side venv's python), built once per pins and reused."""
    pins = (f"cuda-python=={request.param}", *PINS)
    key = hashlib.sha256(json.dumps([pins, platform.python_version()]).encode()).hexdigest()[:16]
    home = Path.home() / ".cache" / "huse" / "test-venvs"
    venv = home / f"cuda-python-{request.param}-{key}"
    for old in home.glob(f"cuda-python-{request.param}-*/complete"):  # other pins, unused for a week
        if old.parent != venv and time.time() - old.stat().st_mtime > 7 * 86400:
            shutil.rmtree(old.parent, ignore_errors=True)
    if (venv / "complete").is_file():
        (venv / "complete").touch()  # in use: keep
    else:
        partial = home / f"{venv.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True, capture_output=True, timeout=300)
            python = partial / "bin" / "python"
            _pip(python, *pins)
        except BaseException:  # a skip or failure leaves no half-built venv behind
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / "complete").write_text("\n".join(pins) + "\n")
        try:
            partial.rename(venv)  # a venv runs from anywhere through bin/python; readers never see half of one
        except OSError:  # another run finished first: use its copy
            shutil.rmtree(partial, ignore_errors=True)
    return request.param, venv / "bin" / "python"


@pytest.fixture
def run_in(checkout_path):
    """Run the side venv's python on this checkout (its `huse` only, nothing from this venv)."""
    def run(python: Path, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(checkout_path)
        return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    return run


@pytest.mark.skipif(gpu_status()[0], reason="this machine has a usable GPU; this checks the machine without a driver")
def test_cuda_python_without_a_driver_falls_back_to_onnxruntime(side_venv, run_in):
    cuda_python, python = side_venv
    code = ("import json, importlib.metadata as m; from huse.runtime.backends.trt.gpu import gpu_status, load_cudart; "
            "print(json.dumps([m.version('cuda-python'), load_cudart().__name__, gpu_status()]))")
    out = run_in(python, "-c", code)
    assert out.returncode == 0, out.stderr
    version, module, (usable, reason, info) = json.loads(out.stdout)
    assert version == cuda_python and usable is False and info["cuda_driver"] is None
    if cuda_python.startswith("12."):  # the old module path, whose calls raise without libcuda.so.1
        assert module == "cuda.cudart" and info["cuda_runtime"] == "12.2"
        assert "no NVIDIA driver found" in reason and "libcuda.so.1" in reason
    else:  # cuda.bindings answers with error 35
        assert module == "cuda.bindings.runtime" and info["cuda_runtime"] == "13.4"
        assert "cudaErrorInsufficientDriver (35)" in reason

    doctor = run_in(python, "-m", "huse.runtime.cli", "doctor")
    assert doctor.returncode == 0 and "Traceback" not in doctor.stderr, doctor.stderr
    last = doctor.stdout.strip().splitlines()[-1]
    assert last.startswith("backend: onnxruntime on cpu (not tensorrt: no usable NVIDIA GPU")

    # The TensorRT test modules import and skip with their reasons (onnx is absent there: the
    # builder module skips whole); -p no:cacheprovider keeps the checkout clean.
    tests = run_in(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                 "tests/runtime/test_trt_backend.py", "tests/runtime/test_trt_builder.py",
                 "tests/runtime/test_trt_gpu_path.py")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "error" not in tests.stdout.splitlines()[-1]
