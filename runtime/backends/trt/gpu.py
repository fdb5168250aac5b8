"""Is there a usable NVIDIA GPU here? Asked through the CUDA bindings, never through TensorRT.

Constructing `tensorrt.Runtime`/`tensorrt.Builder` on a machine without a GPU can crash the
process (the lean/dispatch wheels segfault), so the engine builder and the TensorRT runner ask
this module first. cuda-python answers a missing driver with an error code
(`cudaErrorInsufficientDriver`, 35) instead of crashing, which makes it a safe probe; pycuda is
the fallback binding.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# What to do when there is no GPU: said at the end of every "not usable" reason.
NO_GPU_HINT = "TensorRT needs an NVIDIA GPU and driver; use the onnxruntime backend on this machine"
TRT_EXTRA_HINT = "pip install 'huse-edge[trt]' (on Jetson, TensorRT comes from JetPack; install only cuda-python)"


def load_cudart() -> ModuleType | None:
    """Import cuda-python's runtime bindings, or return None when cuda-python is not installed.

    cuda-python 12.6+ and 13.x expose `cuda.bindings.runtime`; older 12.x (what JetPack 6 pairs
    with) only has `cuda.cudart`. Both have the same call signatures for what huse uses.

    Returns:
        The `cudart`-style module, or None.
    """
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a wheel built for another CUDA major failing to load
            continue
    return None


def cuda_error_text(cudart: ModuleType, err) -> str:
    """'cudaErrorInsufficientDriver (35): <description>' for a cuda-python error code.

    Args:
        cudart: the module from `load_cudart()`.
        err: a `cudaError_t`.
    Returns:
        Name, number and description (cudaGetErrorName/String work without a driver).
    """
    try:
        name = cudart.cudaGetErrorName(err)[1].decode()
        text = cudart.cudaGetErrorString(err)[1].decode()
        return f"{name} ({int(err)}): {text}"
    except Exception:
        return f"CUDA error {int(err)}"


def _status_cuda_python(cudart: ModuleType, device: int) -> tuple[bool, str, dict]:
    info: dict = {"binding": "cuda-python", "device": device}
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        # 35 = cudaErrorInsufficientDriver: no NVIDIA driver (or one too old for this cuda-python);
        # 100 = cudaErrorNoDevice: driver present, no GPU.
        return False, f"no usable NVIDIA GPU: cudaGetDeviceCount returned {cuda_error_text(cudart, err)}; {NO_GPU_HINT}", info
    if count == 0:
        return False, f"no usable NVIDIA GPU: the CUDA driver reports 0 devices; {NO_GPU_HINT}", info
    if not 0 <= device < count:
        return False, f"GPU {device} was asked for but this machine has {count} (0..{count - 1})", info
    err, prop = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        return False, f"cudaGetDeviceProperties({device}) failed: {cuda_error_text(cudart, err)}", info
    name = prop.name
    if isinstance(name, bytes):  # a fixed-size C char array, NUL padded
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    info.update(
        name=name,
        compute_capability=f"{prop.major}.{prop.minor}",
        integrated=bool(prop.integrated),  # True on Jetson: host and GPU share memory
        total_memory_mib=int(prop.totalGlobalMem) // 2**20,
        device_count=int(count),
    )
    return True, f"{name} (compute capability {info['compute_capability']}) via cuda-python", info


def _status_pycuda(device: int) -> tuple[bool, str, dict]:
    info: dict = {"binding": "pycuda", "device": device}
    try:
        drv = importlib.import_module("pycuda.driver")
        drv.init()
        count = drv.Device.count()
    except Exception as e:  # pycuda raises when libcuda is missing or the driver is unusable
        return False, f"no usable NVIDIA GPU: pycuda could not initialise CUDA ({type(e).__name__}: {e}); {NO_GPU_HINT}", info
    if count == 0:
        return False, f"no usable NVIDIA GPU: the CUDA driver reports 0 devices; {NO_GPU_HINT}", info
    if not 0 <= device < count:
        return False, f"GPU {device} was asked for but this machine has {count} (0..{count - 1})", info
    dev = drv.Device(device)
    major, minor = dev.compute_capability()
    info.update(
        name=dev.name(),
        compute_capability=f"{major}.{minor}",
        # True on Jetson; read defensively, older pycuda builds may lack the enum member
        integrated=bool(dev.get_attribute(drv.device_attribute.INTEGRATED))
        if hasattr(drv.device_attribute, "INTEGRATED")
        else None,
        total_memory_mib=int(dev.total_memory()) // 2**20,
        device_count=int(count),
    )
    return True, f"{info['name']} (compute capability {info['compute_capability']}) via pycuda", info


def gpu_status(device: int = 0) -> tuple[bool, str, dict]:
    """Say whether CUDA device `device` is usable, without touching TensorRT.

    Tries cuda-python first, then pycuda. Never raises: a missing binding or driver is an
    answer, not an error.

    Args:
        device: CUDA device ordinal.
    Returns:
        (usable, reason, info): `reason` is a one-line explanation (the GPU name when usable, what
        is missing and what to do otherwise); `info` holds `binding`, `device` and, when usable,
        `name`, `compute_capability` ("8.7"), `integrated`, `total_memory_mib`, `device_count`.
    """
    cudart = load_cudart()
    if cudart is not None:
        return _status_cuda_python(cudart, device)
    if importlib.util.find_spec("pycuda") is not None:
        return _status_pycuda(device)
    return False, f"neither cuda-python nor pycuda is installed; {TRT_EXTRA_HINT}", {"binding": None, "device": device}
