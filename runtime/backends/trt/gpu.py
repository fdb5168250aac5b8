"""The CUDA side of the TensorRT backend, through cuda-python only (a wheel everywhere, CUDA graphs;
pycuda compiles against libcuda and cannot capture graphs). `gpu_status` asks for a GPU without
touching TensorRT, whose Runtime/Builder can crash the process when there is none; cuda-python
answers with an error code (35, cudaErrorInsufficientDriver), or raises (12.2-12.8 without
libcuda.so.1), and both become an answer. A cuda-python built for a newer CUDA major than the
driver supports is named with the pin that fits (`driver_mismatch`). `Cuda` is the runner's one adapter.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata
from types import ModuleType

import numpy as np

from huse.runtime.errors import HuseError

__all__ = ["Cuda", "cuda_versions", "driver_mismatch", "gpu_status", "import_tensorrt", "load_cudart",
           "NO_GPU_HINT", "TRT_EXTRA_HINT"]

NO_GPU_HINT = "TensorRT needs an NVIDIA GPU and driver; use the onnxruntime backend on this machine"
# cuda-python per CUDA major, as the trt-cu12 / trt-cu13 extras pin it: a cuda-python built for
# CUDA 13 needs a CUDA 13 driver. 12.2 is JetPack 6.0's CUDA, the oldest target huse supports.
CUDA_PYTHON_PIN = {12: "cuda-python>=12.2.1,<13", 13: "cuda-python>=13,<14"}
# The oldest Linux driver of each CUDA major (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}
TRT_EXTRA_HINT = ("pip install 'huse-edge[trt-cu12]' or 'huse-edge[trt-cu13]', matching the CUDA version "
                  "`nvidia-smi` shows (on Jetson, TensorRT comes from JetPack: install only "
                  f"'{CUDA_PYTHON_PIN[12]}' on JetPack 6, '{CUDA_PYTHON_PIN[13]}' on JetPack 7)")


def load_cudart() -> ModuleType | None:
    """cuda-python's runtime bindings (`cuda.bindings.runtime`, else JetPack 6's 12.x `cuda.cudart`), or None."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a wheel built for another CUDA major failing to load
            continue
    return None


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or a HuseError that says which extra installs it.

    Raises:
        HuseError: tensorrt is not installed or does not load, naming the trt-cu12 / trt-cu13 extras.
    """
    try:
        return importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or a bindings wheel whose libraries are missing (OSError)
        raise HuseError(f"tensorrt is needed here but could not be imported ({type(e).__name__}: {e}); "
                        f"{TRT_EXTRA_HINT}") from e


def _error_text(cudart: ModuleType, err) -> str:
    try:  # cudaGetErrorName/String work without a driver
        return f"{cudart.cudaGetErrorName(err)[1].decode()} ({int(err)}): {cudart.cudaGetErrorString(err)[1].decode()}"
    except Exception:
        return f"CUDA error {int(err)}"


def _cuda_python_version() -> str | None:
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None  # JetPack's system bindings carry no pip metadata


def _version_text(v: int | None) -> str | None:
    return None if not v else f"{v // 1000}.{v % 1000 // 10}"  # 12080 -> "12.8"


def cuda_versions(cudart: ModuleType) -> dict:
    """The CUDA versions that decide whether this cuda-python can talk to this driver. Never raises.

    Returns:
        {"cuda_python": package version or None, "cuda_runtime": the CUDA version the bindings were
        built for ("13.4"), "cuda_driver": the CUDA version the driver supports ("12.8"), or None
        when there is no driver (or this cuda-python cannot ask: 12.x before 12.9 raises
        without libcuda.so.1)}.
    """
    versions = {"cuda_python": _cuda_python_version(), "cuda_runtime": None, "cuda_driver": None}
    for key, call in (("cuda_runtime", "cudaRuntimeGetVersion"), ("cuda_driver", "cudaDriverGetVersion")):
        try:
            err, value = getattr(cudart, call)()
            if int(err) == 0:
                versions[key] = _version_text(int(value))  # the driver answers 0 when none is installed
        except Exception:
            pass
    return versions


def driver_mismatch(versions: dict) -> str | None:
    """Say what to do when the installed cuda-python needs a newer driver than this machine has.

    Args:
        versions: `cuda_versions(...)`.
    Returns:
        One line naming both versions and the cuda-python (or extra) that matches the driver, or
        None when they match or either is unknown.
    """
    runtime, driver = versions.get("cuda_runtime"), versions.get("cuda_driver")
    if not runtime or not driver:
        return None
    need, have = int(runtime.split(".")[0]), int(driver.split(".")[0])
    if have >= need:
        return None
    pkg = versions.get("cuda_python") or runtime
    return (f"cuda-python {pkg} is built for CUDA {runtime} and needs a CUDA {need} driver "
            f"({MIN_DRIVER.get(need, 'a newer one')} or newer), but this machine's driver supports CUDA {driver}: "
            f"pip install '{CUDA_PYTHON_PIN.get(have, f'cuda-python<{need}')}' (or 'huse-edge[trt-cu{have}]'), "
            "or upgrade the driver")


def gpu_status(device: int = 0) -> tuple[bool, str, dict]:
    """Say whether CUDA device `device` is usable, without touching TensorRT. Never raises.

    Returns:
        (usable, reason, info): `reason` is one line (the GPU, or what is missing and what to do);
        `info` holds `binding`, `device`, the `cuda_versions` and, when usable, `name`,
        `compute_capability` ("8.7"), `integrated`, `total_memory_mib`, `device_count`.
    """
    try:
        return _gpu_status(device)
    except Exception as e:  # a binding that raises where it should return a code: still an answer
        return (False, f"cuda-python could not query GPU {device} ({type(e).__name__}: {e}); {NO_GPU_HINT}",
                {"binding": "cuda-python", "device": device})


def _gpu_status(device: int) -> tuple[bool, str, dict]:
    cudart = load_cudart()
    if cudart is None:
        return False, f"cuda-python is not installed; {TRT_EXTRA_HINT}", {"binding": None, "device": device}
    info: dict = {"binding": "cuda-python", "device": device, **cuda_versions(cudart)}
    mismatch = driver_mismatch(info)
    if mismatch:
        return False, f"no usable NVIDIA GPU: {mismatch}", info
    try:
        err, count = cudart.cudaGetDeviceCount()
    except RuntimeError as e:  # cuda-python 12.2-12.8 raise "Failed to dlopen libcuda.so.1" (then "Function ... not found")
        return (False, f"no usable NVIDIA GPU: no NVIDIA driver found (cuda-python {info['cuda_python']} could not load "
                f"libcuda.so.1: {e}); {NO_GPU_HINT}", info)
    if int(err) != 0:  # 35: no driver (or one too old for this cuda-python); 100: driver, no GPU
        return False, f"no usable NVIDIA GPU: cudaGetDeviceCount returned {_error_text(cudart, err)}; {NO_GPU_HINT}", info
    if not 0 <= device < count:
        return False, f"GPU {device} was asked for but this machine has {count}; {NO_GPU_HINT}", info
    err, prop = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        return False, f"cudaGetDeviceProperties({device}) failed: {_error_text(cudart, err)}", info
    name = prop.name
    if isinstance(name, bytes):  # a fixed-size C char array, NUL padded
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    info.update(name=name, compute_capability=f"{prop.major}.{prop.minor}",
                integrated=bool(prop.integrated),  # True on Jetson: host and GPU share memory
                total_memory_mib=int(prop.totalGlobalMem) // 2**20, device_count=int(count))
    return True, f"GPU {device}: {name} (compute capability {info['compute_capability']}) via cuda-python", info


class Cuda:
    """The CUDA runtime calls the TensorRT runner makes on device `device`, each checked.
    Raises HuseError naming the `trt` extra when cuda-python is not installed."""

    def __init__(self, device: int = 0):
        self.rt = load_cudart()
        if self.rt is None:
            raise HuseError(f"cuda-python is needed to run TensorRT engines but is not installed; {TRT_EXTRA_HINT}")
        self.device = device

    def __call__(self, what: str, *args):
        """Call `cudart.<what>(*args)`; raise on an error code, return the result (or None)."""
        err, *rest = getattr(self.rt, what)(*args)
        if int(err) != 0:
            raise HuseError(f"CUDA call {what} failed on GPU {self.device}: {_error_text(self.rt, err)}")
        if len(rest) > 1:  # e.g. cuda-python 11's three-value cudaGraphInstantiate: never hand back None
            raise HuseError(f"CUDA call {what} returned {len(rest)} values; huse needs cuda-python 12 or newer; {TRT_EXTRA_HINT}")
        return rest[0] if rest else None

    def bind(self) -> None:
        # The runtime API keeps the current device per thread: set it in whichever thread calls.
        self("cudaSetDevice", self.device)

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array (free with `cudaFreeHost(arr.ctypes.data)`)."""
        ptr = int(self("cudaMallocHost", nbytes))
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def copy(self, dst: int, src: int, nbytes: int, to_device: bool, stream) -> None:
        kinds = self.rt.cudaMemcpyKind
        kind = kinds.cudaMemcpyHostToDevice if to_device else kinds.cudaMemcpyDeviceToHost
        self("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    def capture(self, stream, enqueue) -> object:
        """Capture what `enqueue()` puts on `stream` as an executable CUDA graph."""
        # Thread-local mode: unrelated CUDA calls in other threads cannot invalidate the capture.
        self("cudaStreamBeginCapture", stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue()
        except BaseException:
            with contextlib.suppress(Exception):  # leave capture mode, keep the original error
                self("cudaStreamEndCapture", stream)
            raise
        graph = self("cudaStreamEndCapture", stream)
        try:
            return self("cudaGraphInstantiate", graph, 0)
        finally:  # the executable graph does not need the template graph
            self("cudaGraphDestroy", graph)

    def elapsed_ms(self, start, end) -> float:
        """Milliseconds between two recorded events (waits for `end`)."""
        self("cudaEventSynchronize", end)
        return float(self("cudaEventElapsedTime", start, end))
