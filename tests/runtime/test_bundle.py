"""Bundle manifests: every file hashed, a changed or missing file refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from huse.runtime.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    load_manifest,
    sha256_file,
    write_json_atomic,
    write_manifest,
)
from huse.runtime.errors import HuseError


@pytest.fixture
def bundle(tmp_path):
    folder = tmp_path / "bundle"
    (folder / "fp32").mkdir(parents=True)
    (folder / "engines" / "orin").mkdir(parents=True)
    (folder / "vocab.json").write_text('["red", "shirt"]')
    (folder / "fp32" / "fused.onnx").write_bytes(bytes(range(256)) * 10)
    (folder / "engines" / "orin" / "fused.plan").write_bytes(b"\x00engine")
    write_manifest(folder, _fields())
    return folder


def _fields(**change):
    """The manifest fields the runtime relies on (what export writes), with `change` applied."""
    m = {"labels": ["a<b", "c"], "embedding_dim": 8,
         "preprocessing": {"size": [4, 4], "mean": [0.5] * 3, "std": [0.5] * 3},
         "tokenizer": {"type": "word", "vocab_file": "vocab.json", "max_len": 4},
         "fusion": {"image_weight": 0.5}, "models": {"fp32": {"fused": "fp32/fused.onnx"}},
         "engines": [{"file": "engines/orin/fused.plan", "graph": "fused", "precision": "fp32"}]}
    m.update(change)
    return m


def test_write_manifest_hashes_every_file_including_nested(bundle):
    m = json.loads((bundle / MANIFEST).read_text())
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert m["labels"] == ["a<b", "c"]
    assert set(m["files"]) == {"vocab.json", "fp32/fused.onnx", "engines/orin/fused.plan"}
    for name, digest in m["files"].items():
        assert digest == hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    assert m["files"]["engines/orin/fused.plan"] == hashlib.sha256(b"\x00engine").hexdigest()


def test_write_manifest_returns_what_it_wrote(bundle):
    returned = write_manifest(bundle, _fields(labels=["x"]))
    assert returned == json.loads((bundle / MANIFEST).read_text())
    assert MANIFEST not in returned["files"]  # the manifest does not hash itself


def test_load_manifest_verifies_an_intact_bundle(bundle):
    m = load_manifest(bundle)
    assert m == json.loads((bundle / MANIFEST).read_text())
    assert m["models"] == {"fp32": {"fused": "fp32/fused.onnx"}}


def test_changed_byte_is_refused_naming_the_file(bundle):
    f = bundle / "fp32" / "fused.onnx"
    data = bytearray(f.read_bytes())
    data[1234] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(HuseError) as e:
        load_manifest(bundle)
    msg = str(e.value)
    assert "fp32/fused.onnx" in msg
    assert "sha256" in msg
    assert "Re-export or restore the file" in msg


def test_changed_file_loads_without_verify(bundle):
    (bundle / "vocab.json").write_text('["changed"]')
    assert load_manifest(bundle, verify=False)["labels"] == ["a<b", "c"]
    with pytest.raises(HuseError, match="vocab.json"):
        load_manifest(bundle)


def test_deleted_file_is_refused_naming_it(bundle):
    (bundle / "engines" / "orin" / "fused.plan").unlink()
    with pytest.raises(HuseError) as e:
        load_manifest(bundle)
    msg = str(e.value)
    assert "engines/orin/fused.plan" in msg
    assert "missing" in msg


def test_missing_manifest_says_how_to_create_one(tmp_path):
    with pytest.raises(HuseError) as e:
        load_manifest(tmp_path)
    msg = str(e.value)
    assert f"{MANIFEST} is missing" in msg
    assert f"huse-export RUN --out {tmp_path}" in msg


@pytest.mark.parametrize("change", [{"format_version": FORMAT_VERSION + 1}, {"format": "other-bundle"},
                                    {"format_version": None}],
                         ids=["newer-version", "other-format", "no-version"])
def test_wrong_format_or_version_is_refused(bundle, change):
    path = bundle / MANIFEST
    m = json.loads(path.read_text())
    m.update(change)
    path.write_text(json.dumps(m))
    with pytest.raises(HuseError, match="re-export the bundle with this huse-edge version") as e:
        load_manifest(bundle)
    assert f"{FORMAT!r} v{FORMAT_VERSION}" in str(e.value)


def test_invalid_json_is_refused(bundle):
    (bundle / MANIFEST).write_text('{"format": "huse-bundle", ')
    with pytest.raises(HuseError, match="is not valid JSON.*re-export the bundle") as e:
        load_manifest(bundle)
    assert str(bundle / MANIFEST) in str(e.value)


def test_binary_garbage_manifest_is_refused(bundle):
    (bundle / MANIFEST).write_bytes(b"\xff\xfe\x00garbage\xc3")
    with pytest.raises(HuseError, match="re-export the bundle") as e:
        load_manifest(bundle)
    assert str(bundle / MANIFEST) in str(e.value)


@pytest.mark.parametrize("text", ["[]", '"huse-bundle"', "null"])
def test_manifest_that_is_not_an_object_is_refused(bundle, text):
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(HuseError, match="re-export the bundle") as e:
        load_manifest(bundle)
    assert str(bundle / MANIFEST) in str(e.value)


def test_write_json_atomic_leaves_no_tmp_file(tmp_path):
    path = tmp_path / "out.json"
    obj = {"name": "東京", "n": [1, 2.5, None]}
    write_json_atomic(path, obj)
    write_json_atomic(path, obj)  # overwriting works too
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert "東京" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 5000  # > 1 MiB: more than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
