"""Operating `huse serve`: dynamic batching, search, metrics, logs, auth, trusted keys, no torch."""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.serve.conftest import post, post_json
from tests.runtime.serve.test_serve_faults import metric


def test_concurrent_single_item_requests_are_batched(start_server, tiny_catalog):
    s = start_server("--max-delay-ms", "50", "--instances", "2")
    rows = list(csv.DictReader(open(tiny_catalog)))[:16]
    bodies = [json.dumps({"items": [{"image": base64.b64encode((tiny_catalog.parent / r["image"]).read_bytes()).decode(),
                                     "title": r["name"]}]}).encode() for r in rows]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: post(s.url + "/v1/classify", b), bodies))
    assert [a[0] for a in answers] == [200] * 16
    batches = metric(s.url, "huse_batch_items_count", model="huse")
    assert metric(s.url, "huse_batch_items_sum", model="huse") == 16
    assert batches < 16, "concurrent requests should share batches"
    assert metric(s.url, "huse_requests_total", route="/v1/classify", status="200") == 16
    assert metric(s.url, "huse_request_seconds_count", route="/v1/classify") == 16
    assert metric(s.url, "huse_items_total", model="huse") == 16


def test_each_error_is_one_json_log_line(start_server):
    s = start_server()
    post(s.url + "/v2/models/huse/infer", b"{not json")
    lines = [json.loads(line) for line in s.output().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line.get("event") == "error"]
    assert len(errors) == 1 and errors[0]["status"] == 400 and errors[0]["route"] == "/v2/models/{model}/infer"
    assert metric(s.url, "huse_errors_total", kind="bad_request") == 1


def test_search_equals_the_python_api(start_server, flat_index, tiny_bundle, tiny_catalog):
    from huse.runtime import Index

    s = start_server("--index", str(flat_index))
    row = list(csv.DictReader(open(tiny_catalog)))[7]
    photo = (tiny_catalog.parent / row["image"]).read_bytes()
    idx = Index.open(flat_index)
    for query, kw in [({"title": row["name"]}, {"texts": [row["name"]]}),
                      ({"image": base64.b64encode(photo).decode()}, {"images": [photo]}),
                      ({"image": base64.b64encode(photo).decode(), "title": row["name"], "target": "product"},
                       {"images": [photo], "texts": [row["name"]], "target": "product"}),
                      ({"image": base64.b64encode(photo).decode(), "space": "visual"}, {"images": [photo], "space": "visual"}),
                      ({"title": row["name"], "filter": "shoes"}, {"texts": [row["name"]], "filter": "shoes"})]:
        status, got = post_json(s.url + "/v1/search", {**query, "k": 5})
        assert status == 200, got
        want = [h.to_dict() for h in idx.search(k=5, **kw)[0]]
        hits = got["results"][0]["hits"]
        assert [h["item"] for h in hits] == [w["item"] for w in want], query
        np.testing.assert_allclose([h["score"] for h in hits], [w["score"] for w in want], atol=1e-5)
    status, got = post_json(s.url + "/v1/search", {"title": "x", "target": "shelf"})
    assert status == 400 and "target" in got["error"]


def test_search_without_index_is_404(server):
    status, got = post_json(server.url + "/v1/search", {"title": "x"})
    assert status == 404 and "--index" in got["error"]


def test_bearer_token(start_server, tmp_path):
    token = "s3cret-token-of-enough-length"
    (tmp_path / "token").write_text(token + "\n")
    s = start_server("--token-file", str(tmp_path / "token"))
    body = json.dumps({"items": [{"title": "Acme black tee"}]}).encode()
    status, headers, out = post(s.url + "/v1/classify", body)
    assert status == 401 and "Bearer" in json.loads(out)["error"]
    status, _, _ = post(s.url + "/v1/classify", body, {"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, _ = post(s.url + "/v1/classify", body, {"Authorization": f"Bearer {token}"})
    assert status == 200
    with urllib.request.urlopen(s.url + "/v2/health/live") as r:  # probes need no token
        assert r.status == 200


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "huse.runtime.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_refuses_a_public_address_without_token_or_insecure(tiny_bundle):
    r = _cli(str(tiny_bundle), "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --host 0.0.0.0") and "--token-file" in r.stderr and "--insecure" in r.stderr


def test_trusted_key_refuses_an_unsigned_bundle(tiny_bundle, tmp_path):
    pytest.importorskip("cryptography")
    from huse.runtime.signing import write_keypair

    _, pub = write_keypair(tmp_path / "k")
    r = _cli(str(tiny_bundle), "--trusted-key", str(pub), "--port", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "sign" in r.stderr.lower()


def test_server_process_never_imports_torch(server):
    if not Path(f"/proc/{server.proc.pid}/maps").exists():
        pytest.skip("needs /proc (Linux) to see what the server's processes loaded")
    status, _ = post_json(server.url + "/v1/classify", {"items": [{"title": "Acme black tee"}]})
    assert status == 200
    ready = next(json.loads(line) for line in server.output().splitlines() if '"event": "ready"' in line)
    for pid in (server.proc.pid, ready["model_process"]):  # the HTTP front and the model process
        loaded = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in loaded and "/torch/" not in loaded
    assert "onnxruntime" in loaded  # the check sees the libraries the model process did load


def test_serve_help_and_import_need_no_extra():
    code = ("import sys, huse.runtime.serve; from huse.runtime.cli import main; "
            "assert not any(m in sys.modules for m in ('starlette', 'uvicorn', 'prometheus_client', 'torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    r = subprocess.run([sys.executable, "-m", "huse.runtime.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--max-delay-ms" in r.stdout
