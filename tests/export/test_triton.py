"""`huse-export BUNDLE --triton REPO`: a Triton model repository whose configs Triton's own proto parses and
whose tensors are the graphs', and a Python-backend model that classifies like the Python API."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def test_triton_settings_are_refused_before_the_export_works(tiny_bundle, tmp_path):
    from huse.export.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    for flag, value, says in (("--triton-instances", "0", "--triton-instances must be at least 1; got 0"),
                              ("--triton-delay-us", "-1", "--triton-delay-us must be at least 0; got -1")):
        res = CliRunner().invoke(main, [str(bundle), "--fp16", "--triton", str(tmp_path / "repo"), flag, value])
        assert res.exit_code == 1 and res.output.strip() == f"error: {says}", res.output
    assert not (bundle / "fp16").exists() and not (tmp_path / "repo").exists()  # the fp16 export never ran


def test_force_replaces_a_repository_and_never_another_folder(tiny_bundle, tmp_path):
    from huse.export.cli import main

    models = tmp_path / "models"
    models.mkdir()
    (models / "other_model").mkdir()
    res = CliRunner().invoke(main, [str(tiny_bundle), "--triton", str(models), "--force"])
    assert res.exit_code == 1 and "is not a Triton repository written by huse-export, so --force will not" in res.output
    assert (models / "other_model").is_dir()


def load_model_py(repo):
    spec = importlib.util.spec_from_file_location("huse_triton_model", repo / "huse" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_classifies_requests_like_the_python_api(repo, tiny_bundle, tiny_catalog):
    """The Python-backend model's request code (what Triton's `execute` runs) against Classifier.classify."""
    from huse.runtime import Classifier
    from huse.runtime.serve.models import ClassifyModel, EmbedModel

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
    outs = model.run_requests(ClassifyModel(clf), [r1, r2])
    want = clf.classify(images=png + [None, truncated, None], titles=["Acme tee", "boots", "tote", "navy shirt", "boots", None])
    # K: 5 by default but never more than the classes (4 here), or the request's top_k
    assert outs[0]["top_k_labels"].shape == (3, 4) and outs[1]["top_k_labels"].shape == (3, 2)
    got = [(o, i) for o in outs for i in range(len(o["mode"]))]
    for (o, i), w in zip(got, want):
        assert o["warning"][i, 0].decode() == w.get("warning", "")
        if "error" in w:
            assert o["error"][i, 0] and o["mode"][i, 0] == b"" and o["needs_review"][i, 0] == False  # noqa: E712
            continue
        k = o["top_k_labels"].shape[1]
        assert o["mode"][i, 0].decode() == w["mode"] and o["error"][i, 0] == b""
        assert [s.decode() for s in o["top_k_labels"][i]] == [t["label"] for t in w["top_k"][:k]]
        np.testing.assert_allclose(o["top_k_scores"][i], [t["score"] for t in w["top_k"][:k]], rtol=1e-6)
        assert [s.decode() for s in o["path_labels"][i] if s] == [p["label"] for p in w["path"]]
    assert "warning" in want[4] and "title only" in want[4]["warning"]  # the truncated photo, classified by its title
    assert outs[1]["error"][2, 0]  # nothing to classify: an error for that item alone
    assert model.run_requests(ClassifyModel(clf, min_confidence=1.01), [r1])[0]["needs_review"].all()
    bad = model.run_requests(ClassifyModel(clf), [(r1[0], r1[1], {"top_k": 0}), r1, (r1[0], r2[1][:2], {})])
    assert "top_k" in bad[0]["_error"] and bad[1]["top_k_labels"].shape == (3, 4) and "rows" in bad[2]["_error"]
    emb = model.run_requests(EmbedModel(clf), [r1, r2])
    np.testing.assert_allclose(emb[0]["embedding"], clf.embed_image(png).vectors, atol=1e-6)
    np.testing.assert_allclose(emb[1]["embedding"][:2], clf.embed_text(["navy shirt", "boots"]).vectors, atol=1e-6)
    assert np.isnan(emb[1]["embedding"][2]).all() and emb[1]["error"][2, 0]
    clf.close()


# -- the repository in a real tritonserver -------------------------------------------------------------------------
# PyTriton's wheel bundles tritonserver 2.51 with the Python backend (no onnxruntime or TensorRT backend), so the
# `huse` and `huse_embed` models run here in Triton itself; the ONNX/plan models need NVIDIA's container.
PYTRITON_VENV = Path(os.environ.get("HUSE_PYTRITON_VENV", Path.home() / ".cache" / "huse" / "pytriton-venv"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tritonserver_serves_the_python_models(repo, tiny_bundle, tiny_catalog, tmp_path):
    """tritonserver loads `huse` and `huse_embed` from the repository, and tritonclient gets the Python API's answers."""
    import tritonclient.http as httpclient

    from huse.runtime import Classifier

    site = next(iter(PYTRITON_VENV.glob("lib/python3.*/site-packages")), None)
    if site is None or not (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        reason = f"no PyTriton venv at {PYTRITON_VENV} (`make pytriton-setup` creates it; or set HUSE_PYTRITON_VENV)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # .ci/run creates it: CI cannot pass by skipping
            pytest.fail(f"CI must run Triton, and cannot: {reason}")
        pytest.skip(reason)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if site.parent.name != f"python{version}":
        pytest.skip(f"the PyTriton venv is for {site.parent.name}, this test runs {version}")
    dist = site / "pytriton" / "tritonserver"
    server = tmp_path / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", server / "backends" / "python")
    # The models import huse from the venv (Triton's Python stub does not read PYTHONPATH): this checkout's source
    # is installed there when it changed, as `huse-bench serve` does.
    from huse.benchmarks.serve import ServeBenchConfig, pytriton_python

    _, env = pytriton_python(ServeBenchConfig(venv=str(PYTRITON_VENV), say=lambda s: None))
    env = {**env, "PATH": f"{PYTRITON_VENV / 'bin'}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": f"{site / 'nvidia_pytriton.libs'}:{env['LD_LIBRARY_PATH']}"}
    port = _free_port()
    cmd = [str(server / "bin" / "tritonserver"), "--model-repository", str(repo), "--model-control-mode", "explicit",
           "--load-model", "huse", "--load-model", "huse_embed", "--http-address", "127.0.0.1", "--http-port", str(port),
           "--grpc-address", "127.0.0.1", "--grpc-port", str(_free_port()), "--allow-metrics", "false",
           "--exit-timeout-secs", "2", "--backend-directory", str(server / "backends")]
    log = open(tmp_path / "tritonserver.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.is_model_ready("huse") and client.is_model_ready("huse_embed"):
                    break
            except Exception:  # not listening yet
                pass
            assert proc.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()[-3000:]
            time.sleep(0.5)
        photos = sorted((tiny_catalog.parent / "images").glob("*.png"))[:2]
        images = [p.read_bytes() for p in photos] + [b"", b"not a photo"]
        titles = [b"Acme tee", b"", b"navy shirt", b"boots"]

        def inputs():
            tensors = []
            for name, values in (("image", images), ("title", titles)):
                t = httpclient.InferInput(name, [4, 1], "BYTES")
                t.set_data_from_numpy(np.asarray(values, dtype=object).reshape(4, 1), binary_data=True)
                tensors.append(t)
            return tensors

        got = client.infer("huse", inputs(), parameters={"top_k": 3})
        clf = Classifier(tiny_bundle, threads=1)
        want = clf.classify(images=[images[0], images[1], None, b"not a photo"],
                            titles=["Acme tee", None, "navy shirt", "boots"], top_k=3)
        assert [m.decode() for m in got.as_numpy("mode")[:, 0]] == [w["mode"] for w in want]
        assert got.as_numpy("top_k_labels").shape == (4, 3)
        for i, w in enumerate(want):
            assert [s.decode() for s in got.as_numpy("top_k_labels")[i]] == [t["label"] for t in w["top_k"]]
            np.testing.assert_allclose(got.as_numpy("top_k_scores")[i], [t["score"] for t in w["top_k"]], rtol=1e-5)
        assert "title only" in got.as_numpy("warning")[3, 0].decode()  # the bad photo, classified by its title
        emb = client.infer("huse_embed", inputs())
        np.testing.assert_allclose(emb.as_numpy("embedding")[:2], clf.embed_image(images[:2]).vectors, atol=1e-5)
        clf.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_tensorrt_engines_become_plan_models(tiny_bundle, tmp_path):
    """A bundle with TensorRT engines (built on a GPU elsewhere: the bytes here are a stand-in, never run) gets a
    tensorrt_plan model per engine, on the GPU, batched up to the engine's profile, with its ONNX graph's tensors."""
    from huse.export.triton import TritonOptions, write_repository
    from huse.runtime.bundle import write_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "engines").mkdir()
    (bundle / "engines" / "fp32-image.engine").write_bytes(b"serialised engine bytes")
    m = json.loads((bundle / "manifest.json").read_text())
    m["engines"] = [{"file": "engines/fp32-image.engine", "graph": "image", "precision": "fp32",
                     "tensorrt_version": "10.3.0", "gpu_name": "Orin", "profile": {"image": {
                         "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}}]
    for key in ("files", "format", "format_version"):
        m.pop(key)
    write_manifest(bundle, m)
    repo = tmp_path / "repo"
    write_repository(bundle, repo, TritonOptions(max_batch=64))
    plan, onnx_model = parse(repo / "image_fp32_trt" / "config.pbtxt"), parse(repo / "image_fp32" / "config.pbtxt")
    assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 16  # the engine's profile caps the batch
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(plan.instance_group[0].kind) == "KIND_GPU"
    assert plan.input == onnx_model.input and plan.output == onnx_model.output
    assert (repo / "image_fp32_trt" / "1" / "model.plan").read_bytes() == b"serialised engine bytes"
    m = json.loads((repo / "manifest.json").read_text())
    assert m["models"]["image_fp32_trt"]["tensorrt_version"] == "10.3.0"


def test_multi_label_repository_carries_the_label_sets(tiny_multi_bundle, tmp_path):
    """A multi-label bundle's `huse` model declares `labels` and its request code fills it with each
    item's label set, as `huse serve` does (one copy of the tensors: huse.runtime.serve.protocol)."""
    from huse.export.triton import write_repository
    from huse.runtime import Classifier
    from huse.runtime.serve.models import ClassifyModel

    repo = tmp_path / "repo"
    write_repository(tiny_multi_bundle, repo)
    huse = parse(repo / "huse" / "config.pbtxt")
    outputs = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in huse.output}
    assert outputs["labels"] == ("TYPE_STRING", [1])
    titles = ["Acme tee", "boots"]
    with Classifier(tiny_multi_bundle, threads=1) as clf:
        out = load_model_py(repo).run_requests(
            ClassifyModel(clf), [(None, np.asarray([[t.encode()] for t in titles], dtype=object), {})])[0]
        want = clf.classify(titles=titles)
    assert set(out) == set(outputs)  # every declared output, nothing else
    for i, w in enumerate(want):
        got = json.loads(out["labels"][i, 0])
        assert [g["label"] for g in got] == [x["label"] for x in w["labels"]]
        np.testing.assert_allclose([g["score"] for g in got], [x["score"] for x in w["labels"]], atol=1e-5)
