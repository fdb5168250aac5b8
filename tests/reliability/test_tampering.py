"""Tampered bundles: every manifest field that matters, each refused before any inference runs,
with a message naming the field or file. Unsigned bundles are protected by the schema, the path
rules, the sha256 list and the labels digest inside the ONNX graphs; signed bundles by Ed25519."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from huse.runtime import Classifier, HuseError
from huse.runtime.files import MANIFEST, sha256_file

IMAGE = np.full((32, 32, 3), 120, np.uint8)


def _edit(bundle: Path, fn) -> None:
    path = bundle / MANIFEST
    m = json.loads(path.read_text())
    fn(m, bundle)
    path.write_text(json.dumps(m, indent=2))


def _use(bundle: Path, **kw) -> None:
    """What a user does first: load, classify both ways, embed."""
    with Classifier(bundle, backend="onnxruntime", **kw) as clf:
        clf.classify(images=[IMAGE], titles=["Acme black tee"])
        clf.embed_image([IMAGE])
        clf.embed_text(["Acme black tee"])


def _swap_labels(m, b):
    m["labels"][0], m["labels"][1] = m["labels"][1], m["labels"][0]


def _rename_label(m, b):
    m["labels"][0] = "clothing<tops<jackets"


def _drop_label(m, b):
    m["labels"].pop()


def _unlist_and_change(name):
    def fn(m, b):
        del m["files"][name]
        data = bytearray((b / name).read_bytes())
        data[-3] ^= 0xFF
        (b / name).write_bytes(bytes(data))
    return fn


def _model_to_unlisted(m, b):
    shutil.copy(b / "image.onnx", b / "other.onnx")
    m["models"]["fp32"]["image"] = "other.onnx"


def _model_absolute(m, b):
    m["models"]["fp32"]["image"] = str((b / "image.onnx").resolve())


def _model_outside(m, b):
    shutil.copy(b / "image.onnx", b.parent / "outside.onnx")
    m["models"]["fp32"]["image"] = "../outside.onnx"
    m["files"]["../outside.onnx"] = sha256_file(b.parent / "outside.onnx")


def _vocab_traversal(m, b):
    m["tokenizer"]["vocab_file"] = "../../../etc/hostname"


def _files_absolute(m, b):
    m["files"]["/etc/hostname"] = "0" * 64


def _engine_absolute(m, b):
    m["engines"] = [{"file": "/tmp/evil.engine", "graph": "image", "precision": "fp32"}]


def _symlink_out(m, b):
    outside = b.parent / "real-image.onnx"
    shutil.copy(b / "image.onnx", outside)
    (b / "image.onnx").unlink()
    (b / "image.onnx").symlink_to(outside)


def _set(path, value):
    def fn(m, b):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return fn


CASES = [
    ("labels-swapped", _swap_labels, r"manifest field labels .* does not match graph .*renamed, reordered"),
    ("label-renamed", _rename_label, r"manifest field labels .* does not match graph"),
    ("label-dropped", _drop_label, r"manifest field labels .* does not match graph"),
    ("labels-duplicate", _set(["labels", 1], "bags<handbags<handbags"), r"manifest field labels must be unique"),
    ("labels-empty", _set(["labels"], []), r"manifest field labels must be a non-empty list"),
    ("vocab-unlisted-changed", _unlist_and_change("vocab.json"),
     r"tokenizer.vocab_file = 'vocab.json' is not listed in the manifest's files"),
    ("model-unlisted-changed", _unlist_and_change("image.onnx"),
     r"models.fp32.image = 'image.onnx' is not listed in the manifest's files"),
    ("model-points-at-unlisted", _model_to_unlisted, r"models.fp32.image = 'other.onnx' is not listed"),
    ("model-absolute", _model_absolute, r"models.fp32.image = '/.*image.onnx' is an absolute path"),
    ("model-outside", _model_outside, r"'\.\./outside.onnx' leaves the bundle folder"),
    ("vocab-traversal", _vocab_traversal, r"tokenizer.vocab_file = '\.\./\.\./\.\./etc/hostname' leaves the bundle"),
    ("files-absolute", _files_absolute, r"files\['/etc/hostname'\] = '/etc/hostname' is an absolute path"),
    ("engine-absolute", _engine_absolute, r"engines\[0\].file = '/tmp/evil.engine' is an absolute path"),
    ("symlink-out", _symlink_out, r"files\['image.onnx'\] = 'image.onnx' resolves \(through a link\) outside"),
    ("embedding-dim", _set(["embedding_dim"], 65), r"manifest field embedding_dim = 65 does not match graph"),
    ("embedding-dim-type", _set(["embedding_dim"], "64"), r"manifest field embedding_dim must be a positive integer"),
    ("image-size", _set(["preprocessing", "size"], [64, 64]), r"preprocessing.size = \[64, 64\] does not match graph"),
    ("image-size-bad", _set(["preprocessing", "size"], [32]), r"preprocessing.size must be \[height, width\]"),
    ("std-zero", _set(["preprocessing", "std"], [0, 0.5, 0.5]), r"preprocessing.std must be non-zero"),
    ("max-len", _set(["tokenizer", "max_len"], 9), r"tokenizer.max_len = 9 does not match graph"),
    ("fusion-weight", _set(["fusion", "image_weight"], 2.0), r"fusion.image_weight must be a number in \[0, 1\]"),
    ("models-unknown-graph", _set(["models", "fp32", "audio"], "image.onnx"), r"models.fp32 must be an object with graphs"),
    ("files-not-object", _set(["files"], ["image.onnx"]), r"manifest field files must be an object"),
]


@pytest.mark.parametrize("name, edit, message", CASES, ids=[c[0] for c in CASES])
def test_tampered_manifest_is_refused_before_inference(bundle_copy, no_inference, name, edit, message):
    _edit(bundle_copy, edit)
    with pytest.raises(HuseError, match=message):
        _use(bundle_copy)
    assert no_inference == []


def test_untampered_copy_works(bundle_copy, no_inference):
    _use(bundle_copy)
    assert no_inference  # the guard does see inference when there is some


def test_cli_refuses_a_tampered_bundle_in_one_line(bundle_copy, tmp_path):
    _edit(bundle_copy, _vocab_traversal)
    catalog = tmp_path / "c.csv"
    catalog.write_text("name\nAcme tee\n")
    run = subprocess.run([sys.executable, "-m", "huse.runtime.cli", "classify", str(bundle_copy), "--data", str(catalog),
                          "--out", str(tmp_path / "p.jsonl")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and "tokenizer.vocab_file" in run.stderr


@pytest.mark.parametrize("edit", [_swap_labels, _rename_label], ids=["swapped", "renamed"])
def test_huse_info_refuses_relabelled_manifest(bundle_copy, edit):
    """`huse info` reads the graphs' label stamp (no backend needed) and refuses edited labels
    instead of printing them as "files verified"."""
    from click.testing import CliRunner

    from huse.runtime.cli import main

    assert CliRunner().invoke(main, ["info", str(bundle_copy)]).exit_code == 0
    _edit(bundle_copy, edit)
    r = CliRunner().invoke(main, ["info", str(bundle_copy)])
    assert r.exit_code == 1 and "files verified" not in r.output
    assert r.output.startswith("error: bundle manifest field labels") and "image.onnx" in r.output


def test_onnx_metadata_reader_agrees_with_onnx(tiny_bundle):
    onnx = pytest.importorskip("onnx")
    from huse.runtime.bundle import LABELS_METADATA_KEY, read_onnx_metadata

    for f in sorted(tiny_bundle.glob("*.onnx")):
        want = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        assert read_onnx_metadata(f) == want and LABELS_METADATA_KEY in want, f


def test_onnx_metadata_reader_refuses_a_non_model(tmp_path):
    from huse.runtime.bundle import read_onnx_metadata

    (tmp_path / "x.onnx").write_bytes(b"\xff\xff\xff")
    with pytest.raises(HuseError, match="not a readable ONNX model"):
        read_onnx_metadata(tmp_path / "x.onnx")


# --- signed bundles -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from huse.runtime.signing import write_keypair

    folder = tmp_path_factory.mktemp("keys")
    priv, pub = write_keypair(folder / "release")
    other_priv, other_pub = write_keypair(folder / "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


def _sign_with_cli(bundle: Path, key: Path) -> None:
    from click.testing import CliRunner

    from huse.export.cli import main

    res = CliRunner().invoke(main, [str(bundle), "--engine", "skip", "--sign", str(key)])
    assert res.exit_code == 0, res.output
    assert "signed: manifest.sig" in res.output


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    res = CliRunner().invoke(main, ["keygen", str(tmp_path / "k")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "k.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = CliRunner().invoke(main, ["keygen", str(tmp_path / "k")])
    assert again.exit_code == 1 and "exists; pass --force" in again.output


def test_signed_bundle_loads_with_its_key_and_unsigned_loads_without_keys(bundle_copy, keys):
    _use(bundle_copy)  # unsigned, no keys configured: works as before
    with pytest.raises(HuseError, match=r"manifest.json is not signed \(manifest.sig is missing\)"):
        Classifier(bundle_copy, trusted_keys=[keys["pub"]])
    _sign_with_cli(bundle_copy, keys["priv"])
    _use(bundle_copy, trusted_keys=[keys["pub"]])
    _use(bundle_copy, trusted_keys=[keys["other_pub"], keys["pub"]])
    _use(bundle_copy)  # a signed bundle still loads where no key is configured


@pytest.mark.parametrize("attack, message", [
    ("relabel", r"bad signature: manifest.json was changed after it was signed"),
    ("resign-other-key", r"is signed by key \w+, which is not among the trusted keys"),
    ("drop-signature", r"manifest.json is not signed"),
    ("garbage-signature", r"manifest.sig is not valid JSON"),
    ("forged-signature", r"bad signature: the signature of manifest.json in manifest.sig does not verify"),
])
def test_signed_bundle_refuses_tampering(bundle_copy, keys, no_inference, attack, message):
    _sign_with_cli(bundle_copy, keys["priv"])
    sig = bundle_copy / "manifest.sig"
    if attack == "relabel":  # what signing is for: no other check in an unsigned bundle sees a new *manifest* hash
        _edit(bundle_copy, _swap_labels)
    elif attack == "resign-other-key":
        _edit(bundle_copy, _swap_labels)
        from huse.runtime.signing import sign_manifest

        sign_manifest(bundle_copy, keys["other_priv"])
    elif attack == "drop-signature":
        sig.unlink()
    elif attack == "garbage-signature":
        sig.write_bytes(b"\x00garbage")
    elif attack == "forged-signature":
        s = json.loads(sig.read_text())
        (digest, value), = s["signatures"].items()
        import base64

        raw = bytearray(base64.b64decode(value))
        raw[0] ^= 1
        s["signatures"][digest] = base64.b64encode(bytes(raw)).decode()
        sig.write_text(json.dumps(s))
    with pytest.raises(HuseError, match=message):
        _use(bundle_copy, trusted_keys=[keys["pub"]])
    assert no_inference == []


def test_cli_trusted_key_refuses_an_unsigned_bundle(bundle_copy, keys, tmp_path):
    catalog = tmp_path / "c.csv"
    catalog.write_text("name\nAcme tee\n")
    args = [sys.executable, "-m", "huse.runtime.cli", "classify", str(bundle_copy), "--data", str(catalog),
            "--out", str(tmp_path / "p.jsonl"), "--trusted-key", str(keys["pub"])]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "is not signed" in run.stderr
    _sign_with_cli(bundle_copy, keys["priv"])
    run = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_adding_a_precision_without_sign_drops_the_stale_signature(bundle_copy, keys):
    from huse.export.api import ExportOptions, export

    _sign_with_cli(bundle_copy, keys["priv"])
    export(bundle_copy, None, ExportOptions(engine="skip", say=lambda s: None))  # same manifest bytes: still signed
    Classifier(bundle_copy, trusted_keys=[keys["pub"]])
    export(bundle_copy, None, ExportOptions(fp16=True, eval_size=0, engine="skip", say=lambda s: None))
    assert not (bundle_copy / "manifest.sig").exists()  # the new manifest is unsigned: say so, not "bad signature"
    with pytest.raises(HuseError, match="is not signed"):
        Classifier(bundle_copy, trusted_keys=[keys["pub"]])
    export(bundle_copy, None, ExportOptions(engine="skip", sign=keys["priv"], say=lambda s: None))
    Classifier(bundle_copy, trusted_keys=[keys["pub"]])


def test_bad_signing_key_fails_before_the_export_starts(bundle_copy, tmp_path):
    from huse.export.api import ExportOptions, export

    (tmp_path / "not-a-key.pem").write_text("hello")
    before = (bundle_copy / MANIFEST).read_bytes()
    with pytest.raises(HuseError, match="not-a-key.pem is not an unencrypted PEM private key"):
        export(bundle_copy, None, ExportOptions(engine="skip", sign=tmp_path / "not-a-key.pem", say=lambda s: None))
    assert (bundle_copy / MANIFEST).read_bytes() == before
