"""What machine a benchmark ran on, how much memory it used, and what its CPU can do at best.

Every huse-bench result carries `machine_info()`, because a latency means nothing without the
CPU, core count, thread settings, BLAS and library versions it was measured with. Nothing here
fails when an optional library or a GPU is absent: the field is None instead. Optional libraries
are found through their package metadata, so recording torch's version does not import torch and
recording TensorRT's does not load its native libraries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from huse.benchmarks.stats import time_fn

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
    model, flags, physical = None, set(), None
    cpuinfo = _read_text("/proc/cpuinfo") or ""
    cores = set()
    phys_id = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware", "cpu model") and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            phys_id = value
        elif key == "core id":
            cores.add((phys_id, value))
    if cores:
        physical = len(cores)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or physical
    except ImportError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS/Windows
        affinity = None
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
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
    total = available = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, available = vm.total / 2**20, vm.available / 2**20
    except ImportError:
        for line in (_read_text("/proc/meminfo") or "").splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                mib = int(value.split()[0]) / 1024  # reported in kB
                if key == "MemTotal":
                    total = mib
                else:
                    available = mib
    return {"total_mib": total, "available_mib": available}


def _version(dists: tuple[str, ...], module: str | None) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
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
    try:
        import threadpoolctl

        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                   "threading_layer", "architecture")}
            for p in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        pass
    return info


def _nvidia_smi(query: str, *extra: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-...` as stripped strings, or None if it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, query, *extra, "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=15, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return rows or None


def _cudart():
    """cuda-python's runtime module (13.x and 12.x layouts), or None."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


def _ok(err) -> bool:
    return int(err) == 0  # cudaSuccess


def _gpu_info() -> dict | None:
    rows = _nvidia_smi("--query-gpu=name,driver_version,memory.total")
    if rows:
        name, driver, total = (rows[0] + [None, None, None])[:3]
        return {
            "name": name,
            "driver": driver,
            "memory_total_mib": _to_float(total),
            "count": len(rows),
            "source": "nvidia-smi",
        }
    cudart = _cudart()
    if cudart is not None:
        try:
            # Without a GPU these return cudaErrorInsufficientDriver / NoDevice rather than crash.
            err, count = cudart.cudaGetDeviceCount()
            if _ok(err) and count > 0:
                err, prop = cudart.cudaGetDeviceProperties(0)
                err_d, driver = cudart.cudaDriverGetVersion()
                if _ok(err):
                    name = prop.name
                    if isinstance(name, bytes):
                        name = name.split(b"\x00")[0].decode(errors="replace")
                    return {
                        "name": name,
                        "driver": _cuda_version_str(driver) if _ok(err_d) else None,
                        "memory_total_mib": prop.totalGlobalMem / 2**20,
                        "count": count,
                        "source": "cuda-python",
                    }
        except Exception:
            pass
    tegra = _read_text("/etc/nv_tegra_release")
    if tegra:
        # Jetson: integrated GPU sharing system memory; nvidia-smi is absent on older JetPacks.
        return {
            "name": _read_text("/proc/device-tree/model") or "NVIDIA Tegra",
            "driver": tegra.splitlines()[0],
            "memory_total_mib": None,
            "count": 1,
            "source": "tegra",
        }
    return None


def _cuda_version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"  # 12040 -> "12.4"


def _cuda_versions() -> dict | None:
    cudart = _cudart()
    if cudart is None:
        return None
    out = {"runtime": None, "driver": None}
    try:
        err, v = cudart.cudaRuntimeGetVersion()
        if _ok(err):
            out["runtime"] = _cuda_version_str(v)
        err, v = cudart.cudaDriverGetVersion()
        if _ok(err) and v > 0:
            out["driver"] = _cuda_version_str(v)
    except Exception:
        pass
    return out


def _to_float(s: str | None) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    The peak only grows over a process's life; call `reset_peak_rss()` before a configuration
    (or run each configuration in its own process) to attribute it to one configuration.

    Returns:
        The high-water mark of resident memory (getrusage ru_maxrss), in MiB.
    """
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux >= 4.0), so the next
    `peak_rss_mib()` measures only what ran since.

    Returns:
        True if the kernel accepted the reset; False elsewhere (then use one process per
        configuration to get per-configuration peaks).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # CLEAR_REFS_MM_HIWATER_RSS
        return True
    except OSError:
        return False


def current_rss_mib() -> float | None:
    """Resident memory of this process now, in MiB, or None where it cannot be read.

    Returns:
        Current RSS in MiB.
    """
    statm = _read_text("/proc/self/statm")
    if statm:
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def gpu_memory_mib(pid: int | None = None) -> float | None:
    """GPU memory in use, in MiB, or None without a usable NVIDIA GPU.

    Reads nvidia-smi, which does not create a CUDA context here (a context alone holds hundreds
    of MiB and would pollute the figure). Without nvidia-smi it falls back to cuda-python's
    cudaMemGetInfo, which does create one in this process. On Jetson the GPU shares system
    memory, so the RSS figures are the ones that matter.

    Args:
        pid: report only this process's usage (nvidia-smi --query-compute-apps; may be empty
            inside containers whose PID namespace differs); None for the whole device 0 in use,
            which includes other processes: subtract a reading taken before loading the model.

    Returns:
        MiB in use, or None.
    """
    if pid is not None:
        rows = _nvidia_smi("--query-compute-apps=pid,used_memory")
        if rows is None:
            return None
        used = [_to_float(r[1]) for r in rows if len(r) > 1 and r[0] == str(pid)]
        return sum(u for u in used if u is not None) if used else 0.0
    rows = _nvidia_smi("--query-gpu=memory.used")
    if rows:
        return _to_float(rows[0][0])
    cudart = _cudart()
    if cudart is None:
        return None
    try:
        err, free, total = cudart.cudaMemGetInfo()
        return (total - free) / 2**20 if _ok(err) else None
    except Exception:
        return None


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
    threads = None
    try:
        import threadpoolctl

        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        threads = pools[0]["num_threads"] if pools else None
    except ImportError:
        pass
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
