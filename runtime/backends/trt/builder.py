"""Build a TensorRT engine from a bundle's ONNX file (TensorRT 10 and 11 Python API).

The network is always created strongly typed, so precision comes from the ONNX graph itself:
float32 tensors run in fp32, float16 tensors in fp16, and Q/DQ pairs in int8. That is the only
mode TensorRT 11 has (its FP16/INT8 builder flags and calibrators are gone) and an opt-in on
TensorRT 10 (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, which 11 still accepts and
ignores), so one code path builds on both.

What runs where: Jetson Orin (JetPack 6) has TensorRT 10.x; TensorRT 11 targets newer JetPack and
x86 GPU servers. Engines are tied to the TensorRT version and GPU they were built on, so they
are built on the target, and the manifest entry records both for `TrtRunner` to check.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from pathlib import Path

from huse.runtime._lazy import lazy_import
from huse.runtime.backends.trt.gpu import TRT_EXTRA_HINT, gpu_status
from huse.runtime.backends.trt.runner import sidecar_path
from huse.runtime.errors import HuseError

# Builder scratch memory (MemoryPoolType.WORKSPACE). Jetson Orin Nano 8 GB shares its memory
# between CPU and GPU; 1 GiB leaves room for the OS, the Python process and the engine itself,
# and the towers' tactics do not need more. Raise it on GPU servers for a wider tactic search.
DEFAULT_WORKSPACE_MIB = 1024

MIN_TRT_MAJOR = 10  # named-tensor API, execute_async_v3, strongly typed networks


def engine_support() -> tuple[bool, str]:
    """Say whether an engine can be built here, and if not, why.

    The GPU is probed first through the CUDA bindings: constructing `trt.Builder`/`trt.Runtime`
    without a GPU can crash the process, so this function never does.

    Returns:
        (supported, reason): the reason names what is missing and how to get it.
    """
    usable, reason, info = gpu_status()
    if not usable:
        return False, reason
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # not installed, or a bindings wheel without its libraries
        return False, f"tensorrt could not be imported ({type(e).__name__}: {e}); {TRT_EXTRA_HINT}"
    version = getattr(trt, "__version__", "0")
    if int(version.split(".")[0]) < MIN_TRT_MAJOR:
        return False, f"TensorRT {version} is installed; huse needs TensorRT {MIN_TRT_MAJOR} or newer; {TRT_EXTRA_HINT}"
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        return False, (
            f"this TensorRT {version} package has no builder or ONNX parser (a lean/dispatch runtime?); "
            "building needs the full TensorRT"
        )
    return True, f"TensorRT {version} on {info['name']} (compute capability {info['compute_capability']})"


def detect_precision(model) -> str:
    """The bundle precision an ONNX graph expresses: "int8" (Q/DQ), "fp16" or "fp32".

    Args:
        model: an `onnx.ModelProto`.
    Returns:
        "int8" if any QuantizeLinear/DequantizeLinear, else "fp16" if any float16 initializer,
        value or Cast to float16, else "fp32".
    """
    onnx = lazy_import("onnx", "export")
    fp16 = onnx.TensorProto.FLOAT16
    graph = model.graph
    ops = {n.op_type for n in graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8"
    if any(i.data_type == fp16 for i in graph.initializer):
        return "fp16"
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    if any(v.type.tensor_type.elem_type == fp16 for v in values):
        return "fp16"
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute):
            return "fp16"
    return "fp32"


def _write_atomic(path: Path, data) -> None:
    # Write next to the target then rename: a reader never sees half an engine or cache.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    batch: tuple[int, int, int] = (1, 8, 64),
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | Path | None = None,
    dla_core: int | None = None,
    tf32: bool = False,
    precision: str | None = None,
) -> dict:
    """Build a serialised TensorRT engine from an ONNX file and describe it.

    Args:
        onnx_path: the bundle's `image.onnx` / `text.onnx` / `fused.onnx` (any precision variant).
        engine_path: where to write the engine; `<engine_path>.json` gets the returned entry.
        batch: (min, opt, max) batch of the optimization profile; the other input dims come
            from the ONNX graph (they must be static).
        workspace_mib: builder workspace limit in MiB (see DEFAULT_WORKSPACE_MIB).
        timing_cache: a timing-cache file to reuse and update (rebuilds then skip tactic timing
            for layers seen before), or None.
        dla_core: run on this DLA core, falling back to the GPU for layers DLA cannot run; None
            for GPU only. DLA runs fp16/int8 only, so an fp32 graph falls back entirely. Jetson
            Orin Nano has no DLA.
        tf32: let fp32 convolutions/matmuls use TF32 tensor cores (Ampere and newer, Jetson Orin
            included). TensorRT turns it on by default; huse turns it off so an "fp32" engine
            computes in fp32 and matches onnxruntime to 1e-3. Use the fp16/int8 variants for speed.
        precision: the bundle precision of the graph; None reads it from the graph (needs onnx).
            `huse-export` runs the static compatibility check (huse.export.trt_compat) before
            calling this, so an incompatible graph fails with node names first.
    Returns:
        The manifest entry: {file, sha256, precision, tensorrt_version, gpu_name,
        compute_capability, profile: {input: {min, opt, max}}, dla_core}.
    Raises:
        HuseError: no GPU/TensorRT here, an incompatible graph, or a failed parse/build.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise HuseError(f"cannot build a TensorRT engine from {onnx_path}: no such file")
    b_min, b_opt, b_max = (int(b) for b in batch)
    if not 1 <= b_min <= b_opt <= b_max:
        raise HuseError(f"batch profile {tuple(batch)} asked for; it must be (min, opt, max) with 1 <= min <= opt <= max")
    supported, reason = engine_support()
    if not supported:
        raise HuseError(f"cannot build a TensorRT engine from {onnx_path}: {reason}")
    if precision is None:
        onnx = lazy_import("onnx", "export")
        precision = detect_precision(onnx.load(str(onnx_path), load_external_data=False))
    trt = importlib.import_module("tensorrt")
    _, _, gpu = gpu_status()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Required on 10.x for the ONNX types to decide precision; accepted and ignored on 11.x,
    # where every network is strongly typed.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weights resolve
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HuseError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    shapes: dict[str, dict[str, list[int]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise HuseError(
                f"input '{tensor.name}' of {onnx_path} has dynamic non-batch dims {tuple(tensor.shape)}; "
                "export with only the batch axis dynamic"
            )
        low, opt, high = (b_min, *rest), (b_opt, *rest), (b_max, *rest)
        profile.set_shape(tensor.name, low, opt, high)
        shapes[tensor.name] = {"min": list(low), "opt": list(opt), "max": list(high)}
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""  # empty: a new cache
        cache = config.create_timing_cache(blob)
        # ignore_mismatch=False: a cache from another GPU/TensorRT is refused, not mixed in;
        # then the build starts from an empty cache, which the build fills and we save.
        if config.set_timing_cache(cache, False) is False:  # C++ returns bool; never act on a None
            logger.log(trt.Logger.WARNING, f"timing cache {timing_cache} is from another GPU or TensorRT; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)

    if dla_core is not None:
        if not 0 <= dla_core < builder.num_DLA_cores:
            raise HuseError(
                f"DLA core {dla_core} was asked for; this device has {builder.num_DLA_cores} DLA core(s) "
                "(Jetson Orin Nano has none); pass dla_core=None to build for the GPU"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HuseError(
            f"TensorRT could not build an engine from {onnx_path} (see its log above); "
            f"a larger workspace_mib than {workspace_mib} may help"
        )
    data = memoryview(serialized)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(engine_path).unlink()  # an old description must never sit next to a new engine
    _write_atomic(engine_path, data)
    if cache is not None:  # the config's cache, as Polygraphy saves it: it holds what this build timed
        _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))

    entry = {
        "file": engine_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "precision": precision,
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "profile": shapes,
        "dla_core": dla_core,
    }
    _write_atomic(sidecar_path(engine_path), (json.dumps(entry, indent=2) + "\n").encode())
    return entry
