"""Bundle manifests: every file hashed, a changed or missing file refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from huse.runtime.bundle import FORMAT, FORMAT_VERSION, load_manifest, write_manifest
from huse.runtime.files import MANIFEST, sha256_file, write_json_atomic
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


def test_a_training_run_given_as_a_bundle_says_to_export_it(tiny_run):
    """Its suggestion was `huse-export RUN --out RUN`: the run folder as the bundle's."""
    with pytest.raises(HuseError, match=f"{tiny_run} is a training run, not a bundle: export it first, "
                                        f"`huse-export {tiny_run} --out bundles/{tiny_run.name}`"):
        load_manifest(tiny_run)


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


# --- paths, schema, graph checks -------------------------------------------------------------

from huse.runtime.bundle import bundle_path, check_graph, labels_sha256, LABELS_METADATA_KEY  # noqa: E402


@pytest.mark.parametrize("name, why", [("/etc/passwd", "is an absolute path"), ("C:/x.onnx", "is an absolute path"),
                                       ("../x.onnx", "leaves the bundle folder"), ("a/../../x", "leaves the bundle"),
                                       ("a\\x.onnx", "leaves the bundle"), ("a//b", "leaves the bundle"),
                                       (7, "is not a file name"), ("", "is not a file name")])
def test_bundle_path_refuses_paths_that_leave_the_bundle(tmp_path, name, why):
    with pytest.raises(HuseError, match=f"manifest field models.fp32.image = {name!r} {why}".replace("\\", "\\\\")
                       .replace("(", "\\(").replace(")", "\\)").replace(".", "\\.")):
        bundle_path(tmp_path, name, "models.fp32.image")


def test_bundle_path_accepts_nested_relative_paths(tmp_path):
    assert bundle_path(tmp_path, "fp16.v2/image.onnx", "x") == tmp_path / "fp16.v2" / "image.onnx"


def test_referenced_file_must_be_listed(bundle):
    m = json.loads((bundle / MANIFEST).read_text())
    del m["files"]["engines/orin/fused.plan"]
    (bundle / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(HuseError, match=r"engines\[0\].file = 'engines/orin/fused.plan' is not listed"):
        load_manifest(bundle)


def test_write_manifest_leaves_out_excluded_folders(bundle):
    m = write_manifest(bundle, _fields(engines=[]), exclude=["engines"])
    assert set(m["files"]) == {"vocab.json", "fp32/fused.onnx"}


GRAPH_OK = dict(inputs={"image": [None, 3, 4, 4], "input_ids": ["batch", 4]},
                outputs={"probs": ["batch", 2], "image_embedding": ["batch", 8], "text_embedding": ["batch", 8]})


def test_check_graph_accepts_a_matching_graph(bundle):
    m = load_manifest(bundle)
    check_graph(m, "fused", **GRAPH_OK, metadata={LABELS_METADATA_KEY: labels_sha256(m["labels"])}, where="f.onnx")
    check_graph(m, "fused", **GRAPH_OK, metadata={}, where="f.onnx")  # bundles from before the digest


@pytest.mark.parametrize("change, field", [
    ({"outputs": {**GRAPH_OK["outputs"], "probs": ["batch", 3]}}, "labels"),
    ({"outputs": {**GRAPH_OK["outputs"], "text_embedding": ["batch", 16]}}, "embedding_dim"),
    ({"inputs": {**GRAPH_OK["inputs"], "image": [None, 3, 8, 8]}}, "preprocessing.size"),
    ({"inputs": {**GRAPH_OK["inputs"], "input_ids": [None, 5]}}, "tokenizer.max_len"),
    ({"metadata": {LABELS_METADATA_KEY: labels_sha256(["c", "a<b"])}}, "labels"),
])
def test_check_graph_names_the_field_that_disagrees(bundle, change, field):
    m = load_manifest(bundle)
    kw = {**GRAPH_OK, "metadata": {}, **change}
    with pytest.raises(HuseError, match=rf"manifest field {field} = .* does not match graph f.onnx"):
        check_graph(m, "fused", where="f.onnx", **kw)


# --- signatures ---------------------------------------------------------------------------------

def test_signed_manifest_verifies_and_any_change_is_refused(bundle, tmp_path):
    from huse.runtime.signing import verify_signature, write_keypair

    priv, pub = write_keypair(tmp_path / "k")
    write_manifest(bundle, _fields(), sign_key=priv)
    assert load_manifest(bundle, trusted_keys=[pub])["labels"] == ["a<b", "c"]
    data = (bundle / MANIFEST).read_bytes()
    assert verify_signature(bundle, data, [pub]) is not None
    assert verify_signature(bundle, data, None) is None  # no keys: no check
    with pytest.raises(HuseError, match="bad signature: manifest.json was changed after it was signed"):
        verify_signature(bundle, data.replace(b'"c"', b'"d"'), [pub])


def test_unsigned_rewrite_removes_the_stale_signature(bundle, tmp_path):
    from huse.runtime.signing import SIGNATURE, write_keypair

    priv, pub = write_keypair(tmp_path / "k")
    write_manifest(bundle, _fields(), sign_key=priv)
    assert (bundle / SIGNATURE).exists()
    write_manifest(bundle, _fields(labels=["x", "y"]))
    assert not (bundle / SIGNATURE).exists()
    with pytest.raises(HuseError, match="is not signed"):
        load_manifest(bundle, trusted_keys=[pub])


def test_signature_file_holds_the_new_signature_before_the_manifest_changes(bundle, tmp_path):
    """What makes a killed signed export safe: the old and new manifests both verify mid-way."""
    import hashlib

    from huse.runtime.signing import SIGNATURE, add_signature, write_keypair

    priv, pub = write_keypair(tmp_path / "k")
    write_manifest(bundle, _fields(), sign_key=priv)
    old = (bundle / MANIFEST).read_bytes()
    new = old.replace(b'"c"', b'"d"')
    add_signature(bundle, new, priv)
    sigs = json.loads((bundle / SIGNATURE).read_text())["signatures"]
    assert set(sigs) == {hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()}
    load_manifest(bundle, trusted_keys=[pub])  # still the old manifest on disk: verifies
