"""`huse serve` as two processes: the HTTP front and the model process (huse.runtime.serve.worker)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from huse.runtime.serve.batcher import Admission, Overloaded
from huse.runtime.serve.protocol import EMBED_MODEL, Items
from huse.runtime.serve.worker import _items, _items_frame, _result, _result_frame, frame, read_frame
from tests.runtime.serve.conftest import post_json


async def _through_a_socket(data: bytes):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_frame(reader)


def test_frames_carry_requests_and_answers_exactly():
    items = Items([b"\x89PNG photo", None, b""], [None, "Acme tee \u00e9".encode(), b"x" * 70_000], {"top_k": 3})
    head, blobs = asyncio.run(_through_a_socket(_items_frame(7, "huse", items)))
    assert head["id"] == 7 and head["model"] == "huse"
    got = _items(head, blobs)
    assert got.images == items.images and got.titles == items.titles and got.parameters == {"top_k": 3}

    titles_only = Items(None, [b"a", b"b"], {})
    got = _items(*asyncio.run(_through_a_socket(_items_frame(1, "huse", titles_only))))
    assert got.images is None and got.titles == [b"a", b"b"]

    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    head, blobs = asyncio.run(_through_a_socket(_result_frame(2, EMBED_MODEL, (vectors, {1: "item 1: no photo"}), [3])))
    assert head["batches"] == [3]
    got_vectors, errors = _result(EMBED_MODEL, head, blobs)
    assert np.array_equal(got_vectors, vectors) and errors == {1: "item 1: no photo"}

    results = [{"top_k": [{"label": "tops<t-shirts", "score": 0.25}], "mode": "fused"}, {"error": "item 1: bad"}]
    head, blobs = asyncio.run(_through_a_socket(_result_frame(3, "huse", results, [])))
    assert _result("huse", head, blobs) == results


def test_a_closed_socket_ends_the_frames():
    data = frame({"t": "ready"})
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(_through_a_socket(data[:-1]))


def test_admission_bounds_the_queue_and_its_expected_wait():
    a = Admission(max_queue=10, max_wait=1.0)
    a.check(50)  # an empty queue takes a request of any size
    a.admit(8)
    with pytest.raises(Overloaded, match="max-queue 10"):
        a.check(3)
    a.check(2)
    a.item_seconds = 0.2  # 8 + 2 items at 0.2 s each: 2 s, past the 1 s a request may wait
    with pytest.raises(Overloaded, match="would take"):
        a.check(2)
    a.release(8)
    a.check(50)
    a.admit(4)
    time.sleep(0.02)
    a.answered(4)  # 4 items answered ~20 ms after the queue turned busy: ~5 ms an item, averaged in
    assert 0.004 < a.item_seconds < 0.2


def _model_process(server) -> int:
    """The model process's pid, from the server's ready log line."""
    ready = next(json.loads(line) for line in server.output().splitlines() if '"event": "ready"' in line)
    return ready["model_process"]


def test_the_model_runs_in_a_process_of_its_own(start_server):
    server = start_server("--worker-nice", "7")
    status, out = post_json(server.url + "/v1/classify", {"items": [{"title": "Acme black tee"}]})
    assert status == 200 and out["results"][0]["top_k"]
    pid = _model_process(server)
    assert pid != server.proc.pid and os.getpgid(pid) == pid  # its own process group: Ctrl+C reaches the front alone
    # below the front (--worker-nice), and in the front's session: Linux shares the CPU between
    # sessions' autogroups whatever their nice, so a session of its own would undo the priority
    assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, server.proc.pid) + 7
    assert os.getsid(pid) == os.getsid(server.proc.pid)
    maps = Path(f"/proc/{pid}/maps")
    if maps.exists():
        loaded = maps.read_text()
        assert "onnxruntime" in loaded and "libtorch" not in loaded


def test_a_dead_model_process_stops_the_server_with_a_clear_error(start_server):
    s = start_server()
    os.kill(_model_process(s), signal.SIGKILL)
    try:
        code = s.proc.wait(30)
    except Exception:
        pytest.fail(f"the front kept running without its model process:\n{s.output()}")
    log = s.output()
    assert code == 1 and "the model process exited unexpectedly" in log and "Traceback" not in log


def test_a_bundle_the_model_process_cannot_load_is_the_error_the_server_stops_with(start_server):
    from huse.runtime.backends import gpu_backends

    if gpu_backends()["tensorrt"][0]:
        pytest.skip("TensorRT is usable here, so --backend tensorrt loads")
    s = start_server("--backend", "tensorrt", ready=False)
    code = s.proc.wait(60)
    last = s.output().strip().splitlines()[-1]
    # the cause, once; not the model process's exit that follows it
    assert code == 1 and last.startswith("error: the bundle could not be loaded: backend='tensorrt' was asked for"), last
    assert "exited unexpectedly" not in s.output() and "HuseError" not in s.output()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def test_the_model_process_ends_with_a_killed_front(start_server):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux) to watch the model process")
    s = start_server()
    pid = _model_process(s)
    s.proc.kill()  # SIGKILL: the front cannot stop it; its end of the socket closes
    s.proc.wait(30)
    end = time.monotonic() + 30
    while _running(pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _running(pid), "the model process outlived its front by 30 s"


def test_a_refusal_is_raised_at_once_and_sends_nothing():
    """Admission is the front's: a refused request raises before anything is sent (here the model process
    was never started, so sending would raise WorkerExited) and before any task exists to keep it."""
    from huse.runtime.serve.worker import RemoteBatcher, Worker, WorkerExited

    worker = Worker({}, on_batch=lambda model, n: None, on_exit=lambda message: None)
    admission = Admission(max_queue=4)
    admission.admit(4)
    batcher = RemoteBatcher(worker, "huse", admission)
    with pytest.raises(Overloaded):
        batcher.submit(Items(None, [b"tee"], {}), 1)
    assert admission.admitted == 4
    admission.release(4)
    with pytest.raises(WorkerExited):  # admitted, then sent: nothing to send it to
        batcher.submit(Items(None, [b"tee"], {}), 1)
    assert admission.admitted == 0  # what could not be sent is not counted as admitted
