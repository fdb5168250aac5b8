"""Operating `huse serve`: dynamic batching, search, metrics, logs, auth, trusted keys, no torch."""

from __future__ import annotations

import base64
import csv
import json
import signal
import socket
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


def test_a_running_server_searches_the_index_as_an_add_or_remove_leaves_it(start_server, flat_index, tiny_catalog,
                                                                          tmp_path):
    """A catalog's nightly `huse index add` while the server runs: the server read the index once at start, so it
    never found the new products (and a file it opened later no longer matched the manifest it held). It now
    reads the index again when the manifest changes, between two searches."""
    import shutil

    from huse.runtime import Index

    idx_dir = tmp_path / "idx"
    shutil.copytree(flat_index, idx_dir)
    s = start_server("--index", str(idx_dir))
    query = {"title": "Zephyr quartz teapot", "target": "product", "k": 3}
    status, got = post_json(s.url + "/v1/search", query)
    assert status == 200 and "new-1" not in [h["product_id"] for h in got["results"][0]["hits"]]
    Index.open(idx_dir).add([{"name": "Zephyr quartz teapot", "product_id": "new-1"}], progress=False)
    status, got = post_json(s.url + "/v1/search", query)
    assert status == 200 and got["results"][0]["hits"][0]["product_id"] == "new-1", got
    Index.open(idx_dir).remove(["new-1"])
    status, got = post_json(s.url + "/v1/search", {**query, "k": 500})
    assert status == 200 and "new-1" not in [h["product_id"] for h in got["results"][0]["hits"]]
    photo = base64.b64encode((tiny_catalog.parent / next(csv.DictReader(open(tiny_catalog)))["image"]).read_bytes())
    status, got = post_json(s.url + "/v1/search", {"image": photo.decode(), "space": "visual", "k": 3})
    assert status == 200, got  # the visual index, opened only now: its file matches the manifest the server holds


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
    status, got = post_json(s.url + "/v1/search", {"text": row["name"], "k": 5})  # the CLI's word, not the API's
    assert status == 400 and "['text']" in got["error"] and "'title'" in got["error"], got
    status, got = post_json(s.url + "/v1/search", {"queries": [{"title": row["name"], "caption": "x"}]})
    assert status == 400 and "item 0" in got["error"], got
    status, got = post_json(s.url + "/v1/search", {"k": 5})
    assert status == 400 and '"title" (text), "image" (base64)' in got["error"], got
    status, got = post_json(s.url + "/v1/search", {"queries": [{"title": row["name"]}, {"title": "Acme tee"}], "k": 5})
    assert status == 200 and len(got["results"]) == 2, got
    broken = base64.b64encode(b"not a photo").decode()
    status, got = post_json(s.url + "/v1/search", {"queries": [{"image": broken}, {"title": row["name"]}], "k": 5})
    assert status == 200 and "could not be decoded" in got["results"][0]["error"], got  # fails alone
    assert [h["item"] for h in got["results"][1]["hits"]] == [h.item for h in idx.search(texts=[row["name"]], k=5)[0]]
    status, got = post_json(s.url + "/v1/search", {"queries": [{"image": broken}, {"title": " "}]})
    assert status == 400 and "query 0 has no usable image or text" in got["error"] and "all 2 queries failed" in got["error"]


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


def test_the_page_signs_in_with_the_token_for_a_session_cookie(start_server, tmp_path):
    """A browser sends no bearer token: the page's files load without one, the token signs in once, and the
    session cookie it gets (never the token itself) opens what the token opens."""
    token = "s3cret-token-of-enough-length"
    (tmp_path / "token").write_text(token)
    s = start_server("--token-file", str(tmp_path / "token"))
    for path in ("/", "/app.js", "/app.css"):
        with urllib.request.urlopen(s.url + path) as r:
            assert r.status == 200
    body = json.dumps({"items": [{"title": "Acme black tee"}]}).encode()
    assert post(s.url + "/v1/classify", body)[0] == 401
    signin = s.url + "/ui/signin"
    status, headers, out = post(signin, json.dumps({"token": "wrong"}).encode())
    assert status == 401 and "wrong token" in json.loads(out)["error"] and "set-cookie" not in map(str.lower, headers)
    assert post(signin, b'{"tok": 1}')[0] == 400
    status, headers, _ = post(signin, json.dumps({"token": token}).encode())
    cookie = {k.lower(): v for k, v in headers.items()}["set-cookie"]
    assert status == 200 and token not in cookie and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    session = cookie.split(";")[0]
    assert session.startswith(f"huse_session_{s.port}=")  # a browser sends it to every port of the host
    for path, data in (("/v1/classify", body), ("/ui/config", None)):
        req = urllib.request.Request(s.url + path, data=data, headers={"Cookie": f"theme=dark; {session}"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 200, path
    forged = session[:-4] + ("0000" if not session.endswith("0000") else "1111")
    assert post(s.url + "/v1/classify", body, {"Cookie": forged})[0] == 401


def _responses(sock, n: int) -> list[tuple[int, dict, bytes]]:
    """n HTTP/1.1 responses read off a socket, in order: (status, headers, body)."""
    data, out = b"", []
    while len(out) < n:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = data[:head_end].decode("latin-1").split("\r\n")
            headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
            end = head_end + 4 + int(headers["content-length"])
            if len(data) >= end:
                out.append((int(lines[0].split()[1]), headers, data[head_end + 4:end]))
                data = data[end:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {len(out)} of {n} responses"
        data += chunk
    return out


def test_refusals_keep_the_connection_usable(start_server, tmp_path):
    """A request refused from its headers (its body never read) leaves a keep-alive connection
    usable, pipelined requests are answered in order, and Connection: close is honoured."""
    token = "s3cret-token-of-enough-length"
    (tmp_path / "token").write_text(token)
    s = start_server("--token-file", str(tmp_path / "token"))
    body = json.dumps({"items": [{"title": "Acme black tee"}]}).encode()

    def request(auth: str, extra: str = "") -> bytes:
        return (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        # the refusal and the probe wait in uvicorn's pipeline behind the classification
        sock.sendall(request(token) + request("wrong") + health)
        (s1, _, b1), (s2, h2, b2), (s3, _, b3) = _responses(sock, 3)
        assert (s1, s2, s3) == (200, 401, 200)
        assert json.loads(b1)["results"][0]["top_k"] and b3 == b""
        assert "Bearer" in json.loads(b2)["error"] and h2["www-authenticate"] == "Bearer" and "date" in h2
        sock.sendall(request("wrong"))  # the same connection, after the pipelined ones
        assert _responses(sock, 1)[0][0] == 401
        sock.sendall(request("wrong", "Connection: close\r\n"))
        (status, headers, _), = _responses(sock, 1)
        assert status == 401 and headers["connection"] == "close"
        assert sock.recv(1) == b""  # closed by the server


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "huse.runtime.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_refuses_a_public_address_without_token_or_insecure(tiny_bundle):
    r = _cli(str(tiny_bundle), "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --host 0.0.0.0") and "--token-file" in r.stderr and "--insecure" in r.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "70000", "--port must be from 1 to 65535; got 70000"),  # it used to listen on 70000 - 65536
    ("--timeout", "0", "--timeout must be more than 0; got 0.0"),
    ("--max-delay-ms", "-1", "--max-delay-ms must be 0 or more; got -1.0"),
    ("--max-batch", "0", "--max-batch must be at least 1; got 0"),
    ("--threads", "0", "--threads must be at least 1; got 0"),  # 0 and -1 were taken as the default
    ("--workers", "-1", "--workers must be at least 1; got -1"),
    ("--grace", "-1", "--grace must be 0 or more; got -1.0")])
def test_a_bad_setting_is_refused_by_name_before_the_port_opens(tiny_bundle, flag, value, message):
    r = _cli(str(tiny_bundle), flag, value)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {message}", r.stderr
    assert '"ready"' not in r.stdout


def test_ctrl_c_stops_the_server_cleanly_with_exit_0(start_server):
    """SIGINT (Ctrl+C in a terminal) as SIGTERM: a graceful stop and exit 0, not click's 'Aborted!' and 1."""
    s = start_server()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(60) == 0, s.output()
    assert "Aborted" not in s.output() and "Traceback" not in s.output()
    # the log's last line says it stopped, and that the model process exited cleanly
    assert json.loads(s.output().strip().splitlines()[-1]) == {"event": "stopped", "model_process_exit": 0}, s.output()


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli(str(tiny_bundle), "--port", str(port))
    assert r.returncode == 1 and "Traceback" not in r.stderr and '"ready"' not in r.stdout
    assert r.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use): another server "
                                "may be using it; stop it or choose another --port"), r.stderr


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
