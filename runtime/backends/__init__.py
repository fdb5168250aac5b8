"""Backend registry: a backend is a runner class in its own folder, found here by name."""

from __future__ import annotations

import importlib
import logging

from huse.runtime.errors import HuseError

log = logging.getLogger("huse.runtime")

# name -> "module:Class"; imported only when used, so an unused backend costs nothing.
BACKENDS = {
    "onnxruntime": "huse.runtime.backends.onnxrt.runner:OnnxrtRunner",
    "tensorrt": "huse.runtime.backends.trt.runner:TrtRunner",
}


def runner_class(name: str):
    """The runner class registered under `name`."""
    if name not in BACKENDS:
        raise HuseError(f"Backend {name!r} not found; available backends = {sorted(BACKENDS) + ['auto']}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _trt_usable() -> tuple[bool, str]:
    try:
        from huse.runtime.backends.trt.gpu import gpu_status, import_tensorrt
    except ImportError as e:
        return False, f"TensorRT backend unavailable ({e})"
    usable, reason, _ = gpu_status()  # never raises: whatever cuda-python is installed, an answer
    if not usable:
        return False, reason
    try:
        import_tensorrt()
    except HuseError as e:
        return False, str(e)
    return True, "TensorRT and a usable GPU found"


def gpu_backends() -> dict[str, tuple[bool, str]]:
    """Each GPU backend huse can run, with whether it is usable here and why (or why not).

    Returns:
        {"tensorrt": (usable, reason), "onnxruntime-cuda": (usable, reason)}.
    """
    from huse.runtime.backends.onnxrt.runner import cuda_provider_status

    return {"tensorrt": _trt_usable(), "onnxruntime-cuda": cuda_provider_status()}


def resolve_backend(backend: str = "auto", device: str | None = None) -> tuple[str, str, str]:
    """Pick the backend to run.

    `auto` prefers TensorRT when it and a GPU are usable, else onnxruntime with CUDA, else
    onnxruntime on the CPU; the choice and its reason are logged.

    Args:
        backend: "auto", "onnxruntime" or "tensorrt".
        device: "cpu" or "cuda" for onnxruntime; None decides by availability.
    Returns:
        (backend name, device, reason).
    """
    if backend != "auto":
        runner_class(backend)  # validates the name early, with the list of known ones
        dev = device or ("cuda" if backend == "tensorrt" else "cpu")
        return backend, dev, "requested"
    reasons = []
    if device in (None, "cuda"):
        status = gpu_backends()
        ok, why = status["tensorrt"]
        if ok:
            log.info("backend auto -> tensorrt (%s)", why)
            return "tensorrt", "cuda", why
        reasons.append(f"not tensorrt: {why}")
        ok, why = status["onnxruntime-cuda"]
        if ok:
            reason = "; ".join(reasons + [why])
            log.info("backend auto -> onnxruntime on cuda (%s)", reason)
            return "onnxruntime", "cuda", reason
        reasons.append(f"not onnxruntime-cuda: {why}")
    reason = "; ".join(reasons) or "cpu requested"
    log.info("backend auto -> onnxruntime on cpu (%s)", reason)
    return "onnxruntime", "cpu", reason
