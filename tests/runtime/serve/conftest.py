"""A real `huse serve` subprocess on a free loopback port, talked to over real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed; pip install 'huse-edge[serve]'")
pytest.importorskip("starlette", reason="the serve extra is not installed; pip install 'huse-edge[serve]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`huse serve BUNDLE ARGS` in a subprocess; `url`, `proc`, `stop()` (SIGTERM, returns the exit code)."""

    def __init__(self, bundle: Path, *args: str, env: dict | None = None, ready: bool = True, timeout: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # its output, for failure messages; gone once closed
        cmd = [sys.executable, "-m", "huse.runtime.cli", "serve", str(bundle), "--port", str(self.port),
               "--threads", "1", "--workers", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"})
        if ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"huse serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"huse serve was not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_server(tiny_bundle):
    """start_server(*args) -> a ready ServerProcess on tiny_bundle; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, bundle: Path | None = None, **kw) -> ServerProcess:
        s = ServerProcess(bundle or tiny_bundle, *args, **kw)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()
        s.log.close()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """One server for the module's read-only tests (the tiny bundle, defaults)."""
    s = ServerProcess(tiny_bundle)
    yield s
    s.stop()
    s.log.close()


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """POST over a real socket; returns (status, headers, body), also for error statuses."""
    req = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url: str, obj) -> tuple[int, dict]:
    status, _, body = post(url, json.dumps(obj).encode())
    return status, json.loads(body)


# The page's and the review's fixtures (a catalog of our own, `huse classify` output, the browser).
from tests.runtime.serve.page_fixtures import browser, kept_photos_index, labels, preds, review_catalog  # noqa: E402,F401
