"""Making TensorRT engines: build from ONNX with Polygraphy's loaders, describe (sidecar), cache.

Networks are strongly typed, so precision comes from the ONNX graph (float16 tensors, Q/DQ pairs):
the only mode TensorRT 11 has and an opt-in on TensorRT 10 (JetPack 6), so one path builds on
both. An engine is tied to its TensorRT version and GPU; `<engine>.json` records both.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Mapping

from huse.runtime._lazy import lazy_import
from huse.runtime.backends.trt.gpu import TRT_EXTRA_HINT, gpu_status
from huse.runtime.files import sha256_file, write_atomic
from huse.runtime.errors import HuseError

__all__ = ["DEFAULT_WORKSPACE_MIB", "REBUILD_HINT", "build_engine", "engine_cache_path",
           "engine_support", "load_or_build", "read_sidecar", "sidecar_path"]

# Builder scratch memory (MemoryPoolType.WORKSPACE). Jetson Orin Nano 8 GB shares its memory
# between CPU and GPU; 1 GiB leaves room for the OS, the Python process and the engine itself,
# and the towers' tactics do not need more. Raise it on GPU servers for a wider tactic search.
DEFAULT_WORKSPACE_MIB = 1024
MIN_TRT_MAJOR = 10  # named-tensor API, execute_async_v3, strongly typed networks
REBUILD_HINT = ("rebuild the engine from the bundle's ONNX on this machine "
                "(huse.runtime.backends.trt.loader.build_engine, or load_or_build with an engine cache directory)")


def sidecar_path(engine_path: str | Path) -> Path:
    """Where an engine's JSON description lives: `<engine file>.json` next to it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict | None:
    """The manifest entry written next to an engine by `build_engine`, or None when there is none."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HuseError(f"engine description {path} is not valid JSON ({e}); delete it and {REBUILD_HINT}") from e


def engine_support() -> tuple[bool, str]:
    """Say whether an engine can be built here, and if not, why (never constructs a TensorRT object).

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
        return False, f"this TensorRT {version} has no builder or ONNX parser (a lean/dispatch runtime?); building needs the full TensorRT"
    if importlib.util.find_spec("polygraphy") is None:
        return False, "polygraphy is not installed; building engines needs `pip install 'huse-edge[export]'`"
    return True, f"TensorRT {version} on {info['name']} (compute capability {info['compute_capability']})"


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                 batch: tuple[int, int, int] = (1, 8, 64), workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: str | Path | None = None,
                 dla_core: int | None = None, tf32: bool = False) -> dict:
    """Build a serialised TensorRT engine from an ONNX file and describe it.

    Args:
        onnx_path: the bundle's image/text/fused ONNX (any precision variant).
        engine_path: where to write the engine; `<engine_path>.json` gets the returned entry.
        precision: the bundle precision the graph expresses ("fp32", "fp16", "int8"), for the entry.
        batch: (min, opt, max) batch of the optimization profile; other input dims must be static.
        workspace_mib: builder workspace limit in MiB.
        timing_cache: a timing-cache file to reuse and extend, or None.
        dla_core: this DLA core with GPU fallback, or None (Polygraphy's CreateConfig only does core 0).
        tf32: allow TF32 in fp32 layers; off so an "fp32" engine matches onnxruntime to 1e-3.
    Returns:
        The manifest entry: {file, sha256, precision, tensorrt_version, gpu_name,
        compute_capability, profile: {input: {min, opt, max}}, dla_core}.
    Raises:
        HuseError: no GPU/TensorRT/polygraphy here, or a failed parse/build.
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
    trt = importlib.import_module("tensorrt")
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig, Profile
    from polygraphy.exception import PolygraphyException

    try:  # parse_from_file, so external weights resolve; the parser's errors are logged above
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    except PolygraphyException as e:
        raise HuseError(f"TensorRT's ONNX parser rejected {onnx_path} (its errors are logged above): {e}") from None
    profile, shapes = Profile(), {}
    for tensor in (network.get_input(i) for i in range(network.num_inputs)):
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise HuseError(f"input '{tensor.name}' of {onnx_path} has dynamic non-batch dims {tuple(tensor.shape)}; "
                            "export with only the batch axis dynamic")
        low, opt, high = (b_min, *rest), (b_opt, *rest), (b_max, *rest)
        profile.add(tensor.name, low, opt, high)
        shapes[tensor.name] = {"min": list(low), "opt": list(opt), "max": list(high)}
    config = CreateConfig(tf32=tf32, profiles=[profile], load_timing_cache=str(timing_cache) if timing_cache else None,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20})
    if dla_core is not None:
        if not 0 <= dla_core < builder.num_DLA_cores:
            raise HuseError(f"DLA core {dla_core} was asked for; this device has {builder.num_DLA_cores} DLA core(s) "
                            "(Jetson Orin Nano has none); pass dla_core=None to build for the GPU")

        def on_dla(builder, network, config):
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(dla_core)
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

        config = PostprocessConfig(config, on_dla)
    if timing_cache:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    try:
        data = bytes(EngineBytesFromNetwork((builder, network, parser), config,
                                            save_timing_cache=str(timing_cache) if timing_cache else None)())
    except PolygraphyException as e:
        raise HuseError(f"TensorRT could not build an engine from {onnx_path} ({e}; see its log above); "
                        f"a larger workspace_mib than {workspace_mib} may help") from None
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(engine_path).unlink()  # an old description must never sit next to a new engine
    write_atomic(engine_path, data)
    _, _, gpu = gpu_status()
    entry = {"file": engine_path.name, "sha256": hashlib.sha256(data).hexdigest(), "precision": precision,
             "tensorrt_version": trt.__version__, "gpu_name": gpu.get("name"),
             "compute_capability": gpu.get("compute_capability"), "profile": shapes, "dla_core": dla_core}
    write_atomic(sidecar_path(engine_path), json.dumps(entry, indent=2) + "\n")
    return entry


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")[:40] or "x"


def engine_cache_path(cache_dir: str | Path, trt_version: str, gpu_name: str, compute_capability: str,
                      precision: str, profile: Mapping | tuple | list, *, onnx_sha256: str | None = None) -> Path:
    """Where the engine for one (model, TensorRT, GPU, precision, profile) combination is cached.

    An engine only runs on the TensorRT version and GPU it was built on, so both are in the key
    (as in onnxruntime's TensorRT EP cache), with the profile (`(min, opt, max)` or per input) and
    the ONNX file's sha256, so a changed model never reuses an engine.

    Returns:
        `cache_dir/<precision>_trt<version>_sm<cc>_<gpu>_<hash>.engine`: readable parts for
        people, a hash over every part for uniqueness.
    """
    key = json.dumps({"trt": str(trt_version), "gpu": str(gpu_name), "cc": str(compute_capability),
                      "precision": str(precision), "profile": profile, "onnx": onnx_sha256},
                     sort_keys=True, default=list)  # tuples and other sequences hash like lists
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cc = str(compute_capability).replace(".", "")
    return Path(cache_dir) / f"{_slug(precision)}_trt{_slug(trt_version)}_sm{_slug(cc)}_{_slug(gpu_name)}_{digest}.engine"


def load_or_build(onnx_path: str | Path, cache_dir: str | Path, *, precision: str,
                  batch: tuple[int, int, int] = (1, 8, 64), onnx_sha256: str | None = None, device: int = 0,
                  **build_kwargs) -> tuple[Path, dict]:
    """Return the cached engine for this machine, building it from the bundle's ONNX if needed.

    Args:
        onnx_path: the bundle's ONNX file for `precision` ("fp32", "fp16" or "int8").
        cache_dir: engine cache directory (created when building).
        batch: (min, opt, max) batch of the optimization profile.
        onnx_sha256: the ONNX file's sha256 when the manifest already has it (else computed).
        **build_kwargs: passed to `build_engine` (workspace_mib, timing_cache, dla_core, ...).
    Returns:
        (engine_path, manifest_entry) for `TrtRunner(engine_path, manifest_entry=entry)`.
    """
    trt = lazy_import("tensorrt", "trt")
    usable, reason, info = gpu_status(device)
    if not usable:
        raise HuseError(f"cannot load or build a TensorRT engine for {onnx_path}: {reason}")
    onnx_sha256 = onnx_sha256 or sha256_file(onnx_path)
    engine_path = engine_cache_path(cache_dir, trt.__version__, info["name"], info["compute_capability"], precision,
                                    tuple(batch), onnx_sha256=onnx_sha256)
    entry = read_sidecar(engine_path)
    # A hit needs the engine and its description, and they must agree (no half-written files).
    if engine_path.is_file() and entry and entry.get("sha256") == sha256_file(engine_path):
        return engine_path, entry
    os.makedirs(cache_dir, exist_ok=True)
    return engine_path, build_engine(onnx_path, engine_path, batch=tuple(batch), precision=precision, **build_kwargs)
