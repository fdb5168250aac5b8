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

from huse.runtime.backends.trt.gpu import TRT_EXTRA_HINT, Cuda, gpu_status, import_tensorrt
from huse.runtime.files import sha256_file, write_atomic
from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import TOKEN_INPUTS

__all__ = ["DEFAULT_BATCH", "DEFAULT_WORKSPACE_MIB", "DLA_PRECISIONS", "MIN_POLYGRAPHY", "REBUILD_HINT", "build_engine",
           "check_dla", "dla_batch", "dla_in_tensorrt", "engine_cache_path", "engine_support", "load_or_build", "profile_shapes",
           "read_sidecar", "sidecar_path", "token_range"]

# Builder scratch memory (MemoryPoolType.WORKSPACE). Jetson Orin Nano 8 GB shares its memory
# between CPU and GPU; 1 GiB leaves room for the OS, the Python process and the engine itself,
# and the towers' tactics do not need more. Raise it on GPU servers for a wider tactic search.
DEFAULT_WORKSPACE_MIB = 1024
DEFAULT_BATCH = (1, 8, 64)  # optimisation profile (min, opt, max): one request up to a bulk batch
MIN_TRT_MAJOR = 10  # named-tensor API, execute_async_v3, strongly typed networks
# Polygraphy 0.49.x reads layer.precision_is_set (and 0.49.0-0.49.5 set EXPLICIT_BATCH), which TensorRT 11 removed.
MIN_POLYGRAPHY = (0, 50, 3)
# DLA runs FP16 and INT8 only, and has no dynamic dimensions (profile min = opt = max).
DLA_PRECISIONS = ("fp16", "int8")
DLA_DOCS = ("DLA is in TensorRT 10.0-10.7 (JetPack 6) and 11.4.1+ (JetPack 7.2.2+, AGX Orin), not in 10.8-11.4.0 "
            "(NVIDIA's 'Working with DLA'); Jetson Orin Nano and Thor have no DLA")
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


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def engine_support(device: int = 0) -> tuple[bool, str]:
    """Say whether an engine can be built here, and if not, why (never constructs a TensorRT object).

    Args:
        device: the CUDA device the engine is for.
    Returns:
        (supported, reason): the reason names what is missing and how to get it.
    """
    usable, reason, info = gpu_status(device)
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
    polygraphy = importlib.import_module("polygraphy").__version__
    if _version_tuple(polygraphy) < MIN_POLYGRAPHY:
        return False, (f"polygraphy {polygraphy} is installed; building engines needs polygraphy >= "
                       f"{'.'.join(map(str, MIN_POLYGRAPHY))} (older ones crash on TensorRT 11): pip install "
                       "'huse-edge[export]'")
    return True, f"TensorRT {version} on {info['name']} (compute capability {info['compute_capability']})"


def _api_mismatch(trt, error: AttributeError) -> HuseError:
    """Polygraphy before 0.50.3 reaches for TensorRT APIs that 11.0 removed (layer.precision_is_set,
    NetworkDefinitionCreationFlag.EXPLICIT_BATCH): name both versions instead of a traceback."""
    polygraphy = importlib.import_module("polygraphy").__version__
    return HuseError(f"polygraphy {polygraphy} called a TensorRT API that TensorRT {trt.__version__} does not have "
                     f"({error}); huse needs polygraphy >= {'.'.join(map(str, MIN_POLYGRAPHY))} with TensorRT 11: "
                     "pip install -U 'huse-edge[export]'")


def dla_in_tensorrt(version: str) -> bool:
    """Whether TensorRT `version` has DLA at all on Linux (10.0-10.7, and 11.4.1 on; see DLA_DOCS)."""
    v = _version_tuple(version)
    return (10, 0) <= v[:2] <= (10, 7) or v >= (11, 4, 1)


def dla_batch(batch: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The fixed batch a DLA engine is built for: `batch` when min = opt = max, else a HuseError.

    Args:
        batch: (min, opt, max); None picks the default profile's opt batch (8:8:8).
    """
    if batch is None:
        return (DEFAULT_BATCH[1],) * 3
    if len(set(batch)) != 1:
        b = ":".join(map(str, batch))
        raise HuseError(f"DLA was asked for with the batch profile {b}; DLA has no dynamic dimensions, so its engine "
                        f"takes one fixed batch: pass --batch N:N:N (e.g. --batch {batch[1]}:{batch[1]}:{batch[1]})")
    return tuple(int(b) for b in batch)


def check_dla(dla_core: int | None, precisions, batch: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """Refuse a DLA request DLA cannot run, before anything is built (one copy of the rule).

    Args:
        dla_core: the DLA core asked for, or None (no DLA: nothing to check).
        precisions: the precisions engines would be built for ("fp32", "fp16", "int8").
        batch: the (min, opt, max) batch asked for, or None for the default.
    Returns:
        The fixed batch to build with (`dla_batch`), or `batch` unchanged without DLA.
    Raises:
        HuseError: a negative core, a dynamic batch range, or no FP16/INT8 precision to build.
    """
    if dla_core is None:
        return batch
    if int(dla_core) < 0:
        raise HuseError(f"DLA core {dla_core} was asked for; DLA cores are numbered from 0 (AGX Orin: 0 and 1)")
    if not set(precisions) & set(DLA_PRECISIONS):
        found = ", ".join(sorted(precisions)) or "none"
        raise HuseError(f"DLA core {dla_core} was asked for, but DLA runs FP16 or INT8 only and this export has "
                        f"{found}: add --fp16 or --int8 (FP32 engines are built for the GPU)")
    return dla_batch(batch)


def token_range(manifest: Mapping) -> tuple[int, int, int] | None:
    """The title-length range (min, opt, max) of an engine's profile, or None for fixed-length graphs.

    A bundle whose tokenizer pads a batch to its longest title (MiniLM's "pad": "longest") feeds widths
    from one multiple of `pad_multiple` up to max_len; opt is max_len, the width the kernels are tuned for.
    """
    tok = manifest.get("tokenizer", {})
    if tok.get("pad") != "longest":
        return None
    top = int(tok["max_len"])
    return min(int(tok.get("pad_multiple", 8)), top), top, top


def profile_shapes(inputs, batch: tuple[int, int, int], source: str | Path = "the graph",
                   tokens: tuple[int, int, int] | None = None) -> dict[str, dict]:
    """The optimisation profile: the batch range on every input whose dim 0 is dynamic, and the title
    length range on a token input's dim 1 when it is dynamic (IOptimizationProfile.set_shape's min/opt/max).

    Args:
        inputs: (name, shape) of each network input; -1 marks a dynamic dimension.
        batch: (min, opt, max).
        source: the ONNX file, for the error.
        tokens: (min, opt, max) title length (`token_range`), or None: no dynamic length allowed.
    Returns:
        {input: {"min": [...], "opt": [...], "max": [...]}}; fully static inputs need no entry.
    Raises:
        HuseError: any other dynamic dimension.
    """
    shapes = {}
    for name, shape in inputs:
        shape = tuple(int(d) for d in shape)
        if not any(d < 0 for d in shape):
            continue
        ranges = {k: list(shape) for k in ("min", "opt", "max")}
        for i, d in enumerate(shape):
            if d >= 0:
                continue
            if i == 0:
                values = batch
            elif i == 1 and name in TOKEN_INPUTS and tokens is not None:
                values = tokens
            else:
                raise HuseError(f"input '{name}' of {source} has dynamic non-batch dims {shape}; "
                                "export with only the batch axis dynamic (and a MiniLM title length, whose range "
                                "the bundle's tokenizer spec gives)")
            for k, v in zip(("min", "opt", "max"), values):
                ranges[k][i] = int(v)
        shapes[name] = ranges
    return shapes


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                 batch: tuple[int, int, int] = DEFAULT_BATCH, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                 timing_cache: str | Path | None = None, dla_core: int | None = None, tf32: bool = False, device: int = 0,
                 tokens: tuple[int, int, int] | None = None) -> dict:
    """Build a serialised TensorRT engine from an ONNX file and describe it.

    Args:
        onnx_path: the bundle's image/text/fused ONNX (any precision variant).
        engine_path: where to write the engine; `<engine_path>.json` gets the returned entry.
        precision: the bundle precision the graph expresses ("fp32", "fp16", "int8"), for the entry.
        batch: (min, opt, max) batch of the optimization profile; other input dims must be static.
            With `dla_core` it must be fixed (min = opt = max).
        workspace_mib: builder workspace limit in MiB.
        timing_cache: a timing-cache file to reuse and extend, or None.
        dla_core: this DLA core with GPU fallback, or None; FP16/INT8 graphs only.
        tf32: allow TF32 in fp32 layers; off so an "fp32" engine matches onnxruntime to 1e-3.
        device: the CUDA device to build on (engines are tied to its GPU architecture).
        tokens: (min, opt, max) title length for graphs with a dynamic length axis (`token_range` of
            the bundle's manifest); None: every dim but the batch must be static.
    Returns:
        The manifest entry: {file, sha256, precision, tensorrt_version, gpu_name, compute_capability,
        profile: {input: {min, opt, max}}, dla_core, tf32, workspace_mib} and, for DLA,
        dla_layers / gpu_layers (network layers the DLA accepts; the rest fall back to the GPU).
    Raises:
        HuseError: no GPU/TensorRT/polygraphy here, a DLA request DLA cannot run, or a failed parse/build.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise HuseError(f"cannot build a TensorRT engine from {onnx_path}: no such file")
    b_min, b_opt, b_max = (int(b) for b in batch)
    if not 1 <= b_min <= b_opt <= b_max:
        raise HuseError(f"batch profile {tuple(batch)} asked for; it must be (min, opt, max) with 1 <= min <= opt <= max")
    check_dla(dla_core, [precision], (b_min, b_opt, b_max))
    supported, reason = engine_support(device)
    if not supported:
        raise HuseError(f"cannot build a TensorRT engine from {onnx_path}: {reason}")
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig, Profile
    from polygraphy.exception import PolygraphyException

    Cuda(device).bind()  # the builder times and builds on the calling thread's current device
    try:  # parse_from_file, so external weights resolve; the parser's errors are logged above
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    except AttributeError as e:
        raise _api_mismatch(trt, e) from None
    except PolygraphyException as e:
        raise HuseError(f"TensorRT's ONNX parser rejected {onnx_path} (its errors are logged above): {e}") from None
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = profile_shapes([(t.name, tuple(t.shape)) for t in inputs], (b_min, b_opt, b_max), onnx_path, tokens)
    if dla_core is not None and tokens is not None and any(
            shapes[n]["min"] != shapes[n]["max"] for n in shapes if n in TOKEN_INPUTS):
        raise HuseError(f"DLA core {dla_core} was asked for {onnx_path}, whose title length is dynamic; DLA has no "
                        "dynamic dimensions: build this graph for the GPU (dla_core=None)")
    profile = Profile()
    for name, s in shapes.items():
        profile.add(name, s["min"], s["opt"], s["max"])
    config = CreateConfig(tf32=tf32, profiles=[profile], load_timing_cache=str(timing_cache) if timing_cache else None,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20})
    placement: dict = {}
    if dla_core is not None:
        if not 0 <= dla_core < builder.num_DLA_cores:
            why = "" if dla_in_tensorrt(trt.__version__) else f"; TensorRT {trt.__version__} has no DLA support"
            raise HuseError(f"DLA core {dla_core} was asked for; this device has {builder.num_DLA_cores} DLA core(s)"
                            f"{why} ({DLA_DOCS}); pass dla_core=None to build for the GPU")

        def on_dla(builder, network, config):
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(dla_core)
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            # What the DLA takes of this network; GPU fallback runs the rest (TensorRT only warns).
            layers = [network.get_layer(i) for i in range(network.num_layers)]
            placement["dla_layers"] = sum(bool(config.can_run_on_DLA(layer)) for layer in layers)
            placement["gpu_layers"] = len(layers) - placement["dla_layers"]

        config = PostprocessConfig(config, on_dla)
    if timing_cache:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    try:
        data = bytes(EngineBytesFromNetwork((builder, network, parser), config,
                                            save_timing_cache=str(timing_cache) if timing_cache else None)())
    except AttributeError as e:
        raise _api_mismatch(trt, e) from None
    except PolygraphyException as e:
        raise HuseError(f"TensorRT could not build an engine from {onnx_path} ({e}; see its log above); "
                        f"a larger workspace_mib than {workspace_mib} may help") from None
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(engine_path).unlink()  # an old description must never sit next to a new engine
    write_atomic(engine_path, data)
    _, _, gpu = gpu_status(device)
    entry = {"file": engine_path.name, "sha256": hashlib.sha256(data).hexdigest(), "precision": precision,
             "tensorrt_version": trt.__version__, "gpu_name": gpu.get("name"),
             "compute_capability": gpu.get("compute_capability"), "profile": shapes, "dla_core": dla_core,
             "tf32": bool(tf32), "workspace_mib": int(workspace_mib), **placement}
    write_atomic(sidecar_path(engine_path), json.dumps(entry, indent=2) + "\n")
    return entry


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")[:40] or "x"


def engine_cache_path(cache_dir: str | Path, trt_version: str, gpu_name: str, compute_capability: str,
                      precision: str, profile: Mapping | tuple | list, *, onnx_sha256: str | None = None,
                      dla_core: int | None = None, tf32: bool = False,
                      workspace_mib: int = DEFAULT_WORKSPACE_MIB) -> Path:
    """Where the engine for one combination of model and build options is cached.

    Every option that changes the engine is in the key: an engine only runs on the TensorRT
    version and GPU it was built on (as in onnxruntime's TensorRT EP cache); the precision, the
    profile (`(min, opt, max)` or per input), the DLA core, TF32 and the workspace change what is
    built; the ONNX file's sha256 means a changed model never reuses an engine.

    Returns:
        `cache_dir/<precision>[_dla<core>]_trt<version>_sm<cc>_<gpu>_<hash>.engine`: readable parts
        for people, a hash over every part for uniqueness.
    """
    key = json.dumps({"trt": str(trt_version), "gpu": str(gpu_name), "cc": str(compute_capability),
                      "precision": str(precision), "profile": profile, "onnx": onnx_sha256,
                      "dla_core": None if dla_core is None else int(dla_core), "tf32": bool(tf32),
                      "workspace_mib": int(workspace_mib)},
                     sort_keys=True, default=list)  # tuples and other sequences hash like lists
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cc = str(compute_capability).replace(".", "")
    dla = "" if dla_core is None else f"_dla{int(dla_core)}"
    return Path(cache_dir) / f"{_slug(precision)}{dla}_trt{_slug(trt_version)}_sm{_slug(cc)}_{_slug(gpu_name)}_{digest}.engine"


def load_or_build(onnx_path: str | Path, cache_dir: str | Path, *, precision: str,
                  batch: tuple[int, int, int] = DEFAULT_BATCH, onnx_sha256: str | None = None, device: int = 0,
                  dla_core: int | None = None, tf32: bool = False, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                  timing_cache: str | Path | None = None,
                  tokens: tuple[int, int, int] | None = None) -> tuple[Path, dict]:
    """Return the cached engine for this machine, building it from the bundle's ONNX if needed.

    Args:
        onnx_path: the bundle's ONNX file for `precision` ("fp32", "fp16" or "int8").
        cache_dir: engine cache directory (created when building).
        batch: (min, opt, max) batch of the optimization profile.
        onnx_sha256: the ONNX file's sha256 when the manifest already has it (else computed).
        device: the CUDA device the engine is for: its GPU is part of the key.
        dla_core, tf32, workspace_mib, timing_cache, tokens: as in `build_engine` (all but the timing
            cache are part of the key).
    Returns:
        (engine_path, manifest_entry) for `TrtRunner(engine_path, manifest_entry=entry, device=device)`.
    """
    trt = import_tensorrt()
    usable, reason, info = gpu_status(device)
    if not usable:
        raise HuseError(f"cannot load or build a TensorRT engine for {onnx_path}: {reason}")
    onnx_sha256 = onnx_sha256 or sha256_file(onnx_path)
    engine_path = engine_cache_path(cache_dir, trt.__version__, info["name"], info["compute_capability"], precision,
                                    # fixed-length graphs keep their old keys (and cached engines)
                                    tuple(batch) if tokens is None else {"batch": tuple(batch), "tokens": tuple(tokens)},
                                    onnx_sha256=onnx_sha256, dla_core=dla_core, tf32=tf32,
                                    workspace_mib=workspace_mib)
    entry = read_sidecar(engine_path)
    # A hit needs the engine and its description, and they must agree (no half-written files).
    if engine_path.is_file() and entry and entry.get("sha256") == sha256_file(engine_path):
        return engine_path, entry
    os.makedirs(cache_dir, exist_ok=True)
    return engine_path, build_engine(onnx_path, engine_path, batch=tuple(batch), precision=precision, device=device,
                                     dla_core=dla_core, tf32=tf32, workspace_mib=workspace_mib,
                                     timing_cache=timing_cache, tokens=tokens)
