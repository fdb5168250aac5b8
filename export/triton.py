"""A Triton Inference Server model repository from a bundle: `huse-export BUNDLE --triton REPO`.

    REPO/
      manifest.json        what is inside: the bundle's fingerprint, the models, the sha256 of every file
      huse/                classify: Python backend running the lean runtime on photo bytes and titles
        config.pbtxt         (max_batch_size, dynamic_batching, instance_group, parameters)
        1/model.py           the template in huse/export/triton_model/model.py
        1/bundle/            a verified copy of the bundle
      huse_embed/          embed: the same model.py with task=embed, reading ../huse/1/bundle
      image_fp32/ text_fp32/ fused_fp32/ image_fp16/ ...    onnxruntime_onnx: 1/model.onnx
      image_fp16_trt/ ...  tensorrt_plan: 1/model.plan, where the bundle has TensorRT engines

The ONNX and plan models take preprocessed tensors (the image as N x 3 x H x W floats, token ids),
for users whose own pipeline (an ensemble, a BLS model, a client) prepares them; `huse` and
`huse_embed` take what an application has, and speak the same tensors as `huse serve`. Input and
output names, types and dims are read from the graphs, not written by hand.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huse.runtime.bundle import CPU_ONLY_PRECISIONS, is_multi_label, load_manifest, package_versions
from huse.runtime.errors import HuseError
from huse.runtime.files import MANIFEST, check_replaceable, json_bytes, sha256_file, write_atomic

__all__ = ["TritonOptions", "write_repository", "verify_repository", "graph_io", "REPO_FORMAT"]

REPO_FORMAT = "huse-triton-repository"
TEMPLATE = Path(__file__).parent / "triton_model" / "model.py"
GRAPHS = ("image", "text", "fused")

# ONNX TensorProto element types -> Triton's model-config data types.
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
                 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                 16: "TYPE_BF16"}


@dataclass
class TritonOptions:
    max_batch: int = 64  # Triton's max_batch_size; the Classifier's batch size in the Python models
    max_delay_us: int = 3000  # dynamic batcher's max_queue_delay_microseconds (= huse serve's --max-delay-ms default)
    instances: int = 1  # instance_group count of every model
    precision: str = "fp32"  # what the Python models run (the ONNX/plan models cover every precision)
    force: bool = False

    def __post_init__(self):
        for flag, value, low in (("--triton-instances", self.instances, 1), ("--triton-delay-us", self.max_delay_us, 0),
                                 ("the max batch (--batch's MAX)", self.max_batch, 1)):
            if value < low:
                raise HuseError(f"{flag} must be at least {low}; got {value}")


@dataclass
class Tensor:
    name: str
    data_type: str
    dims: list[int]  # without the batch axis; -1 where dynamic


def graph_io(path: str | Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an ONNX graph as Triton sees them (the leading batch axis dropped).

    Args:
        path: the ONNX file.
    Returns:
        (inputs, outputs).
    Raises:
        HuseError: a type Triton has no name for, or a graph without a batch axis.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}

    def tensor(v) -> Tensor:
        t = v.type.tensor_type
        if t.elem_type not in _TRITON_TYPES:
            raise HuseError(f"{path}: tensor {v.name} has ONNX element type {t.elem_type}, which Triton has no "
                            "model-config type for; re-export the bundle")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims:
            raise HuseError(f"{path}: tensor {v.name} has no batch axis; re-export the bundle with this huse-edge version")
        return Tensor(v.name, _TRITON_TYPES[t.elem_type], dims[1:])

    return ([tensor(v) for v in graph.input if v.name not in initialisers], [tensor(v) for v in graph.output])


def _tensors(kind: str, tensors: list[Tensor], optional: bool = False) -> str:
    rows = []
    for t in tensors:
        extra = " optional: true" if optional else ""
        rows.append(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {", ".join(map(str, t.dims))} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _config(name: str, head: str, max_batch: int, inputs: list[Tensor], outputs: list[Tensor], opts: TritonOptions,
            kind: str, parameters: dict[str, str] | None = None, optional_inputs: bool = False) -> str:
    text = (f'name: "{name}"\n{head}\nmax_batch_size: {max_batch}\n' + _tensors("input", inputs, optional_inputs)
            + _tensors("output", outputs)
            + f"dynamic_batching {{ max_queue_delay_microseconds: {opts.max_delay_us} }}\n"
            + f"instance_group [ {{ count: {opts.instances} kind: {kind} }} ]\n")
    for key, value in (parameters or {}).items():
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    return text


def _python_configs(manifest: dict[str, Any], opts: TritonOptions) -> dict[str, str]:
    """config.pbtxt of `huse` and `huse_embed`: the tensors `huse serve` speaks (the protocol contract)."""
    depth = int(manifest["hierarchy"]["depth"])
    inputs = [Tensor("image", "TYPE_STRING", [1]), Tensor("title", "TYPE_STRING", [1])]
    classify = [Tensor("top_k_labels", "TYPE_STRING", [-1]), Tensor("top_k_scores", "TYPE_FP32", [-1]),
                Tensor("path_labels", "TYPE_STRING", [depth]), Tensor("path_scores", "TYPE_FP32", [depth]),
                Tensor("mode", "TYPE_STRING", [1]), Tensor("needs_review", "TYPE_BOOL", [1]),
                Tensor("error", "TYPE_STRING", [1]), Tensor("warning", "TYPE_STRING", [1])]
    if is_multi_label(manifest):  # each item's label set as JSON (huse.runtime.serve.protocol.classify_tensors)
        classify.append(Tensor("labels", "TYPE_STRING", [1]))
    embed = [Tensor("embedding", "TYPE_FP32", [int(manifest["embedding_dim"])]), Tensor("error", "TYPE_STRING", [1])]
    # The Python models pick their own device (TensorRT, else onnxruntime CUDA, else CPU: `huse doctor`);
    # KIND_CPU only tells Triton not to pin them to a GPU.
    head = 'backend: "python"'
    common = {"precision": opts.precision, "min_confidence": "0"}
    return {
        "huse": _config("huse", head, opts.max_batch, inputs, classify, opts, "KIND_CPU",
                        {"task": "classify", "bundle": "1/bundle", **common}, optional_inputs=True),
        "huse_embed": _config("huse_embed", head, opts.max_batch, inputs, embed, opts, "KIND_CPU",
                              {"task": "embed", "bundle": "../huse/1/bundle", **common}, optional_inputs=True),
    }


def write_repository(bundle: str | Path, repo: str | Path, opts: TritonOptions | None = None) -> dict[str, Any]:
    """Write a Triton model repository for a verified bundle.

    Args:
        bundle: the bundle directory (verified against its manifest first).
        repo: the repository directory to create; built in REPO.partial and renamed when complete.
        opts: batching, instances, the Python models' precision, --force.
    Returns:
        The repository's manifest.
    Raises:
        HuseError: the bundle does not verify, lacks the precision, or REPO exists without force.
    """
    opts = opts or TritonOptions()
    bundle, repo = Path(bundle), Path(repo)
    manifest = load_manifest(bundle)
    if opts.precision not in manifest["models"]:
        raise HuseError(f"--triton-precision {opts.precision} asked for; bundle {bundle} has {sorted(manifest['models'])}")
    if repo.exists() and not opts.force:
        raise HuseError(f"{repo} exists; pass --force to replace it, or write the repository into a new folder")
    check_replaceable(repo, REPO_FORMAT, "Triton repository written by huse-export", "--force")
    tmp = repo.with_name(repo.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    models: dict[str, dict[str, Any]] = {}

    def add(name: str, config: str, files: dict[str, Path], **info) -> None:
        (tmp / name / "1").mkdir(parents=True)
        write_atomic(tmp / name / "config.pbtxt", config)
        for dest, src in files.items():
            shutil.copy2(src, tmp / name / "1" / dest)
        models[name] = info

    try:
        for precision, graphs in manifest["models"].items():
            # Triton's onnxruntime backend runs on the GPU where there is one; int8-cpu's uint8 graphs only on CPUs.
            kind = "KIND_CPU" if precision in CPU_ONLY_PRECISIONS else "KIND_AUTO"
            for graph, file in graphs.items():
                name = f"{graph}_{precision.replace('-', '_')}"
                inputs, outputs = graph_io(bundle / file)
                add(name, _config(name, 'platform: "onnxruntime_onnx"', opts.max_batch, inputs, outputs, opts, kind),
                    {"model.onnx": bundle / file}, platform="onnxruntime_onnx", graph=graph, precision=precision,
                    source=file)
        for engine in manifest.get("engines", []):
            graph, precision = engine.get("graph"), engine.get("precision")
            if graph not in GRAPHS or precision not in manifest["models"]:
                continue
            profile_max = min(int(p["max"][0]) for p in engine.get("profile", {}).values()) if engine.get("profile") \
                else opts.max_batch
            name = f"{graph}_{precision}_trt"
            # An engine's tensors are its ONNX graph's (TensorRT keeps the names; fp16 graphs keep float32 IO).
            inputs, outputs = graph_io(bundle / manifest["models"][precision][graph])
            add(name, _config(name, 'platform: "tensorrt_plan"', min(opts.max_batch, profile_max), inputs, outputs, opts,
                              "KIND_GPU"), {"model.plan": bundle / engine["file"]}, platform="tensorrt_plan",
                graph=graph, precision=precision, source=engine["file"],
                tensorrt_version=engine.get("tensorrt_version"), gpu_name=engine.get("gpu_name"))
        configs = _python_configs(manifest, opts)
        add("huse", configs["huse"], {"model.py": TEMPLATE}, backend="python", task="classify", precision=opts.precision)
        shutil.copytree(bundle, tmp / "huse" / "1" / "bundle")
        add("huse_embed", configs["huse_embed"], {"model.py": TEMPLATE}, backend="python", task="embed",
            precision=opts.precision)
        load_manifest(tmp / "huse" / "1" / "bundle")  # the copy is the bundle, byte for byte
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        repo_manifest = {
            "format": REPO_FORMAT, "format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "bundle": {"path": str(bundle.resolve()), "manifest_sha256": sha256_file(bundle / MANIFEST)},
            "options": {"max_batch_size": opts.max_batch, "max_queue_delay_microseconds": opts.max_delay_us,
                        "instances": opts.instances, "python_precision": opts.precision},
            "models": models,
            "versions": package_versions("huse-edge", "onnx"),
            "files": files,
        }
        write_atomic(tmp / MANIFEST, json_bytes(repo_manifest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if repo.exists():
        shutil.rmtree(repo)
    tmp.rename(repo)
    return repo_manifest


def verify_repository(repo: str | Path) -> dict[str, Any]:
    """Check a repository against its manifest: every listed file present with its sha256, nothing unlisted.

    Args:
        repo: the repository directory.
    Returns:
        Its manifest.
    Raises:
        HuseError: naming the missing, changed or unlisted file.
    """
    import json

    repo = Path(repo)
    path = repo / MANIFEST
    if not path.is_file():
        raise HuseError(f"{repo} is not a huse Triton repository: {MANIFEST} is missing; write one with "
                        "`huse-export BUNDLE --triton REPO`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != REPO_FORMAT:
        raise HuseError(f"{path}: format {manifest.get('format')!r} is not {REPO_FORMAT!r}")
    for name, digest in manifest["files"].items():
        f = repo / name
        if not f.is_file():
            raise HuseError(f"Triton repository {repo}: file {name} is missing; write the repository again")
        if sha256_file(f) != digest:
            raise HuseError(f"Triton repository {repo}: file {name} does not match its sha256 in {MANIFEST} "
                            "(changed or corrupted); write the repository again")
    # Python writes __pycache__ next to model.py when Triton loads it: not a change to the repository.
    extra = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")
                   if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
                   and p.relative_to(repo).as_posix() not in manifest["files"])
    if extra:
        raise HuseError(f"Triton repository {repo}: {extra[0]} is not listed in {MANIFEST} (added after it was "
                        f"written{f', with {len(extra) - 1} more' if len(extra) > 1 else ''}); remove it or write the "
                        "repository again")
    return manifest
