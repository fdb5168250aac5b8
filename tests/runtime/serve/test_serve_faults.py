"""Faults a network service meets, each against a real `huse serve` subprocess on loopback:
a client that disconnects, huge and malformed bodies, wrong tensors, broken and bomb images,
a full queue, a deadline, a thousand idle connections, SIGTERM under load."""

from __future__ import annotations

import base64
import io
import json
import re
import resource
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from PIL import Image

from tests.runtime.serve.conftest import post, post_json


def png(side: int, seed: int = 0) -> bytes:
    """A noise PNG: side 1500 takes ~0.1-0.2 s to decode here, to keep the server busy."""
    a = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def classify_body(images: list[bytes | None], titles: list[str | None] | None = None) -> bytes:
    titles = titles or [None] * len(images)
    return json.dumps({"items": [{k: v for k, v in (("image", base64.b64encode(i).decode() if i else None),
                                                     ("title", t)) if v is not None}
                                 for i, t in zip(images, titles)]}).encode()


def metric(url: str, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as r:
        return r.status == 200


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def is_protocol_error(status: int, body: bytes, want_status: int, needle: str) -> None:
    assert status == want_status, body
    err = json.loads(body)["error"]
    assert needle in err and "Traceback" not in err, err


def test_malformed_json_wrong_datatype_and_shape(server):
    infer = server.url + "/v2/models/huse/infer"
    is_protocol_error(*post(infer, b'{"inputs": [')[::2], 400, "not valid JSON")
    is_protocol_error(*post(server.url + "/v1/classify", b"\xff\xfe garbage")[::2], 400, "not valid JSON")
    fp32 = {"inputs": [{"name": "title", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    is_protocol_error(*post(infer, json.dumps(fp32).encode())[::2], 400, "datatype 'FP32'")
    shape = {"inputs": [{"name": "title", "datatype": "BYTES", "shape": [2, 2], "data": ["a", "b", "c", "d"]}]}
    is_protocol_error(*post(infer, json.dumps(shape).encode())[::2], 400, "expected [N] or [N, 1]")
    count = {"inputs": [{"name": "title", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}
    is_protocol_error(*post(infer, json.dumps(count).encode())[::2], 400, "shape says 3")
    unknown = {"inputs": [{"name": "photo", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    is_protocol_error(*post(infer, json.dumps(unknown).encode())[::2], 400, "unknown input 'photo'")
    bad_b64 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}
    is_protocol_error(*post(infer, json.dumps(bad_b64).encode())[::2], 400, "not base64")
    binary = {"inputs": [{"name": "title", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]}
    head = json.dumps(binary).encode()
    status, _, body = post(infer, head + b"\x05\x00", {"Inference-Header-Content-Length": str(len(head))})
    is_protocol_error(status, body, 400, "binary_data_size 99")
    is_protocol_error(*post_json_raw(server.url + "/v1/classify", {"items": [{"title": "x"}], "mode": "both"}),
                      400, "mode")
    assert healthy(server.url)


def post_json_raw(url, obj):
    status, _, body = post(url, json.dumps(obj).encode())
    return status, body


def test_truncated_png_and_16bit_bomb_are_per_item_errors(server, tiny_catalog, tmp_path):
    from tests.reliability.corpus import make_image_corpus

    corpus = {p.name: p.read_bytes() for p in _corpus_files(tmp_path, make_image_corpus)}
    good = (tiny_catalog.parent / "images" / "img_0_0.png").read_bytes()
    truncated = good[: len(good) // 2]
    bomb = corpus["deep-7000.png"]
    status, out = post_json(server.url + "/v1/classify", json.loads(classify_body([truncated, bomb, good])))
    assert status == 200, out
    r = out["results"]
    assert "error" in r[0] and "item" not in r[0].get("top_k", ""), r[0]
    assert "error" in r[1] and ("pixels" in r[1]["error"] or "bytes" in r[1]["error"]), r[1]
    assert "error" not in r[2] and r[2]["top_k"], r[2]
    # Requests carry bytes: a path sent as a photo is bytes that are not an image, never a file opened.
    status, out = post_json(server.url + "/v1/classify", json.loads(classify_body([str(tiny_catalog).encode()])))
    assert status == 200 and "could not be decoded" in out["results"][0]["error"], out
    assert healthy(server.url)


def _corpus_files(folder, make):
    make(folder)
    return [p for p in folder.rglob("*") if p.is_file()]


def test_100mb_body_is_refused_without_reading_it(server):
    size = 100 * 1024 * 1024
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    reply = raw_request(server.port, head, b"{" + b" " * 65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"--max-body-mb" in reply
    # The same 100 MB streamed without a Content-Length (chunked): cut off at the limit.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
        reply = b""
        try:
            for _ in range(100):
                s.sendall(chunk)
            s.sendall(b"0\r\n\r\n")
            reply = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered 413 and closed while we were still sending
    assert reply == b"" or reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert healthy(server.url)
    assert metric(server.url, "huse_errors_total", kind="too_large") >= 1


def test_items_per_request_limit(start_server):
    s = start_server("--max-items", "3")
    status, _, body = post(s.url + "/v1/classify", classify_body([None] * 4, ["a", "b", "c", "d"]))
    is_protocol_error(status, body, 413, "at most 3")


def test_disconnected_client_has_its_queued_items_dropped(start_server):
    """With one item per batch and slow photos, a request sent behind 12 others and abandoned by
    its client never reaches the model: 12 batches run, not 13."""
    # A long deadline: on a slow machine admission by expected wait would refuse the 13th request
    # (a quarter of the deadline) before it could be abandoned; this test is about the abandoning.
    s = start_server("--max-batch", "1", "--timeout", "600")
    slow = classify_body([png(1500, seed) for seed in range(1)])
    with ThreadPoolExecutor(12) as pool:
        busy = [pool.submit(post, s.url + "/v1/classify", slow, None, 120) for _ in range(12)]
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(slow) + slow)
            time.sleep(0.2)
        # a client that goes away halfway through sending its body
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"items\"")
        assert [f.result()[0] for f in busy] == [200] * 12
    time.sleep(0.3)
    assert metric(s.url, "huse_batch_items_count", model="huse") == 12
    assert metric(s.url, "huse_errors_total", kind="disconnected") == 1
    assert healthy(s.url)


def test_full_queue_answers_503_with_retry_after(start_server):
    s = start_server("--max-batch", "1", "--max-queue", "2")
    slow = classify_body([png(1500)])
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(s.url + "/v1/classify", slow, None, 120), range(10)))
    statuses = sorted(a[0] for a in answers)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    refused = next(a for a in answers if a[0] == 503)
    assert int(refused[1]["retry-after"]) >= 1 and "retry" in json.loads(refused[2])["error"]
    assert healthy(s.url)


def test_deadline_answers_504_and_drops_the_work(start_server):
    s = start_server("--timeout", "0.15", "--max-batch", "1")
    slow = classify_body([png(1500, seed) for seed in range(6)])  # ~0.45 s of decoding: 3x the deadline
    status, _, body = post(s.url + "/v1/classify", slow, None, 60)
    is_protocol_error(status, body, 504, "deadline")
    end = time.monotonic() + 10  # the photo already being decoded is finished, then thrown away
    while metric(s.url, "huse_queue_items", model="huse") and time.monotonic() < end:
        time.sleep(0.1)
    # Its place in the queue is freed. (It was not when the model process read the front's cancel in the same
    # turn as the request, which a request this large outlives its deadline to arrive in: the cancelled task
    # never ran, never answered, and its 6 items held their places for good; enough 504s and every request got
    # 503.)
    assert metric(s.url, "huse_queue_items", model="huse") == 0
    assert metric(s.url, "huse_batch_items_count", model="huse") == 0  # it never reached the model
    # And it answers again. The dropped request's photos may still be decoding in the model process (one prepare
    # call decodes a request, and this server has one prepare thread), and a title behind them outlasts its 0.15 s
    # deadline on a busy machine (the fresh-clone suite): a 504 then. So ask until it answers, for 10 s at most; a
    # server that kept answering 504 (a place never freed) fails.
    end = time.monotonic() + 10
    while True:
        status, out = post_json(s.url + "/v1/classify", {"items": [{"title": "Acme black tee"}]})
        if status != 504 or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert status == 200 and out["results"][0]["top_k"]


def test_thousand_idle_connections_do_not_block_service(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        start = time.monotonic()
        status, out = post_json(server.url + "/v1/classify", {"items": [{"title": "Acme black tee"}]})
        assert status == 200 and out["results"][0]["top_k"]
        assert time.monotonic() - start < 5
        assert healthy(server.url)
    finally:
        for sock in idle:
            sock.close()
    assert healthy(server.url)


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(start_server):
    s = start_server("--max-batch", "4", "--timeout", "600")  # every request admitted, even on a slow machine
    slow = classify_body([png(1000, seed) for seed in range(2)])
    answered: list[tuple[float, float, int]] = []  # (sent, answered, status)
    signalled = [float("inf")]

    def client():
        for _ in range(30):  # bounded
            t = time.monotonic()
            if t > signalled[0]:
                return
            try:
                status, _, _ = post(s.url + "/v1/classify", slow, None, 60)
            except OSError:
                return  # refused: the server has stopped accepting
            answered.append((t, time.monotonic(), status))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    signalled[0] = time.monotonic()
    code = s.stop(timeout=60)
    for t in threads:
        t.join(60)
    assert code == 0, s.output()
    assert answered and all(status == 200 for *_, status in answered), answered
    in_flight = [a for a in answered if a[0] < signalled[0] < a[1]]
    assert in_flight, answered  # requests running at the signal were finished, not cut off
    assert "Traceback" not in s.output()


@contextmanager
def queue_held(s):
    """A slow request (~0.5 s of decoding) holds the server's one queue place while the block runs;
    it must still be answered 200 afterwards."""
    slow = classify_body([png(1500, seed) for seed in range(6)])
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, s.url + "/v1/classify", slow, None, 120)
        end = time.monotonic() + 20
        while not metric(s.url, "huse_queue_items", model="huse"):
            assert time.monotonic() < end and not busy.done(), busy.result()
            time.sleep(0.02)
        yield
        assert busy.result()[0] == 200


def test_full_queue_refuses_before_reading_the_body(start_server):
    """Load shedding costs the event loop nothing: with the queue full, a request is answered 503
    from its headers alone (its 50 MB body is never sent)."""
    s = start_server("--max-batch", "1", "--max-queue", "1")
    with queue_held(s):
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/huse/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
            head = sock.recv(65536)
            while not head.endswith(b"}"):  # the headers and the JSON error may come in two segments
                chunk = sock.recv(65536)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 503"), head
            assert b"retry-after: 1" in head.lower() and b"at capacity" in head
    assert metric(s.url, "huse_errors_total", kind="overloaded") >= 1


def test_a_refused_client_that_sends_its_whole_body_first_gets_the_503(start_server):
    """A client that closes after one request (`Connection: close`, as Python's urllib sends) and writes its
    whole body before it reads: the 503 written from the headers reaches it. The server used to close the
    connection at once, and the kernel answered the rest of the body with a reset, which lost the 503 (10 of
    20 such 23 MB requests in a flood got ECONNRESET instead of 503 + Retry-After)."""
    s = start_server("--max-batch", "1", "--max-queue", "1")
    with queue_held(s):
        status, headers, body = post(s.url + "/v1/classify", b"x" * 20_000_000, None, 30)
    assert status == 503 and b"at capacity" in body, (status, body[:200])
    assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"


def test_flooded_server_sheds_load_and_stays_live(start_server, tmp_path):
    """A bounded flood (hey, 64 connections, 3 s, loopback) against a small queue: every request gets
    200, 503 or 504, liveness answers throughout, and the server answers normally afterwards.
    Not a timing figure: `huse-bench serve`'s overload run measures the 100 ms bar."""
    import shutil
    import subprocess

    import pytest

    hey = shutil.which("hey")
    if not hey:
        pytest.skip("hey is not installed (apt-get install hey)")
    s = start_server("--max-queue", "8", "--timeout", "2")
    body = tmp_path / "body.json"
    body.write_bytes(classify_body([png(64, 1)], ["Acme black tee"]))
    live: list[tuple[float, int]] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(s.url + "/v2/health/live", timeout=10) as r:
                    status = r.status
            except OSError:
                status = 0
            live.append((time.perf_counter() - t, status))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        out = subprocess.run([hey, "-z", "3s", "-c", "64", "-t", "5", "-m", "POST", "-T", "application/json",
                              "-D", str(body), s.url + "/v1/classify"], capture_output=True, text=True, timeout=60)
    finally:
        done.set()
        poller.join(20)
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out.stdout)}
    assert statuses.get(200) and statuses.get(503), out.stdout
    assert set(statuses) <= {200, 503, 504}, out.stdout
    assert "Error distribution" not in out.stdout, out.stdout  # no client timeouts or resets
    assert live and all(status == 200 for _, status in live), live
    assert max(t for t, _ in live) < 2.0, live  # generous: a shared test machine; the bar is the benchmark's
    status, answer = post_json(s.url + "/v1/classify", {"items": [{"title": "Acme black tee"}]})
    assert status == 200 and answer["results"][0]["top_k"]
    assert "Traceback" not in s.output()


def test_health_answers_at_once_while_the_queue_is_full(start_server):
    """Liveness and readiness are answered in front of routing and the queue: with the one queue
    place held by a slow request, they still answer 200 (and an inference request 503)."""
    s = start_server("--max-batch", "1", "--max-queue", "1")
    with queue_held(s):
        for path in ("/v2/health/live", "/v2/health/ready"):
            with urllib.request.urlopen(s.url + path, timeout=10) as r:
                assert r.status == 200 and r.read() == b""
        status, headers, body = post(s.url + "/v2/models/huse/infer", b"{}", None, 30)
        assert status == 503 and "at capacity" in json.loads(body)["error"], body
    assert metric(s.url, "huse_requests_total", route="/v2/health/live", status="200") >= 1


def test_admission_refuses_what_cannot_finish_before_its_deadline(start_server):
    """A queue far below --max-queue still refuses (503 + Retry-After, at once) requests that the
    items ahead of them would keep past the deadline: from the seconds per item of recent answers
    (here ~0.15 s of decoding each on an idle machine, one worker), with half of the 4 s deadline
    for the wait, 24 concurrent requests cannot all be admitted (a slower machine refuses more)."""
    s = start_server("--max-batch", "1", "--timeout", "4")
    slow = classify_body([png(1500, 7)])
    assert post(s.url + "/v1/classify", slow, None, 60)[0] == 200  # one answer: the drain rate is known
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: post(s.url + "/v1/classify", slow, None, 60), range(24)))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503, 504} and 200 in statuses, statuses
    refused = [a for a in answers if a[0] == 503]
    assert refused, statuses
    assert all(int(a[1]["retry-after"]) >= 1 and "this request may wait" in json.loads(a[2])["error"]
               for a in refused), refused[0]
    end = time.monotonic() + 30  # a 504's photo still being decoded holds its place until it is done
    while metric(s.url, "huse_queue_items", model="huse") and time.monotonic() < end:
        time.sleep(0.1)
    assert metric(s.url, "huse_queue_items", model="huse") == 0
    assert healthy(s.url)
