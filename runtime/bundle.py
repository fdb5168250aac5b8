"""Self-describing bundles: a folder of model files plus manifest.json.

The manifest holds everything the runtime needs (labels, hierarchy, preprocessing,
tokenizer, fusion weight, models per precision, engines, tool versions) and the sha256 of
every file. `load_manifest` refuses a bundle whose files are missing or changed.

Layout of manifest["models"]: {precision: {graph: file}} with precision in fp32/fp16/int8 and
graph in image/text/fused. manifest["engines"]: a list of TensorRT engine entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from huse.runtime.errors import HuseError

MANIFEST = "manifest.json"
# Precisions whose graphs only onnxruntime's CPU kernels take (uint8 activations with zero points): never
# handed to TensorRT or a GPU provider.
CPU_ONLY_PRECISIONS = ("int8-cpu",)
FORMAT = "huse-bundle"
FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that a reader never sees half of it (write next to it, fsync, rename).

    Args:
        path: the target file.
        data: bytes, or text (written as UTF-8).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (`write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `folder` (except the manifest) and write manifest.json.

    Args:
        folder: the bundle directory.
        manifest: everything but "files"; it is filled in here.
    Returns:
        The manifest as written.
    """
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def load_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and (by default) verify a bundle's manifest.

    Args:
        folder: the bundle directory.
        verify: check that every listed file exists and matches its sha256.
    Returns:
        The manifest dict.
    Raises:
        HuseError: naming the missing or changed file.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise HuseError(f"{folder} is not a huse bundle: {MANIFEST} is missing; create one with `huse-export RUN --out {folder}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HuseError(f"{path} is not valid JSON ({e.msg}); re-export the bundle") from None
    except UnicodeDecodeError as e:  # a corrupted (binary) file: still one clear error
        raise HuseError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-export the bundle") from None
    if not isinstance(manifest, dict):
        raise HuseError(f"{path} holds a JSON {type(manifest).__name__}, not an object; re-export the bundle")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise HuseError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
                        f"{FORMAT!r} v{FORMAT_VERSION}; re-export the bundle with this huse-edge version")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            f = folder / name
            if not f.is_file():
                raise HuseError(f"bundle {folder}: file {name} listed in the manifest is missing; re-export the bundle")
            if sha256_file(f) != digest:
                raise HuseError(f"bundle {folder}: file {name} does not match its sha256 in the manifest "
                                "(changed or corrupted); refusing to load it. Re-export or restore the file")
    return manifest
