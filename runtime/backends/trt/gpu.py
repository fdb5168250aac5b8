"""The CUDA side of the TensorRT backend, through cuda-python only (a wheel everywhere, CUDA graphs;
pycuda compiles against libcuda and cannot capture graphs). `gpu_status` asks for a GPU without
touching TensorRT, whose Runtime/Builder can crash the process when there is none; cuda-python
answers with an error code (35, cudaErrorInsufficientDriver). `Cuda` is the runner's one adapter.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
from types import ModuleType

import numpy as np

from huse.runtime.errors import HuseError

__all__ = ["Cuda", "gpu_status", "load_cudart", "NO_GPU_HINT", "TRT_EXTRA_HINT"]

NO_GPU_HINT = "TensorRT needs an NVIDIA GPU and driver; use the onnxruntime backend on this machine"
TRT_EXTRA_HINT = "pip install 'huse-edge[trt]' (on Jetson, TensorRT comes from JetPack; install only cuda-python)"


def load_cudart() -> ModuleType | None:
    """cuda-python's runtime bindings (`cuda.bindings.runtime`, else JetPack 6's 12.x `cuda.cudart`), or None."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a wheel built for another CUDA major failing to load
            continue
    return None


def _error_text(cudart: ModuleType, err) -> str:
    try:  # cudaGetErrorName/String work without a driver
        return f"{cudart.cudaGetErrorName(err)[1].decode()} ({int(err)}): {cudart.cudaGetErrorString(err)[1].decode()}"
    except Exception:
        return f"CUDA error {int(err)}"


def gpu_status(device: int = 0) -> tuple[bool, str, dict]:
    """Say whether CUDA device `device` is usable, without touching TensorRT. Never raises.

    Returns:
        (usable, reason, info): `reason` is one line (the GPU, or what is missing and what to do);
        `info` holds `binding`, `device` and, when usable, `name`, `compute_capability` ("8.7"),
        `integrated`, `total_memory_mib`, `device_count`.
    """
    cudart = load_cudart()
    if cudart is None:
        return False, f"cuda-python is not installed; {TRT_EXTRA_HINT}", {"binding": None, "device": device}
    info: dict = {"binding": "cuda-python", "device": device}
    err, count = cudart.cudaGetDeviceCount()
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
    return True, f"{name} (compute capability {info['compute_capability']}) via cuda-python", info


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
