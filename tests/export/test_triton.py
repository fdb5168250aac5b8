"""`huse-export BUNDLE --triton REPO`: a Triton model repository whose configs Triton's own proto parses and
whose tensors are the graphs', and a Python-backend model that classifies like the Python API."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from huse.runtime.bundle import load_manifest
from huse.runtime.errors import HuseError

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (dev extra)")
text_format = pytest.importorskip("google.protobuf.text_format")

# onnxruntime's type strings -> the model-config data type names (read independently of export/triton.py's table)
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32",
             "tensor(float16)": "TYPE_FP16", "tensor(uint8)": "TYPE_UINT8", "tensor(int8)": "TYPE_INT8"}


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory):
    from huse.export.cli import main

    out = tmp_path_factory.mktemp("triton") / "repo"
    res = CliRunner().invoke(main, [str(tiny_bundle), "--triton", str(out), "--batch", "1:8:32"])
    assert res.exit_code == 0, res.output
    assert "Triton repository ready" in res.output
    return out


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_and_matches_its_graph(repo, tiny_bundle):
    import onnxruntime as ort

    manifest = load_manifest(tiny_bundle)
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    expected = {f"{g}_{p.replace('-', '_')}" for p, graphs in manifest["models"].items() for g in graphs}
    assert set(configs) == expected | {"huse", "huse_embed"}
    dtype = model_config_pb2.DataType.Name
    for name in expected:
        cfg = configs[name]
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size == 32  # --batch's MAX
        assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 1
        assert (repo / name / "1" / "model.onnx").is_file()
        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for declared, actual in ((cfg.input, session.get_inputs()), (cfg.output, session.get_outputs())):
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, a in zip(declared, actual):
                assert dtype(t.data_type) == ORT_TYPES[a.type], (name, t.name)
                # Triton's dims leave out the batch axis; the graph's first axis is the dynamic batch
                assert isinstance(a.shape[0], str) and list(t.dims) == [d if isinstance(d, int) else -1
                                                                       for d in a.shape[1:]], (name, t.name)
    image = configs["image_fp32"]
    assert list(image.input[0].dims) == [3, 32, 32] and [o.name for o in image.output] == ["embedding", "logits", "visual"]


def test_python_models_speak_the_serving_contract(repo, tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    dtype = model_config_pb2.DataType.Name
    huse, embed = parse(repo / "huse" / "config.pbtxt"), parse(repo / "huse_embed" / "config.pbtxt")
    for cfg in (huse, embed):
        assert cfg.backend == "python" and cfg.max_batch_size == 32 and cfg.HasField("dynamic_batching")
        assert [(t.name, dtype(t.data_type), list(t.dims)) for t in cfg.input] == [
            ("image", "TYPE_STRING", [1]), ("title", "TYPE_STRING", [1])]
        assert (repo / cfg.name / "1" / "model.py").is_file()
    depth = manifest["hierarchy"]["depth"]
    assert {t.name: (dtype(t.data_type), list(t.dims)) for t in huse.output} == {
        "top_k_labels": ("TYPE_STRING", [-1]), "top_k_scores": ("TYPE_FP32", [-1]),
        "path_labels": ("TYPE_STRING", [depth]), "path_scores": ("TYPE_FP32", [depth]),
        "mode": ("TYPE_STRING", [1]), "needs_review": ("TYPE_BOOL", [1]),
        "error": ("TYPE_STRING", [1]), "warning": ("TYPE_STRING", [1])}
    assert {t.name: (dtype(t.data_type), list(t.dims)) for t in embed.output} == {
        "embedding": ("TYPE_FP32", [manifest["embedding_dim"]]), "error": ("TYPE_STRING", [1])}
    assert huse.parameters["task"].string_value == "classify" and embed.parameters["task"].string_value == "embed"
    # the bundle travels in the repository, and both models find it from their own folder
    for cfg in (huse, embed):
        assert load_manifest(repo / cfg.name / cfg.parameters["bundle"].string_value)["labels"] == manifest["labels"]


def test_repository_describes_itself_and_refuses_changes(repo, tmp_path):
    from huse.export.triton import verify_repository

    m = verify_repository(repo)
    assert m["format"] == "huse-triton-repository" and "huse/config.pbtxt" in m["files"]
    assert m["options"]["max_batch_size"] == 32 and m["bundle"]["manifest_sha256"]
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    (copy / "image_fp32" / "1" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(HuseError, match="image_fp32/1/model.onnx does not match its sha256"):
        verify_repository(copy)
    shutil.copytree(repo, tmp_path / "repo2")
    (tmp_path / "repo2" / "huse" / "1" / "evil.py").write_text("import os")
    with pytest.raises(HuseError, match="evil.py is not listed"):
        verify_repository(tmp_path / "repo2")


def test_an_existing_repository_is_kept_without_force(repo, tiny_bundle):
    from huse.export.cli import main

    res = CliRunner().invoke(main, [str(tiny_bundle), "--triton", str(repo)])
    assert res.exit_code == 1 and "exists; pass --force" in res.output


def load_model_py(repo):
    spec = importlib.util.spec_from_file_location("huse_triton_model", repo / "huse" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_classifies_requests_like_the_python_api(repo, tiny_bundle, tiny_catalog):
    """The Python-backend model's request code (what Triton's `execute` runs) against Classifier.classify."""
    from huse.runtime import Classifier

    model = load_model_py(repo)
    photos = sorted((tiny_catalog.parent / "images").glob("*.png"))[:3]
    png = [p.read_bytes() for p in photos]
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    truncated = buf.getvalue()[:20]
    # two requests batched together: 3 items with both, then a title only, a bad photo + title, and an empty item
    r1 = (np.asarray([[b] for b in png], dtype=object), np.asarray([[b"Acme tee"], [b"boots"], [b"tote"]], dtype=object), {})
    r2 = (np.asarray([[b""], [truncated], [b""]], dtype=object), np.asarray([[b"navy shirt"], [b"boots"], [b""]], dtype=object),
          {"top_k": 2})
    clf = Classifier(tiny_bundle, threads=1)
    outs = model.classify_requests(clf, [r1, r2])
    want = clf.classify(images=png + [None, truncated, None], titles=["Acme tee", "boots", "tote", "navy shirt", "boots", None])
    # K: 5 by default but never more than the classes (4 here), or the request's top_k
    assert outs[0]["top_k_labels"].shape == (3, 4) and outs[1]["top_k_labels"].shape == (3, 2)
    got = [(o, i) for o in outs for i in range(len(o["mode"]))]
    for (o, i), w in zip(got, want):
        assert o["error"][i, 0].decode() == w.get("error", "")
        assert o["warning"][i, 0].decode() == w.get("warning", "")
        if "error" in w:
            assert o["mode"][i, 0] == b"" and o["needs_review"][i, 0] == False  # noqa: E712
            continue
        k = o["top_k_labels"].shape[1]
        assert o["mode"][i, 0].decode() == w["mode"]
        assert [s.decode() for s in o["top_k_labels"][i]] == [t["label"] for t in w["top_k"][:k]]
        np.testing.assert_allclose(o["top_k_scores"][i], [t["score"] for t in w["top_k"][:k]], rtol=1e-6)
        assert [s.decode() for s in o["path_labels"][i] if s] == [p["label"] for p in w["path"]]
    assert "warning" in want[4] and "title only" in want[4]["warning"]  # the truncated photo, classified by title
    assert outs[1]["error"][2, 0]  # nothing to classify: an error for that item alone
    review = model.classify_requests(clf, [(r1[0], r1[1], {"min_confidence": 1.01})])[0]["needs_review"]
    assert review.all()
    bad = model.classify_requests(clf, [(r1[0], r1[1], {"top_k": 0}), r1])
    assert "top_k must be a positive integer" in bad[0]["_error"] and bad[1]["top_k_labels"].shape == (3, 4)
    emb = model.embed_requests(clf, [r1, r2])
    np.testing.assert_allclose(emb[0]["embedding"], clf.embed_image(png).vectors, atol=1e-6)
    np.testing.assert_allclose(emb[1]["embedding"][:2], clf.embed_text(["navy shirt", "boots"]).vectors, atol=1e-6)
    assert np.isnan(emb[1]["embedding"][2]).all() and emb[1]["error"][2, 0]
    clf.close()
