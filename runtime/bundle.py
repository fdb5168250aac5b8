"""Self-describing bundles: a folder of model files plus manifest.json.

The manifest holds everything the runtime needs (labels, hierarchy, preprocessing,
tokenizer, fusion weight, models per precision, engines, tool versions) and the sha256 of
every file. `load_manifest` refuses a bundle whose files are missing or changed, whose
manifest fails the schema, names a path outside the bundle or a file it does not hash, or
(with trusted keys) is unsigned or badly signed (runtime/signing.py). `check_graph` compares a
loaded graph with the manifest (labels, embedding width, visual width, input size) before it runs.

manifest["visual_dim"]: the width of image.onnx's third output `visual`, the visual-similarity
vector (export/graphs.py). Bundles exported before it have neither; `has_visual` tells them apart.

Layout of manifest["models"]: {precision: {graph: file}} with precision in fp32/fp16/int8 and
graph in image/text/fused. manifest["engines"]: a list of TensorRT engine entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from huse.runtime.errors import HuseError
from huse.runtime.files import MANIFEST, json_bytes, sha256_file
from huse.runtime.tokenizer import PAD_RULES, TOKEN_INPUTS

# Precisions whose graphs only onnxruntime's CPU kernels take (uint8 activations with zero points): never
# handed to TensorRT or a GPU provider.
CPU_ONLY_PRECISIONS = ("int8-cpu",)
EXPORT_FLAGS = ("fp16", "int8", "int8-cpu")  # the precisions huse-export adds beside fp32 (--fp16, ...)
FORMAT = "huse-bundle"
FORMAT_VERSION = 1


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are left out), for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_manifest(folder: str | Path, manifest: dict[str, Any], exclude: Sequence[str] = (),
                   sign_key: str | Path | None = None) -> dict[str, Any]:
    """Hash every file in `folder` (except the manifest, its signature and `exclude`) and write manifest.json.

    The manifest is replaced last and atomically, so a bundle is always either the old one or
    the new one. With `sign_key` the new manifest's signature is added to manifest.sig before the
    manifest is replaced (runtime/signing.py); without it a stale manifest.sig is removed after.

    Args:
        folder: the bundle directory.
        manifest: everything but "files"; it is filled in here.
        exclude: top-level names (files or folders) of `folder` to leave out, e.g. superseded
            precision folders that are deleted once the new manifest is in place.
        sign_key: an Ed25519 private key file (PEM) to sign the manifest with.
    Returns:
        The manifest as written.
    """
    from huse.runtime.signing import SIGNATURE, write_signed_manifest

    folder = Path(folder)
    skip = {MANIFEST, SIGNATURE, *exclude}
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel.split("/")[0] not in skip and not p.name.endswith(".tmp"):
            files[rel] = sha256_file(p)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    write_signed_manifest(folder, json_bytes(manifest), sign_key)
    return manifest


def bundle_path(folder: str | Path, name: Any, field: str) -> Path:
    """FOLDER/NAME for a path read from a manifest, refused unless it is relative and stays inside.

    Args:
        folder: the bundle directory.
        name: the manifest's value (must be a relative POSIX path string).
        field: where the value came from, e.g. "models.fp32.image", for the message.
    Raises:
        HuseError: naming the field and the value.
    """
    folder = Path(folder)
    why = None
    if not isinstance(name, str) or not name:
        why = "is not a file name"
    elif name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or Path(name).is_absolute():
        why = "is an absolute path"
    elif "\\" in name or any(part in ("..", "") for part in name.split("/")) or "\x00" in name:
        why = "leaves the bundle folder (.., backslash or empty part)"
    else:  # a symlink inside the bundle may still point outside it
        real, root = (folder / name).resolve(), folder.resolve()
        if real != root and root not in real.parents:
            why = "resolves (through a link) outside the bundle folder"
    if why:
        raise HuseError(f"bundle {folder}: manifest field {field} = {name!r} {why}; every path in a manifest must be "
                        "relative and inside the bundle. Refusing the bundle; re-export it")
    return folder / name


def referenced_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file the runtime may open, as {path in the bundle: manifest field}."""
    refs = {}
    for precision, graphs in manifest["models"].items():
        for graph, name in graphs.items():
            refs[name] = f"models.{precision}.{graph}"
    refs[manifest["tokenizer"]["vocab_file"]] = "tokenizer.vocab_file"
    for i, entry in enumerate(manifest.get("engines", [])):
        refs[entry["file"]] = f"engines[{i}].file"
    return refs


def labels_sha256(labels: list[str]) -> str:
    """Digest of the label list, in order; export writes it into every graph's ONNX metadata."""
    return hashlib.sha256(json.dumps(labels, ensure_ascii=False).encode("utf-8")).hexdigest()


# The ONNX metadata_props key export writes labels_sha256 under, so that an unsigned bundle whose
# manifest was relabelled (renamed or reordered classes) is still refused: the graph carries
# the label list it was trained with, and the graph itself is covered by its sha256.
LABELS_METADATA_KEY = "huse.labels_sha256"
GRAPH_NAMES = ("image", "text", "fused")


def _schema_error(path: Path, field: str, want: str, got: Any) -> HuseError:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return HuseError(f"{path}: manifest field {field} must be {want}, got {shown}; the bundle is damaged or was "
                     "edited by hand. Re-export it")


def validate_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Check the fields the runtime relies on, so a bad manifest fails here, naming the field,
    rather than as an IndexError or an onnxruntime traceback at the first classify."""
    def need(cond: bool, field: str, want: str, got: Any) -> None:
        if not cond:
            raise _schema_error(path, field, want, got)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    labels = manifest.get("labels")
    need(isinstance(labels, list) and len(labels) >= 1 and all(isinstance(l, str) and l for l in labels),
         "labels", "a non-empty list of non-empty strings", labels)
    need(len(set(labels)) == len(labels), "labels", "unique", sorted({l for l in labels if labels.count(l) > 1}))
    need(is_int(manifest.get("embedding_dim")) and manifest["embedding_dim"] > 0, "embedding_dim", "a positive integer",
         manifest.get("embedding_dim"))
    if "visual_dim" in manifest:
        need(is_int(manifest["visual_dim"]) and manifest["visual_dim"] > 0, "visual_dim", "a positive integer",
             manifest["visual_dim"])
    pre = manifest.get("preprocessing")
    need(isinstance(pre, dict), "preprocessing", "an object", pre)
    size = pre.get("size")
    need(isinstance(size, list) and len(size) == 2 and all(is_int(v) and 0 < v <= 4096 for v in size),
         "preprocessing.size", "[height, width] of positive integers", size)
    for key in ("mean", "std"):
        v = pre.get(key)
        need(isinstance(v, list) and len(v) == 3 and all(is_num(x) for x in v), f"preprocessing.{key}", "3 numbers", v)
    need(all(x != 0 for x in pre["std"]), "preprocessing.std", "non-zero", pre["std"])
    for key in ("max_pixels", "max_bytes"):
        if key in pre:
            need(is_int(pre[key]) and pre[key] > 0, f"preprocessing.{key}", "a positive integer", pre[key])
    tok = manifest.get("tokenizer")
    need(isinstance(tok, dict), "tokenizer", "an object", tok)
    need(isinstance(tok.get("vocab_file"), str), "tokenizer.vocab_file", "a file name", tok.get("vocab_file"))
    need(is_int(tok.get("max_len")) and tok["max_len"] > 0, "tokenizer.max_len", "a positive integer", tok.get("max_len"))
    need(tok.get("pad", "fixed") in PAD_RULES, "tokenizer.pad", f"one of {list(PAD_RULES)}", tok.get("pad"))
    if "pad_multiple" in tok:
        need(is_int(tok["pad_multiple"]) and tok["pad_multiple"] > 0, "tokenizer.pad_multiple", "a positive integer",
             tok["pad_multiple"])
    fusion = manifest.get("fusion")
    w = fusion.get("image_weight") if isinstance(fusion, dict) else None
    need(is_num(w) and 0 <= w <= 1, "fusion.image_weight", "a number in [0, 1]", w)
    temps = manifest.get("calibration", {}).get("temperature", {}) if isinstance(manifest.get("calibration", {}), dict) else None
    need(isinstance(temps, dict) and all(k in GRAPH_NAMES and is_num(t) and t > 0 for k, t in temps.items()),
         "calibration.temperature", f"an object {{mode: positive number}} with modes among {list(GRAPH_NAMES)}", temps)
    models = manifest.get("models")
    need(isinstance(models, dict) and models, "models", "an object {precision: {graph: file}}", models)
    for precision, graphs in models.items():
        need(isinstance(graphs, dict) and set(graphs) <= set(GRAPH_NAMES) and graphs, f"models.{precision}",
             f"an object with graphs among {list(GRAPH_NAMES)}", graphs)
    engines = manifest.get("engines", [])
    need(isinstance(engines, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in engines),
         "engines", "a list of objects with a file", engines)
    files = manifest.get("files")
    need(isinstance(files, dict) and all(isinstance(v, str) and len(v) == 64 for v in files.values()),
         "files", "an object {file: sha256}", files)


def load_manifest(folder: str | Path, verify: bool = True, trusted_keys: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Read, validate and (by default) verify a bundle's manifest.

    In order, each step refusing the bundle with a message naming the file or field: the
    signature of manifest.json's exact bytes (when `trusted_keys` are given); the schema;
    every path (models, tokenizer vocabulary, engines, files) relative and inside the bundle;
    every file the runtime may open listed in "files"; every listed file present with its sha256.

    Args:
        folder: the bundle directory.
        verify: check that every listed file exists and matches its sha256 (always on with trusted keys).
        trusted_keys: Ed25519 public key files (PEM); when given, an unsigned bundle or a bad
            signature is refused. None: unsigned bundles load.
    Returns:
        The manifest dict.
    Raises:
        HuseError: naming the missing or changed file, the bad field, or why the signature fails.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():  # huse-train's output
            raise HuseError(f"{folder} is a training run, not a bundle: export it first, `huse-export {folder} --out "
                            f"bundles/{folder.name}`, and use bundles/{folder.name}")
        raise HuseError(f"{folder} is not a huse bundle: {MANIFEST} is missing; create one with `huse-export RUN --out {folder}`")
    data = path.read_bytes()
    if trusted_keys:
        from huse.runtime.signing import verify_signature

        verify_signature(folder, data, trusted_keys)
        verify = True
    try:
        manifest = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise HuseError(f"{path} is not valid JSON ({e.msg}); re-export the bundle") from None
    except UnicodeDecodeError as e:  # a corrupted (binary) file: still one clear error
        raise HuseError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-export the bundle") from None
    if not isinstance(manifest, dict):
        raise HuseError(f"{path} holds a JSON {type(manifest).__name__}, not an object; re-export the bundle")
    if manifest.get("format") == "huse-index":  # index.FORMAT (the index module imports this one)
        raise HuseError(f"{folder} is a huse index, not a bundle; give the bundle it was built with "
                        f"({(manifest.get('bundle') or {}).get('path')})")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise HuseError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
                        f"{FORMAT!r} v{FORMAT_VERSION}; re-export the bundle with this huse-edge version")
    validate_manifest(manifest, path)
    files = manifest["files"]
    for name in files:
        bundle_path(folder, name, f"files[{name!r}]")
    for name, field in referenced_files(manifest).items():
        bundle_path(folder, name, field)
        if name not in files:  # an unlisted file could be swapped undetected
            raise HuseError(f"bundle {folder}: manifest field {field} = {name!r} is not listed in the manifest's files "
                            "(no sha256 to verify it against); refusing the bundle. Re-export it")
    if verify:
        from huse.runtime.stamps import sha256_matches  # each file version hashed once (runtime/stamps.py)

        for name, digest in files.items():
            f = folder / name
            if not f.is_file():
                raise HuseError(f"bundle {folder}: file {name} listed in the manifest is missing; re-export the bundle")
            if not sha256_matches(f, digest):
                raise HuseError(f"bundle {folder}: file {name} does not match its sha256 in the manifest "
                                "(changed or corrupted); refusing to load it. Re-export or restore the file")
    return manifest


def is_multi_label(manifest: dict[str, Any]) -> bool:
    """Whether the bundle's products carry several class paths (a sigmoid per class, runtime/labels.py)."""
    return manifest.get("task") == "multi-label"


def require_precision(manifest: dict[str, Any], bundle: str | Path, precision: str) -> None:
    """HuseError unless the bundle has graphs in `precision`, saying how to add them."""
    if precision not in manifest["models"]:
        how = (f"Create them with `huse-export {bundle} --{precision}`" if precision in EXPORT_FLAGS
               else f"huse-export can add {list(EXPORT_FLAGS)} (e.g. `huse-export {bundle} --fp16`)")
        raise HuseError(f"bundle {bundle} has no {precision!r} models; it has {sorted(manifest['models'])}. {how}")


def has_visual(manifest: dict[str, Any]) -> bool:
    """Whether the bundle's image graph has the `visual` output (exported by a version that writes it)."""
    return "visual_dim" in manifest


def require_visual(manifest: dict[str, Any], bundle: str | Path) -> int:
    """The bundle's visual width, or HuseError saying that the bundle predates visual vectors."""
    if not has_visual(manifest):
        raise HuseError(f"bundle {bundle} has no visual-similarity output (its image graph gives only the universal "
                        "embedding and logits: it was exported before visual vectors existed). Re-export it with this "
                        "huse-edge version (`huse-export RUN --out BUNDLE`) to search the visual space")
    return int(manifest["visual_dim"])


def check_labels_stamp(labels: list[str], metadata: dict[str, str], where: str) -> None:
    """Refuse labels that differ from the ones the graph was exported with (its LABELS_METADATA_KEY).

    Raises:
        HuseError: naming the manifest field and the graph file.
    """
    digest = metadata.get(LABELS_METADATA_KEY)
    if digest is not None and digest != labels_sha256(labels):
        raise HuseError(f"bundle manifest field labels = [{len(labels)} labels, sha256 {labels_sha256(labels)[:12]}...] "
                        f"does not match graph {where} (trained with labels of sha256 {digest[:12]}...: classes "
                        "renamed, reordered or replaced); the manifest was edited or belongs to another model. "
                        "Refusing it; re-export the bundle")


def proto_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def proto_fields(buf, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of a protobuf message: ints for varints, (start, end) spans
    for length-delimited fields (not copied: a graph field can be hundreds of MB)."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = proto_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = proto_varint(buf, pos)
        elif wire == 2:
            size, pos = proto_varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end")
        yield field, wire, value


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata_props without the onnx package: ModelProto field 14 holds
    StringStringEntryProto(key = 1, value = 2) entries (onnx/onnx.proto), read straight off the
    protobuf wire format of a memory-mapped file.

    Raises:
        HuseError: the file is not a readable ONNX model.
    """
    import mmap

    path = Path(path)
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                for field, wire, value in proto_fields(buf):
                    if field == 14 and wire == 2:
                        entry = {k: bytes(buf[v[0]:v[1]]).decode("utf-8") for k, w, v in proto_fields(buf, *value)
                                 if k in (1, 2) and w == 2}
                        out[entry.get(1, "")] = entry.get(2, "")
    except (OSError, ValueError) as e:
        raise HuseError(f"{path} is not a readable ONNX model ({e}); re-export the bundle") from None
    return out


def check_bundle_graphs(folder: str | Path, manifest: dict[str, Any]) -> int:
    """Check every ONNX graph's label stamp against the manifest's labels, without loading a
    backend (what `huse info` does after `load_manifest`). Returns the number of graphs checked.

    Raises:
        HuseError: a graph exported with other labels (the manifest was relabelled).
    """
    n = 0
    for precision, graphs in manifest["models"].items():
        for graph, name in graphs.items():
            if str(name).endswith(".onnx"):
                check_labels_stamp(manifest["labels"], read_onnx_metadata(Path(folder) / name), str(Path(folder) / name))
                n += 1
    return n


def check_graph(manifest: dict[str, Any], graph: str, inputs: dict[str, list], outputs: dict[str, list],
                metadata: dict[str, str], where: str) -> None:
    """Check one loaded graph against the manifest, before it runs anything.

    Args:
        manifest: the verified manifest.
        graph: "image", "text" or "fused".
        inputs, outputs: {tensor name: shape} as the backend reports them (None or a string
            for a dynamic axis).
        metadata: the graph's metadata_props (ONNX), e.g. from onnxruntime's model metadata.
        where: the file, for messages.
    Raises:
        HuseError: naming the manifest field that disagrees with the graph.
    """
    def fail(field: str, manifest_value: Any, graph_value: Any) -> None:
        raise HuseError(f"bundle manifest field {field} = {manifest_value} does not match graph {where} "
                        f"({graph_value}); the manifest was edited or belongs to another model. Refusing it; re-export the bundle")

    labels = manifest["labels"]
    check_labels_stamp(labels, metadata, where)
    width = len(labels)
    for name in ("logits", "probs", "image_logits", "text_logits"):
        shape = outputs.get(name)
        if shape and isinstance(shape[-1], int) and shape[-1] != width:
            fail("labels", f"[{width} labels]", f"output {name} has {shape[-1]} classes")
    dim = manifest["embedding_dim"]
    for name, shape in outputs.items():
        if "embedding" in name and shape and isinstance(shape[-1], int) and shape[-1] != dim:
            fail("embedding_dim", dim, f"output {name} has width {shape[-1]}")
    if graph == "image" and has_visual(manifest):
        shape = outputs.get("visual")
        if shape is None:
            fail("visual_dim", manifest["visual_dim"], f"it has no output 'visual', only {sorted(outputs)}")
        if shape and isinstance(shape[-1], int) and shape[-1] != manifest["visual_dim"]:
            fail("visual_dim", manifest["visual_dim"], f"output visual has width {shape[-1]}")
    shape = inputs.get("image")
    if shape and len(shape) == 4 and all(isinstance(v, int) for v in shape[2:]):
        if list(shape[2:]) != list(manifest["preprocessing"]["size"]):
            fail("preprocessing.size", manifest["preprocessing"]["size"], f"input image is {list(shape[2:])}")
    for name in TOKEN_INPUTS:
        shape = inputs.get(name)
        if shape and len(shape) == 2 and isinstance(shape[1], int):
            if manifest["tokenizer"].get("pad") == "longest":  # a batch's width varies: the graph must take any
                fail("tokenizer.pad", "longest", f"input {name} has the fixed length {shape[1]}")
            if shape[1] != manifest["tokenizer"]["max_len"]:
                fail("tokenizer.max_len", manifest["tokenizer"]["max_len"], f"input {name} has length {shape[1]}")
