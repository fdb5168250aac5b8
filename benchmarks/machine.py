"""What machine a benchmark ran on, how much GPU memory it used, and what its CPU can do at best.

Every huse-bench result carries `machine_info()`, because a latency means nothing without the
CPU, core count, thread settings, BLAS and library versions it was measured with. CPU and memory
come from psutil, BLAS thread pools from threadpoolctl (both in the [bench] extra), the GPU from
NVIDIA's NVML (nvidia-ml-py) or the runtime's cuda-python probe. Nothing here fails when a GPU
or GPU library is absent: the field is None instead. Optional libraries
are found through their package metadata, so recording torch's version does not import torch and
recording TensorRT's does not load its native libraries.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

import numpy as np

from huse.benchmarks.stats import time_fn
from huse.runtime._lazy import lazy_import
from huse.runtime.backends.trt.gpu import gpu_status, load_cudart
from huse.runtime.bundle import package_versions

# Library -> (distribution names to look up, module to import as a fallback). TensorRT and
# onnxruntime ship under several distribution names; on Jetson TensorRT comes from JetPack
# (python3-libnvinfer) with no pip metadata, hence the import fallback.
_LIBRARIES = {
    "numpy": (("numpy",), "numpy"),
    "onnx": (("onnx",), "onnx"),
    "onnxruntime": (("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"), "onnxruntime"),
    "torch": (("torch",), "torch"),
    "tensorrt": (
        ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-lean", "tensorrt-dispatch"),
        "tensorrt",
    ),
    "cuda-python": (("cuda-python", "cuda-bindings"), None),
    "polygraphy": (("polygraphy",), "polygraphy"),
}

# Environment variables that change how many threads (and which kernels) the libraries use.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "ORT_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)

# CPU features that decide which inference kernels run (fp16/int8 dot products, AVX-512, AMX).
_CPU_FLAGS = {
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve", "sve2",
}


def machine_info() -> dict:
    """Describe this machine and software stack for a benchmark record.

    Returns:
        {"cpu": {...}, "memory": {...}, "os": {...}, "python": {...}, "libraries":
        {name: version or None}, "onnxruntime_providers": [...] or None, "blas": {...},
        "threads_env": {...}, "gpu": {...} or None, "cuda": {...} or None}. Values that cannot
        be read on this machine are None; the call never raises for a missing library or GPU.
    """
    return {
        "cpu": _cpu_info(),
        "memory": _memory_info(),
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "platform": platform.platform(),
            "board": _read_text("/proc/device-tree/model"),  # Jetson: "NVIDIA Jetson Orin Nano ..."
            "l4t": _read_text("/etc/nv_tegra_release"),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "libraries": {name: _version(dists, mod) for name, (dists, mod) in _LIBRARIES.items()},
        "onnxruntime_providers": _ort_providers(),
        "blas": _blas_info(),
        "threads_env": {k: os.environ.get(k) for k in _THREAD_ENV},
        "gpu": _gpu_info(),
        "cuda": _cuda_versions(),
    }


def _read_text(path: str) -> str | None:
    try:
        # Device-tree strings end in NUL.
        return Path(path).read_text(errors="replace").strip().strip("\x00") or None
    except OSError:
        return None


def _cpu_info() -> dict:
    psutil = lazy_import("psutil", "bench")
    model, flags = None, set()
    # Model name and feature flags have no portable API (psutil has neither): read them as the kernel lists them.
    for line in (_read_text("/proc/cpuinfo") or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model", "Hardware", "cpu model") and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    try:
        affinity = len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # not on macOS
        affinity = None
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "arch": platform.machine(),
        "logical_cores": psutil.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": affinity,
        # A container's CPU quota caps throughput below what the core count suggests.
        "cgroup_cpu_limit": _cgroup_cpu_limit(),
        "flags": sorted(flags & _CPU_FLAGS),
    }


def _cgroup_cpu_limit() -> float | None:
    text = _read_text("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            try:
                return int(quota) / int(period)
            except ValueError:
                return None
    return None


def _memory_info() -> dict:
    vm = lazy_import("psutil", "bench").virtual_memory()
    return {"total_mib": vm.total / 2**20, "available_mib": vm.available / 2**20}


def _version(dists: tuple[str, ...], module: str | None) -> str | None:
    found = package_versions(*dists)
    if found:
        return next(iter(found.values()))
    if module is None:
        return None
    try:
        if importlib.util.find_spec(module) is None:
            return None
        return str(getattr(importlib.import_module(module), "__version__", None) or "unknown")
    except Exception:  # a broken native library is "not usable", not a crash
        return None


def _ort_providers() -> list[str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        return list(importlib.import_module("onnxruntime").get_available_providers())
    except Exception:
        return None


def _blas_info() -> dict:
    """numpy's BLAS as built and as loaded (threads, kernel architecture)."""
    info: dict = {"numpy_build": None, "threadpools": None}
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        deps = cfg.get("Build Dependencies", {})
        info["numpy_build"] = {
            k: {f: deps[k].get(f) for f in ("name", "version", "openblas configuration") if f in deps[k]}
            for k in ("blas", "lapack")
            if k in deps
        }
    except Exception:
        pass
    info["threadpools"] = [
        {k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")}
        for p in lazy_import("threadpoolctl", "bench").threadpool_info()
    ]
    return info


@contextlib.contextmanager
def _nvml():
    """NVIDIA's management library (nvidia-ml-py), initialised; None where there is no NVIDIA driver.

    NVML reads the driver's counters without creating a CUDA context (a context alone holds
    hundreds of MiB and would pollute a memory figure). Jetson has no NVML.
    """
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver / library: no NVIDIA GPU to describe
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _gpu_info() -> dict | None:
    with _nvml() as nvml:
        if nvml is not None and nvml.nvmlDeviceGetCount() > 0:
            handle = nvml.nvmlDeviceGetHandleByIndex(0)
            name = nvml.nvmlDeviceGetName(handle)
            driver = nvml.nvmlSystemGetDriverVersion()
            return {"name": name.decode() if isinstance(name, bytes) else name,
                    "driver": driver.decode() if isinstance(driver, bytes) else driver,
                    "memory_total_mib": nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20,
                    "count": nvml.nvmlDeviceGetCount(), "source": "nvml"}
    usable, _, info = gpu_status()  # the runtime's probe (cuda-python): Jetson, or no nvidia-ml-py
    if usable:
        return {"name": info["name"], "driver": (_cuda_versions() or {}).get("driver"),
                "memory_total_mib": info["total_memory_mib"], "count": info["device_count"], "source": "cuda-python"}
    tegra = _read_text("/etc/nv_tegra_release")
    if tegra:
        # Jetson: integrated GPU sharing system memory, no NVML.
        return {"name": _read_text("/proc/device-tree/model") or "NVIDIA Tegra", "driver": tegra.splitlines()[0],
                "memory_total_mib": None, "count": 1, "source": "tegra"}
    return None


def _cuda_version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"  # 12040 -> "12.4"


def _cuda_versions() -> dict | None:
    cudart = load_cudart()
    if cudart is None:
        return None
    out = {"runtime": None, "driver": None}
    try:
        err, v = cudart.cudaRuntimeGetVersion()
        if int(err) == 0:
            out["runtime"] = _cuda_version_str(v)
        err, v = cudart.cudaDriverGetVersion()
        if int(err) == 0 and v > 0:
            out["driver"] = _cuda_version_str(v)
    except Exception:
        pass
    return out


def gpu_memory_mib(pid: int | None = None) -> float | None:
    """GPU memory in use on device 0, in MiB, from NVML; None without an NVIDIA driver and
    nvidia-ml-py (on Jetson the GPU shares system memory, so the RSS figures are the ones that matter).

    Args:
        pid: only this process's usage (may be empty inside containers whose PID namespace
            differs); None for the whole device, which includes other processes: subtract a
            reading taken before loading the model.
    Returns:
        MiB in use, or None.
    """
    with _nvml() as nvml:
        if nvml is None or nvml.nvmlDeviceGetCount() == 0:
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        if pid is None:
            return nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return sum((p.usedGpuMemory or 0) for p in procs if p.pid == pid) / 2**20


def matmul_peak_flops(seconds: float = 1.0, n: int = 1024, dtype: str = "float32") -> dict:
    """Measure the FLOP/s this CPU achieves on a square numpy matmul: the practical peak.

    A large matmul through the machine's BLAS, on all the threads that BLAS uses, is the best
    case for dense arithmetic here; dividing a model's achieved FLOP/s by it gives the
    "fraction of peak" in the efficiency figure. It counts 2*n^3 FLOPs per matmul (a multiply
    and an add per MAC), the same convention as `flops.count_flops(...)["flops_per_item"]`.

    Args:
        seconds: how long to time, after two warmup calls (at most twice that if the
            three calls it wants at least take longer).
        n: matrix size; 1024 is large enough to be compute-bound on most CPUs while taking
            tens of ms; use 2048 on many-core servers.
        dtype: numpy dtype name.

    Returns:
        {"flop_s" (from the fastest call: the peak), "flop_s_p50" (from the median call), "n",
         "dtype", "iterations", "blas_threads" (threadpoolctl's count, or None)}.
    """
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float64).astype(dtype)
    b = rng.random((n, n), dtype=np.float64).astype(dtype)
    c = np.empty((n, n), dtype=dtype)  # preallocated so allocation is not timed
    call = lambda: np.matmul(a, b, out=c)  # noqa: E731
    # Warm up outside the budget: the first calls start BLAS threads and fault pages in.
    call()
    call()
    samples = time_fn(
        call, warmup=0, min_iters=3, min_seconds=seconds, max_seconds=2 * seconds
    )
    flop = 2.0 * n**3
    pools = [p for p in lazy_import("threadpoolctl", "bench").threadpool_info() if p.get("user_api") == "blas"]
    threads = pools[0]["num_threads"] if pools else None
    return {
        "flop_s": flop / float(samples.min()),
        "flop_s_p50": flop / float(np.median(samples)),
        "n": n,
        "dtype": str(np.dtype(dtype)),
        "iterations": int(samples.size),
        "blas_threads": threads,
    }


def gpu_matmul_peak_flops(seconds: float = 1.0, n: int = 4096) -> dict[str, dict] | None:
    """Measure GPU 0's practical peak FLOP/s per precision on square matmuls, through torch.

    The GPU counterpart of `matmul_peak_flops`, so GPU rows get a "fraction of peak" too.
    float32 with TF32 off (what an fp32 engine computes: huse builds them without TF32),
    float16 (tensor cores), and int8 (`torch._int_mm`, int32 accumulation) where this torch
    and GPU have it. Timed with CUDA events around back-to-back calls.

    Args:
        seconds: rough time budget per precision.
        n: matrix size (4096 keeps a large GPU busy; still fine on a Jetson).
    Returns:
        {"fp32": {...}, "fp16": {...}, "int8": {...}} with the `matmul_peak_flops` keys
        ("flop_s", "n", "dtype", "iterations"), or None without a CUDA build of torch and a GPU.
    """
    try:
        import torch
    except ImportError:
        return None
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    peaks: dict[str, dict] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("int8", torch.int8)):
            try:
                if dtype == torch.int8:
                    a = torch.randint(-8, 8, (n, n), dtype=dtype, device="cuda")
                    b = torch.randint(-8, 8, (n, n), dtype=dtype, device="cuda")
                    call = lambda: torch._int_mm(a, b)  # noqa: E731
                else:
                    a = torch.randn(n, n, dtype=dtype, device="cuda")
                    b = torch.randn(n, n, dtype=dtype, device="cuda")
                    call = lambda: a @ b  # noqa: E731
                call()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                iters, best = 1, float("inf")
                spent = 0.0
                while spent < seconds:
                    start.record()
                    for _ in range(iters):
                        call()
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                    best = min(best, ms / 1e3 / iters)
                    spent += ms / 1e3
                    iters = min(iters * 2, 64)
                peaks[name] = {"flop_s": 2.0 * n**3 / best, "n": n, "dtype": str(dtype).replace("torch.", ""),
                               "iterations": iters}
            except Exception as e:  # e.g. no int8 matmul kernel for this GPU/torch: that peak is not measured
                peaks[name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return peaks
