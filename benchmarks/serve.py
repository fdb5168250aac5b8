"""`huse-bench serve BUNDLE`: `huse serve` under load on loopback, beside what a user would otherwise run.

Side by side in one run, on the same items (a real photo and its title per request, cycled over --items
products), one server at a time so they never share the cores:
- `huse serve --max-batch 1` (batching off), and `huse serve` with its dynamic batcher;
- Triton Inference Server's dynamic batcher around the same Classifier, through PyTriton
  (huse.benchmarks.pytriton_anchor, in its own venv, which this command creates and caches);
- the offline ceiling: the `huse classify` engine's stages (prepare in a thread, infer, describe) at
  batch 64 on the same items, in this process; and the Python API's batch-1 latency.

Load: closed loop from Debian's `wrk` (C, one thread; a Lua script POSTs Open Inference Protocol requests
with Triton's binary-data extension) at each concurrency: throughput, p50/p90/p99 latency, the batch-size
distribution (huse serve: its /metrics histogram; Triton: the batches the anchor was handed) and wrk's own
CPU. Then the overload run: 4x the best sustained rate for 30 s, open loop from `hey` (-q per worker),
against `huse serve` with a short deadline, checking that every request is answered in time (200, 503/429 or
504), that /v2/health/live answers within 100 ms throughout (polled), the peak RSS against the loaded-idle
RSS, and normal answers afterwards. Everything listens on 127.0.0.1; every loop is bounded in time.

Results: result.json, result.md (tables and the bars), throughput_p99.png.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from huse.runtime.errors import HuseError

LEVELS = (1, 8, 32, 64, 128)
SYSTEMS = ("max-batch-1", "batching", "triton")
LABELS = {"max-batch-1": "huse serve --max-batch 1", "batching": "huse serve (dynamic batching)",
          "triton": "Triton + PyTriton (dynamic batcher)"}
BATCH_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch-size buckets, as huse serve's histogram has them
# run_hey_rate: one hey process keeps at most 500 idle connections; its workers start their rate tickers together
HEY_WORKERS = 250  # hey workers per process
# The overload's hey runs this many nice steps down. It shares the server's cores only because this is one
# machine; clients elsewhere take none of them. At 4x it needs ~0.3-0.4 of a core, and at nice 0 it outranked
# the model process (`huse serve --worker-nice 10`) and competed with the front for its core: int8-cpu health
# probes p50 17 ms, 6 of 413 over 100 ms, and 24,437 answered 200 in one run; with hey at nice 10, in three runs,
# 5.8-8.7 ms, 0-1 over 100 ms, 32,182-36,481 answered, at the same offered rate (README, "Serving benchmark").
# wrk's closed loops cost ~3% of a core and keep nice 0.
GENERATOR_NICE = 10
BATCH_METRIC = "huse_batch_items"  # huse serve's items-per-batch histogram (runtime/serve/app.py)
PYTRITON = ("nvidia-pytriton==0.7.0", "numpy<2")  # TOOLCHAIN.md: 0.7.0 pins numpy<2
RUNTIME_DEPS = ("Pillow>=9.0", "click>=8.1", "onnxruntime>=1.17")  # the lean runtime, no torch


@dataclass
class ServeBenchConfig:
    concurrency: tuple[int, ...] = LEVELS
    seconds: float = 10.0  # measured time per level
    warmup: float = 3.0  # load before the first level of each server (discarded)
    rounds: int = 3  # all systems once per round; figures are medians over rounds, ratios with their range
    systems: tuple[str, ...] = SYSTEMS
    precision: str = "fp32"
    max_batch: int = 64
    max_delay_ms: float = 3.0  # both batchers wait at most this long (huse serve's default)
    threads: int | None = None  # onnxruntime threads of every server and of the offline engine (None: all cores)
    items: int = 32  # distinct products cycled through the requests
    data: str | None = None  # catalog with image,name columns (default: fashion-products exported here)
    overload_seconds: float = 30.0  # 0: skip the overload run
    overload_factor: float = 4.0
    deadline_s: float = 2.0  # huse serve --timeout during the overload run
    venv: str | None = None  # the PyTriton venv (default ~/.cache/huse/pytriton-venv)
    spin: bool = True  # huse serve --spin / --no-spin (onnxruntime thread spinning; the server's default: on)
    say: Any = field(default=print, repr=False)


# ----------------------------------------------------------------------------------------
# Items and request bodies


def load_items(data: str | None, n: int, tmp: Path) -> list[tuple[bytes, str]]:
    """`n` real products as (photo bytes, title): from `data`, else fashion-products exported into tmp."""
    from huse.runtime.catalog import iter_catalog

    if data is None:
        out = tmp / "fashion-products"
        res = subprocess.run([sys.executable, "-m", "huse.runtime.cli", "data", "export", "fashion-products", str(out),
                              "--limit", str(max(n, 64))], capture_output=True, text=True)
        if res.returncode != 0:
            raise HuseError(f"could not export fashion-products for the benchmark ({res.stderr.strip()[-300:]}); "
                            "pass --data CATALOG.csv with image and name columns")
        data = str(out / "catalog.csv")
    items = []
    for r in iter_catalog(data):
        if r.error or not r.image or not r.name:
            continue
        items.append((Path(r.image).read_bytes(), r.name))
        if len(items) == n:
            break
    if not items:
        raise HuseError(f"{data} has no row with both a readable image and a name")
    return items


def infer_body(photo: bytes, title: str) -> tuple[bytes, int]:
    """One item as an Open Inference Protocol request with Triton's binary-data extension.

    Returns:
        (body, length of its JSON header: the Inference-Header-Content-Length value).
    """
    t = title.encode("utf-8")
    header = json.dumps({"inputs": [
        {"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(photo)}},
        {"name": "title", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(t)}}]}
    ).encode()
    return header + len(photo).to_bytes(4, "little") + photo + len(t).to_bytes(4, "little") + t, len(header)


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk_script(bodies: list[tuple[bytes, int]], path: str) -> str:
    """A wrk Lua script that cycles through the request bodies and prints its figures as JSON at the end."""
    reqs = ",\n".join(f'  {{{_lua_string(b)}, "{n}"}}' for b, n in bodies)
    return f"""local bodies = {{
{reqs}
}}
local reqs = {{}}
local i = 0
init = function(args)
  for k, b in ipairs(bodies) do
    reqs[k] = wrk.format("POST", "{path}", {{["Content-Type"] = "application/octet-stream",
                                             ["Inference-Header-Content-Length"] = b[2]}}, b[1])
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('HUSE_RESULT {{"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}}\\n', summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


# ----------------------------------------------------------------------------------------
# Load generators (C programs from Debian; their CPU is measured from the kernel's accounting)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HuseError(f"`{name}` is not installed; `apt-get install {name}` (Debian/Ubuntu), then run again")
    return path


def _run_child(cmd: list[str], timeout: float) -> tuple[str, float, float]:
    """Run a load generator; returns (stdout, wall seconds, CPU seconds it used: user + system)."""
    return _run_children([cmd], timeout)[0]


def _run_children(cmds: list[list[str]], timeout: float, stagger: float = 0.0) -> list[tuple[str, float, float]]:
    """Run load generators side by side, each started `stagger` seconds after the one before; for each,
    (stdout, wall seconds, CPU seconds: user + system)."""
    start = time.perf_counter()
    outs = [tempfile.TemporaryFile() for _ in cmds]
    procs = []
    for i, (cmd, out) in enumerate(zip(cmds, outs)):
        time.sleep(max(0.0, start + i * stagger - time.perf_counter()))
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
    done: dict[int, tuple[int, float, float]] = {}  # index -> (exit code, wall, cpu)
    while len(done) < len(procs):
        for i, proc in enumerate(procs):
            if i in done:
                continue
            late = time.perf_counter() > start + timeout
            if late:
                proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0 if late else os.WNOHANG)
            if pid:
                done[i] = (os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
        time.sleep(0.02)
    results = []
    for i, (cmd, out) in enumerate(zip(cmds, outs)):
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        out.close()
        code, wall, cpu = done[i]
        if code != 0:
            raise HuseError(f"{Path(cmd[0]).name} exited with {code}: {text.strip()[-400:]}")
        results.append((text, wall, cpu))
    return results


def run_wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed-loop load: `concurrency` connections, each sending its next request when the last is answered."""
    cmd = [_tool("wrk"), "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
           "-s", str(script), url]
    text, wall, cpu = _run_child(cmd, timeout=seconds + 60)
    m = re.search(r"HUSE_RESULT (\{.*\})", text)
    if m is None:
        raise HuseError(f"wrk printed no result: {text.strip()[-400:]}")
    r = json.loads(m.group(1))
    duration = r["duration_us"] / 1e6
    failed = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["status_errors"] + r["timeouts"]
    return {"concurrency": concurrency, "requests": r["requests"], "failed": failed, "seconds": duration,
            "throughput": (r["requests"] - failed) / duration, "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "max_ms": r["max_us"] / 1e3, "mean_ms": r["mean_us"] / 1e3,
            "generator_cpu": cpu / wall, "errors": {k: r[k] for k in ("connect_errors", "read_errors", "write_errors",
                                                                      "status_errors", "timeouts")}}


def run_hey_rate(url: str, body: bytes, header_length: int, rate: float, seconds: float, timeout_s: float,
                 folder: Path) -> dict[str, Any]:
    """Load at `rate` requests/s for `seconds` from hey's workers, each rate-limited (-q). A hey worker waits for
    its answer before its next request, so each is given 0.5 s per request: the offered rate holds while answers
    (a 503 should be immediate) take less than that, and drops, as reported next to the target, when they take
    longer. At most 2,000 workers (connections); `timeout_s` is the client's own timeout.

    The workers are split over hey processes of at most HEY_WORKERS each, started 0.5 s / processes apart, for
    two reasons of hey's own. One hey process keeps at most 500 idle connections (its transport's
    MaxIdleConnsPerHost is min(-c, 500)): with 2,000 workers in one process, 20,244 connections were opened for
    34,800 requests, which measures hey's pool, not clients that keep their connections. And a process's
    workers start their 0.5 s tickers together, so they send in one burst per 0.5 s: 2,000 requests at once
    is not a rate. Staggered processes of 250 send 8 smaller bursts per 0.5 s. Counts add up, the slowest
    answer is the slowest of all, and the percentiles reported are the worst process's. They run GENERATOR_NICE
    steps down, as clients on other machines would take none of the server's cores."""
    workers = max(1, min(2000, math.ceil(rate * 0.5)))
    procs = math.ceil(workers / HEY_WORKERS)
    body_file = folder / "overload-body.bin"
    body_file.write_bytes(body)
    cmds = []
    for p in range(procs):
        w = workers // procs + (p < workers % procs)
        cmds.append(["nice", "-n", str(GENERATOR_NICE), _tool("hey"), "-z", f"{max(1, round(seconds))}s", "-c", str(w),
                     "-q", f"{rate / workers:.3f}",
                     "-m", "POST", "-D", str(body_file), "-T", "application/octet-stream",
                     "-H", f"Inference-Header-Content-Length: {header_length}", "-t", str(max(1, math.ceil(timeout_s))),
                     url])
    runs = _run_children(cmds, timeout=seconds + timeout_s + 60, stagger=0.5 / procs)
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    slowest, p50, p99 = [], [], []
    for text, _, _ in runs:
        for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text):
            statuses[int(c)] = statuses.get(int(c), 0) + int(n)
        if "Error distribution:" in text:
            for n, msg in re.findall(r"\[(\d+)\]\s+(.+)", text.split("Error distribution:")[1]):
                errors[msg.strip()] = errors.get(msg.strip(), 0) + int(n)
        m = re.search(r"Slowest:\s+([\d.]+) secs", text)
        if m:
            slowest.append(float(m.group(1)))
        pct = {int(q): float(v) for q, v in re.findall(r"(\d+)%+ in ([\d.]+) secs", text)}
        p50 += [pct[50]] if 50 in pct else []
        p99 += [pct[99]] if 99 in pct else []
    wall = max(w for _, w, _ in runs)
    answered = sum(statuses.values())
    return {"target_rate": rate, "workers": workers, "processes": procs, "nice": GENERATOR_NICE,
            "offered_rate": (answered + sum(errors.values())) / seconds, "statuses": statuses, "client_errors": errors,
            "slowest_s": max(slowest, default=None), "p50_s": max(p50, default=None), "p99_s": max(p99, default=None),
            "generator_cpu": sum(c for _, _, c in runs) / wall}


# ----------------------------------------------------------------------------------------
# Servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def post_infer(port: int, body: bytes, header_length: int, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """One binary-data request with a real client socket; returns (status, the JSON response)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/huse/infer", body, {"Content-Type": "application/octet-stream",
                                                                "Inference-Header-Content-Length": str(header_length)})
        r = conn.getresponse()
        data = r.read()
        n = r.getheader("Inference-Header-Content-Length")
        return r.status, json.loads(data[:int(n)] if n else data)
    finally:
        conn.close()


class Server:
    """One server under test, started in its own process on 127.0.0.1 and stopped by `stop`.

    Args:
        system: "max-batch-1" or "batching" (`huse serve`), or "triton" (the PyTriton anchor).
        bundle, cfg: what to serve, and how.
        log: file for the server's output.
        timeout_s: huse serve's per-request deadline (--timeout), or None for its default.
    """

    def __init__(self, system: str, bundle: str, cfg: ServeBenchConfig, log: Path, timeout_s: float | None = None):
        self.system, self.port, self.log_path = system, _free_port(), log
        self.stats = None
        if system == "triton":
            python, env = pytriton_python(cfg)
            self.stats = log.with_suffix(".batches.json")
            cmd = [str(python), "-m", "huse.benchmarks.pytriton_anchor", bundle, "--port", str(self.port),
                   "--grpc-port", str(_free_port()), "--metrics-port", str(_free_port()),
                   "--max-batch", str(cfg.max_batch), "--delay-us", str(round(cfg.max_delay_ms * 1000)),
                   "--precision", cfg.precision, "--stats", str(self.stats)]
        else:
            env = dict(os.environ)
            cmd = [sys.executable, "-m", "huse.runtime.cli", "serve", bundle, "--port", str(self.port),
                   "--precision", cfg.precision, "--max-batch", "1" if system == "max-batch-1" else str(cfg.max_batch),
                   "--max-delay-ms", str(cfg.max_delay_ms), "--spin" if cfg.spin else "--no-spin"]
            if timeout_s is not None:
                cmd += ["--timeout", str(timeout_s)]
        if cfg.threads:
            cmd += ["--threads", str(cfg.threads)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HuseError(f"{LABELS[self.system]} exited with {self.proc.returncode} while starting: "
                                f"{self.log_path.read_text()[-600:]}")
            try:
                if _get(self.port, "/v2/models/huse/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise HuseError(f"{LABELS[self.system]} was not ready after {timeout:.0f} s (log: {self.log_path})")

    def batches(self) -> dict[int, float] | None:
        """Cumulative batches per size bucket upper edge (le), or None where the server does not say."""
        if self.system == "triton":
            time.sleep(0.6)  # the anchor rewrites its counts twice a second
            try:
                counts = {int(k): v for k, v in json.loads(self.stats.read_text()).items()}
            except (OSError, ValueError):
                return None
            return {le: sum(v for k, v in counts.items() if k <= le) for le in BATCH_EDGES}
        try:
            status, text = _get(self.port, "/metrics")
        except OSError:
            return None
        found = {}
        for labels, count in re.findall(rf"^{BATCH_METRIC}_bucket{{([^}}]*)}} (\S+)$", text.decode(), re.MULTILINE):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if tags.get("model") == "huse" and tags.get("le") not in (None, "+Inf"):
                found[int(float(tags["le"]))] = float(count)
        return found or None

    def rss(self) -> int:
        import psutil

        p = psutil.Process(self.proc.pid)
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))

    def cpu_seconds(self, loop_only: bool = False) -> float | None:
        """CPU time (user + system) of the server so far: its process and the processes it started
        (`huse serve`'s model process, Triton's), all their threads; or only the main thread of its
        main process (huse serve's event loop). None where there is no /proc. Per request it is far
        less sensitive to a busy machine than wall-clock figures."""
        import psutil

        pid = self.proc.pid
        try:
            pids = [pid] if loop_only else [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.Error:
            return None
        total = 0
        for p in pids:
            try:
                stat = Path(f"/proc/{pid}/task/{pid}/stat" if loop_only else f"/proc/{p}/stat").read_text()
            except OSError:
                if p == pid:
                    return None
                continue  # a child that has just exited
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        """SIGTERM, then wait (kill after 60 s); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def _distribution(before: dict[int, float] | None, after: dict[int, float] | None) -> dict[str, Any] | None:
    """Batches per size bucket during one level, and their mean size (bucket midpoints where not exact)."""
    if not before or not after:
        return None
    cum = {le: after.get(le, 0) - before.get(le, 0) for le in sorted(after)}
    counts, prev = {}, 0.0
    for le, c in cum.items():
        counts[f"<={le}"] = int(round(c - prev))
        prev = c
    return {"batches": int(round(prev)), "by_size": counts}


# ----------------------------------------------------------------------------------------
# The PyTriton venv


def _venv_path(cfg: ServeBenchConfig) -> Path:
    return Path(cfg.venv or os.environ.get("HUSE_PYTRITON_VENV") or Path.home() / ".cache" / "huse" / "pytriton-venv")


def _source_root() -> Path | None:
    import huse.runtime

    root = Path(huse.runtime.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for folder in ("runtime", "export", "benchmarks"):
        for p in sorted((root / folder).rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    h.update((root / "pyproject.toml").read_bytes())
    return h.hexdigest()


def pytriton_python(cfg: ServeBenchConfig) -> tuple[Path, dict[str, str]]:
    """The PyTriton venv's python (created on first use: nvidia-pytriton, numpy<2, the lean runtime, no torch;
    huse-edge reinstalled from this checkout when its source changed) and the environment it runs in."""
    venv = _venv_path(cfg)
    python = venv / "bin" / "python"
    base = Path(sys.executable).resolve() if sys.prefix == sys.base_prefix else Path(sys._base_executable).resolve()

    def pip(*args: str) -> None:
        res = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise HuseError(f"could not install {' '.join(args)} into the PyTriton venv {venv}: "
                            f"{res.stderr.strip()[-500:]}")

    if not python.is_file():
        cfg.say(f"creating the PyTriton venv {venv} (once; ~500 MB: nvidia-pytriton 0.7.0 with tritonserver 2.51)")
        tmp = venv.with_name(venv.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([str(base), "-m", "venv", str(tmp)], check=True)
        python = tmp / "bin" / "python"
        pip(*PYTRITON, *RUNTIME_DEPS)
        tmp.rename(venv)
        python = venv / "bin" / "python"
    root = _source_root()
    stamp = venv / "huse-source.sha256"
    if root is not None:
        digest = _source_digest(root)
        if not stamp.is_file() or stamp.read_text() != digest:
            cfg.say(f"installing huse-edge from {root} into {venv} (no dependencies: the lean runtime's are there)")
            pip("--no-deps", "--force-reinstall", str(root))
            stamp.write_text(digest)
    elif not stamp.is_file():
        from importlib.metadata import version

        pip("--no-deps", f"huse-edge=={version('huse-edge')}")
        stamp.write_text("release")
    libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ)
    # The Python backend's stub links the system libpython; without this it fails in initialize (TOOLCHAIN.md).
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return python, env


# ----------------------------------------------------------------------------------------
# In-process references: the offline ceiling and the Python API at batch 1


def offline_ceiling(bundle: str, items: list[tuple[bytes, str]], cfg: ServeBenchConfig, seconds: float) -> dict[str, Any]:
    """Items/s of the `huse classify` engine's stages at batch 64 on the same items: the next batch is prepared
    in a thread while the model runs this one (runtime/bulk.py's layout), then described."""
    from huse.runtime.classifier import Classifier

    batch = [items[i % len(items)] for i in range(64)]
    images, titles = [b for b, _ in batch], [t for _, t in batch]
    with Classifier(bundle, precision=cfg.precision, threads=cfg.threads, spinning=False) as clf, \
            ThreadPoolExecutor(1) as pool:
        clf.describe(p := clf.prepare(images, titles), clf.infer(p))  # warm up
        n, start = 0, time.perf_counter()
        nxt = pool.submit(clf.prepare, images, titles)
        while time.perf_counter() - start < seconds or n == 0:
            p = nxt.result()
            nxt = pool.submit(clf.prepare, images, titles)
            clf.describe(p, clf.infer(p))
            n += len(batch)
        wall = time.perf_counter() - start
        nxt.result()
    return {"batch": 64, "items": n, "seconds": wall, "throughput": n / wall}


def api_batch1(bundle: str, items: list[tuple[bytes, str]], cfg: ServeBenchConfig, seconds: float) -> dict[str, Any]:
    """Latency of `Classifier.classify` on one item (photo bytes + title), what a Flask wrapper would call."""
    from huse.benchmarks.stats import summarize
    from huse.runtime.classifier import Classifier

    with Classifier(bundle, precision=cfg.precision, threads=cfg.threads) as clf:
        for b, t in items[:5]:
            clf.classify(images=[b], titles=[t])
        times, start, i = [], time.perf_counter(), 0
        while time.perf_counter() - start < seconds or len(times) < 50:
            b, t = items[i % len(items)]
            t0 = time.perf_counter()
            clf.classify(images=[b], titles=[t])
            times.append(time.perf_counter() - t0)
            i += 1
    s = summarize(times, scale=1e3)
    return {"p50_ms": s["p50"], "p90_ms": s["p90"], "p99_ms": s["p99"], "n": s["n"]}


# ----------------------------------------------------------------------------------------
# The overload run


def overload(bundle: str, cfg: ServeBenchConfig, sustainable: float, body: tuple[bytes, int], folder: Path,
             expected: str) -> dict[str, Any]:
    """`huse serve` (batching, --timeout deadline_s) at overload_factor x the sustainable rate for overload_seconds."""
    server = Server("batching", bundle, cfg, folder / "overload-server.log", timeout_s=cfg.deadline_s)
    try:
        server.wait_ready()
        script = folder / "overload.lua"
        script.write_text(wrk_script([body], "/v2/models/huse/infer"))
        run_wrk(f"http://127.0.0.1:{server.port}/v2/models/huse/infer", script, max(cfg.concurrency), cfg.warmup)
        time.sleep(1.0)
        idle_rss = server.rss()  # loaded (model, sessions, buffers after real load) and idle
        logged_before = server.log_path.stat().st_size
        health, rss, stop = [], [], threading.Event()

        def poll_health() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = _get(server.port, "/v2/health/live", timeout=5)[0]
                except OSError:
                    status = None
                health.append((time.perf_counter() - t0, status, t0 - load_start))
                stop.wait(0.05)

        def sample_rss() -> None:
            while not stop.is_set():
                rss.append(server.rss())
                stop.wait(0.1)

        load_start = time.perf_counter()  # the polls' times count from here (the load starts right after them)
        pollers = [threading.Thread(target=f, daemon=True) for f in (poll_health, sample_rss)]
        for t in pollers:
            t.start()
        rate = cfg.overload_factor * sustainable
        load = run_hey_rate(f"http://127.0.0.1:{server.port}/v2/models/huse/infer", body[0], body[1], rate,
                            cfg.overload_seconds, cfg.deadline_s + 1, folder)
        stop.set()
        for t in pollers:
            t.join()
        after = [post_infer(server.port, *body) for _ in range(20)]
        normal = all(s == 200 and _top1(r) == expected and not _first(r, "error") for s, r in after)
        log = server.log_path.read_bytes()[logged_before:].decode("utf-8", "replace")
        lat = [t for t, _, _ in health]
        # when the slow polls came: the first seconds hold the load's start (2,000 clients connecting)
        later = [t for t, _, at in health if at >= 3.0]
        ok_status = {200, 429, 503, 504}
        return {
            "target_rate": rate, "sustainable_rate": sustainable, "deadline_s": cfg.deadline_s, "load": load,
            "health": {"polls": len(health), "max_ms": 1e3 * max(lat), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                       "p50_ms": 1e3 * float(np.median(lat)), "over_100ms": sum(t > 0.1 for t in lat),
                       "max_ms_after_3s": 1e3 * max(later) if later else None,
                       "not_200": sum(s != 200 for _, s, _ in health),
                       # when each slow poll started (seconds into the load) and how long it took
                       "slow_polls": [[round(at, 2), round(1e3 * t, 1)] for t, _, at in health if t > 0.05]},
            "rss": {"loaded_idle_mib": idle_rss / 2**20, "peak_mib": max(rss) / 2**20, "ratio": max(rss) / idle_rss},
            "after": {"requests": len(after), "normal": normal},
            "log_lines": [l for l in log.splitlines() if l.strip()][:50],
            "checks": {
                "every_request_answered_in_time": (not load["client_errors"] and set(load["statuses"]) <= ok_status
                                                   and (load["slowest_s"] or 0) <= cfg.deadline_s + 0.5),
                "health_within_100ms": all(t <= 0.1 and s == 200 for t, s, _ in health),
                "peak_rss_within_1.5x": max(rss) <= 1.5 * idle_rss,
                "normal_afterwards": normal,
                "no_tracebacks": "Traceback" not in log,
            },
        }
    finally:
        server.stop()


def _first(response: dict[str, Any], name: str) -> Any:
    for o in response.get("outputs", []):
        if o["name"] == name:
            return o["data"][0]
    return None


def _top1(response: dict[str, Any]) -> Any:
    return _first(response, "top_k_labels")


# ----------------------------------------------------------------------------------------
# The run


def _measure_system(system: str, bundle: str, cfg: ServeBenchConfig, folder: Path, script: Path,
                    check: tuple[bytes, int], expected: str, rnd: int) -> list[dict[str, Any]]:
    server = Server(system, bundle, cfg, folder / f"{system}-round{rnd}.log")
    try:
        server.wait_ready()
        status, resp = post_infer(server.port, *check)
        if status != 200 or _top1(resp) != expected:  # every server answers the same request the same way
            raise HuseError(f"{LABELS[system]} answered the check request with {status} {str(resp)[:300]}; "
                            f"expected top-1 {expected!r} (Classifier.classify)")
        url = f"http://127.0.0.1:{server.port}/v2/models/huse/infer"
        run_wrk(url, script, max(cfg.concurrency), cfg.warmup)
        rows = []
        for c in cfg.concurrency:
            before, cpu_before, loop_before = server.batches(), server.cpu_seconds(), server.cpu_seconds(True)
            row = run_wrk(url, script, c, cfg.seconds)
            cpu_after, loop_after = server.cpu_seconds(), server.cpu_seconds(True)
            row["batches"] = _distribution(before, server.batches())
            # Triton's work runs in tritonserver, a child process of the PyTriton one: not counted
            if system != "triton" and cpu_before is not None and cpu_after is not None and row["requests"]:
                row["server_cpu_ms"] = 1e3 * (cpu_after - cpu_before) / row["requests"]
                row["loop_cpu_ms"] = 1e3 * (loop_after - loop_before) / row["requests"]  # HTTP and protocol
            if row["batches"] and row["batches"]["batches"]:
                row["mean_batch"] = (row["requests"] - row["failed"]) / row["batches"]["batches"]
            rows.append(row)
            cfg.say(f"  {LABELS[system]:38} c={c:<4} {row['throughput']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
                    f"p99 {row['p99_ms']:7.2f} ms  wrk CPU {100 * row['generator_cpu']:.0f}%"
                    + (f"  server CPU {row['server_cpu_ms']:.2f} ms/req (loop {row['loop_cpu_ms']:.2f})"
                       if "server_cpu_ms" in row else "")
                    + (f"  mean batch {row['mean_batch']:.1f}" if "mean_batch" in row else ""))
        return rows
    finally:
        code = server.stop()
        if code not in (0, -15) and system != "triton":
            cfg.say(f"  warning: {LABELS[system]} exited with {code} on SIGTERM (log: {server.log_path})")


def _median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for per_level in zip(*rounds):
        row = dict(per_level[-1])
        for key in ("throughput", "p50_ms", "p90_ms", "p99_ms", "generator_cpu", "mean_batch", "server_cpu_ms",
                    "loop_cpu_ms"):
            vals = [r[key] for r in per_level if r.get(key) is not None]
            if vals:
                row[key] = statistics.median(vals)
                row[f"{key}_rounds"] = vals
        out.append(row)
    return out


def _ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    ratios = [x / y for x, y in zip(a, b) if y]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)} if ratios else {}


def bars(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars, from the measured figures (None where a system was not run)."""
    def at(system: str, c: int) -> dict[str, Any] | None:
        return next((r for r in result["systems"].get(system, []) if r["concurrency"] == c), None)

    out: dict[str, Any] = {}
    b64, one64, t64 = at("batching", 64), at("max-batch-1", 64), at("triton", 64)
    ceiling = result.get("offline_ceiling")
    if b64 and one64:
        r = _ratio(b64["throughput_rounds"], one64["throughput_rounds"])
        out["batching_vs_max_batch_1_at_64"] = {**r, "bar": 3.0, "passed": r["median"] >= 3.0}
    if b64 and ceiling:
        r = _ratio(b64["throughput_rounds"], ceiling["throughput_rounds"])
        out["batching_vs_offline_ceiling_at_64"] = {**r, "bar": 0.5, "passed": r["median"] >= 0.5}
    if b64 and t64:
        r = _ratio(b64["throughput_rounds"], t64["throughput_rounds"])
        out["batching_vs_triton_at_64"] = {**r, "bar": 1.0, "p99_ms": b64["p99_ms"], "triton_p99_ms": t64["p99_ms"],
                                           "passed": r["median"] >= 1.0 and b64["p99_ms"] <= t64["p99_ms"]}
    b1, api = at("batching", 1), result.get("api_batch1")
    if b1 and api:
        out["p50_at_1_vs_api_batch1"] = {"p50_ms": b1["p50_ms"], "api_p50_ms": api["p50_ms"],
                                         "overhead_ms": b1["p50_ms"] - api["p50_ms"], "bar_ms": 1.0,
                                         "passed": b1["p50_ms"] <= api["p50_ms"] + 1.0}
    if result.get("overload"):
        out["overload"] = {"passed": all(result["overload"]["checks"].values()), **result["overload"]["checks"]}
    return out


def run_serve_bench(bundle: str | Path, cfg: ServeBenchConfig, folder: str | Path) -> dict[str, Any]:
    """Run every system at every concurrency (in `cfg.rounds` interleaved rounds), the in-process references
    and the overload run; returns the result (also what write_outputs writes).

    Args:
        bundle: the bundle every system serves.
        cfg: levels, durations, systems, batching, overload.
        folder: where server logs and the wrk script go.
    Returns:
        {"config", "machine", "items", "systems": {system: [row per concurrency]}, "offline_ceiling",
         "api_batch1", "overload", "bars"}.
    """
    from huse.benchmarks.machine import machine_info
    from huse.runtime.bundle import load_manifest
    from huse.runtime.classifier import Classifier

    bundle = str(bundle)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unknown = set(cfg.systems) - set(SYSTEMS)
    if unknown:
        raise HuseError(f"unknown system(s) {sorted(unknown)}; known: {list(SYSTEMS)}")
    _tool("wrk")
    if cfg.overload_seconds:
        _tool("hey")
    manifest = load_manifest(bundle)
    if cfg.precision not in manifest["models"]:
        raise HuseError(f"bundle {bundle} has no {cfg.precision} models; it has {sorted(manifest['models'])}")
    if "triton" in cfg.systems:
        pytriton_python(cfg)  # create or refresh the venv before anything is timed
    items = load_items(cfg.data, cfg.items, folder)
    bodies = [infer_body(b, t) for b, t in items]
    script = folder / "infer.lua"
    script.write_text(wrk_script(bodies, "/v2/models/huse/infer"))
    with Classifier(bundle, precision=cfg.precision, threads=1) as clf:
        expected = clf.classify(images=[items[0][0]], titles=[items[0][1]])[0]["top_k"][0]["label"]
    cfg.say(f"{len(items)} real products, one per request; levels {list(cfg.concurrency)}, {cfg.seconds:g} s each, "
            f"{cfg.rounds} round(s)")
    rounds: dict[str, list] = {s: [] for s in cfg.systems}
    ceilings, apis = [], []
    for rnd in range(cfg.rounds):
        cfg.say(f"round {rnd + 1} of {cfg.rounds}")
        for system in cfg.systems:
            rounds[system].append(_measure_system(system, bundle, cfg, folder, script, bodies[0], expected, rnd))
        ceilings.append(offline_ceiling(bundle, items, cfg, cfg.seconds))
        apis.append(api_batch1(bundle, items, cfg, cfg.seconds))
        cfg.say(f"  offline ceiling (classify engine, batch 64)  {ceilings[-1]['throughput']:8.1f} items/s;  "
                f"Python API batch 1 p50 {apis[-1]['p50_ms']:.2f} ms")
    result: dict[str, Any] = {
        "benchmark": "serve", "bundle": bundle, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: v for k, v in asdict(cfg).items() if k != "say"},
        "machine": machine_info(), "items": {"count": len(items), "source": cfg.data or "fashion-products"},
        "generator": {"closed_loop": "wrk 1 thread (Lua script, binary-data requests)", "open_loop": "hey -q"},
        "systems": {s: _median_rows(r) for s, r in rounds.items()},
        "offline_ceiling": {"throughput": statistics.median(c["throughput"] for c in ceilings),
                            "throughput_rounds": [c["throughput"] for c in ceilings], "batch": 64},
        "api_batch1": {"p50_ms": statistics.median(a["p50_ms"] for a in apis),
                       "p50_ms_rounds": [a["p50_ms"] for a in apis],
                       "p99_ms": statistics.median(a["p99_ms"] for a in apis)},
    }
    if cfg.overload_seconds and "batching" in cfg.systems:
        sustainable = max(r["throughput"] for r in result["systems"]["batching"])
        cfg.say(f"overload: {cfg.overload_factor:g} x {sustainable:.0f} req/s for {cfg.overload_seconds:g} s")
        result["overload"] = overload(bundle, cfg, sustainable, bodies[0], folder, expected)
        cfg.say(f"  {result['overload']['checks']}")
    result["bars"] = bars(result)
    return result


# ----------------------------------------------------------------------------------------
# Outputs


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# huse-bench serve: {result['bundle']} ({cfg['precision']})", "",
             f"{result['items']['count']} real products ({result['items']['source']}), one per request; wrk closed loop, "
             f"{cfg['seconds']:g} s per level, median of {cfg['rounds']} round(s); max batch {cfg['max_batch']}, "
             f"max delay {cfg['max_delay_ms']:g} ms.", "",
             "| system | concurrency | req/s | p50 ms | p90 ms | p99 ms | mean batch | wrk CPU | server CPU ms/req "
             "| of it event loop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for system, rows in result["systems"].items():
        for r in rows:
            batch = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else ""
            cpu = f"{r['server_cpu_ms']:.2f}" if r.get("server_cpu_ms") is not None else ""
            loop = f"{r['loop_cpu_ms']:.2f}" if r.get("loop_cpu_ms") is not None else ""
            lines.append(f"| {LABELS[system]} | {r['concurrency']} | {r['throughput']:,.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {batch} | {100 * r['generator_cpu']:.0f}% | {cpu} | "
                         f"{loop} |")
    lines += ["", f"Offline ceiling (the classify engine at batch 64, in process): "
                  f"{result['offline_ceiling']['throughput']:,.0f} items/s. Python API batch 1: p50 "
                  f"{result['api_batch1']['p50_ms']:.2f} ms.", "", "| bar | measured | passed |", "|---|---|---|"]
    for name, b in result["bars"].items():
        if "median" in b:
            shown = f"{b['median']:.2f}x (rounds {b['min']:.2f}-{b['max']:.2f}; bar {b['bar']:g}x)"
            if "triton_p99_ms" in b:
                shown += f", p99 {b['p99_ms']:.1f} vs {b['triton_p99_ms']:.1f} ms"
        elif "overhead_ms" in b:
            shown = f"p50 {b['p50_ms']:.2f} ms vs API {b['api_p50_ms']:.2f} ms (+{b['overhead_ms']:.2f} ms; bar +1 ms)"
        else:
            shown = ", ".join(f"{k}: {v}" for k, v in b.items() if k != "passed")
        lines.append(f"| {name} | {shown} | {'yes' if b['passed'] else 'NO'} |")
    if result.get("overload"):
        o = result["overload"]
        lines += ["", f"Overload: {o['target_rate']:,.0f} req/s offered by hey ({o['load']['offered_rate']:,.0f} sent/s) "
                      f"for {cfg['overload_seconds']:g} s, deadline {o['deadline_s']:g} s: "
                      f"statuses {o['load']['statuses']}, "
                      f"client errors {o['load']['client_errors'] or 'none'}, slowest {o['load']['slowest_s']} s; "
                      f"/v2/health/live max {o['health']['max_ms']:.1f} ms over {o['health']['polls']} polls (p50 "
                      f"{o['health'].get('p50_ms', float('nan')):.1f} ms, max after the first 3 s "
                      f"{o['health'].get('max_ms_after_3s') or float('nan'):.1f} ms); RSS "
                      f"{o['rss']['loaded_idle_mib']:.0f} MiB loaded-idle, peak {o['rss']['peak_mib']:.0f} MiB "
                      f"({o['rss']['ratio']:.2f}x); afterwards normal: {o['after']['normal']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, rows in result["systems"].items():
        xs, ys = [r["throughput"] for r in rows], [r["p99_ms"] for r in rows]
        ax.plot(xs, ys, marker="o", label=LABELS[system])
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(result["offline_ceiling"]["throughput"], color="grey", linestyle="--", label="offline ceiling (batch 64)")
    ax.set_xlabel("throughput (requests/s, one item each)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("huse serve under closed-loop load (labels: concurrency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "result.json", out / "result.md"]
    files[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    files[1].write_text(to_markdown(result))
    png = plot(result, out / "throughput_p99.png")
    return files + ([png] if png else [])
