"""Which ASGI framework `huse serve` is built on: Starlette or FastAPI, measured side by side.

    python -m huse.benchmarks.serve_stack --out benchmarks/results/cpu-2core/serve-stack.json
    python -m huse.benchmarks.serve_stack --rounds 1 --requests 200 --out /tmp/stack.json   # a smoke run

For each stack, the same route (a /v2 inference request body read, parsed and answered with a
small JSON, no model) as a user of each would write it:
- `starlette`: a Starlette `Route` reading the raw body (what huse serve does);
- `fastapi`: the same function as a FastAPI route taking the raw `Request`;
- `fastapi-pydantic`: a FastAPI route with a pydantic body model, FastAPI's usual style.

Measured, interleaved over --rounds so that a shared machine's drift lands on all of them:
- import time: a fresh interpreter importing the framework and building the app (median of runs);
- idle RSS: a fresh uvicorn server process with the app, after start-up and one request;
- in-process overhead: the app called directly through ASGI (no sockets), per request;
- loopback latency: sequential keep-alive requests from one client to the uvicorn process
  (includes uvicorn and the kernel; the same for every stack).
Needs `pip install 'huse-edge[serve,bench]'` (fastapi is in `bench`). Writes JSON with each
figure's median and range over rounds and each stack's ratio to starlette.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["STACKS", "make_app", "run"]

STACKS = ("starlette", "fastapi", "fastapi-pydantic")
BODY = json.dumps({"id": "1", "inputs": [{"name": "title", "datatype": "BYTES", "shape": [1],
                                          "data": ["Acme black leather ankle boots"]}],
                   "parameters": {"top_k": 5}}).encode()
PATH = "/v2/models/huse/infer"


def _answer(req: dict[str, Any]) -> dict[str, Any]:
    n = req["inputs"][0]["shape"][0]
    return {"model_name": "huse", "outputs": [{"name": "top_k_labels", "datatype": "BYTES", "shape": [n, 1],
                                               "data": ["shoes<boots<ankle boots"] * n}]}


def make_app(stack: str):
    """The benchmark route on `stack` (one of STACKS)."""
    if stack == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        async def infer(request):
            return Response(json.dumps(_answer(json.loads(await request.body()))), media_type="application/json")
        return Starlette(routes=[Route(PATH, infer, methods=["POST"])])
    from fastapi import FastAPI, Request
    from fastapi.responses import Response as FastAPIResponse

    app = FastAPI()
    # FastAPI reads parameter annotations; this module's are postponed strings (`from __future__
    # import annotations`) naming locally imported classes, so each route gets the real class.
    if stack == "fastapi":
        async def infer_raw(request):
            return FastAPIResponse(json.dumps(_answer(json.loads(await request.body()))), media_type="application/json")
        infer_raw.__annotations__["request"] = Request
        app.post(PATH)(infer_raw)
        return app
    from pydantic import BaseModel

    class Tensor(BaseModel):
        name: str
        datatype: str
        shape: list[int]
        data: list[Any]

    class InferRequest(BaseModel):
        id: str | None = None
        inputs: list[Tensor]
        parameters: dict[str, Any] = {}

    async def infer_typed(req):
        return _answer(req.model_dump())
    infer_typed.__annotations__["req"] = InferRequest
    app.post(PATH)(infer_typed)
    return app


def _fresh(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


def import_seconds(stack: str) -> float:
    """A fresh interpreter: import the framework and build the app."""
    return _fresh("import time; from huse.benchmarks.serve_stack import make_app; t = time.perf_counter(); "
                  f"make_app({stack!r}); print(time.perf_counter() - t)")


def asgi_overhead_us(stack: str, n: int) -> float:
    """Mean microseconds per request through the app's ASGI callable, no sockets."""
    app = make_app(stack)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}

    async def one():
        sent = []

        async def receive():
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message):
            sent.append(message)
        await app(dict(scope), receive, send)
        assert sent[0]["status"] == 200, sent[0]

    async def many():
        for _ in range(min(200, n)):  # warm-up
            await one()
        t = time.perf_counter()
        for _ in range(n):
            await one()
        return (time.perf_counter() - t) / n * 1e6
    return asyncio.run(many())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def served(stack: str, n: int) -> tuple[float, float]:
    """(idle RSS MiB after start-up and one request, mean loopback latency in us) of a uvicorn process."""
    port = _free_port()
    code = ("import uvicorn; from huse.benchmarks.serve_stack import make_app; "
            f"uvicorn.run(make_app({stack!r}), host='127.0.0.1', port={port}, log_level='warning', "
            "access_log=False, http='httptools', loop='uvloop')")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        end = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", PATH, BODY, {"Content-Type": "application/json"})
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > end or proc.poll() is not None:
                    raise RuntimeError(f"the {stack} server did not start")
                time.sleep(0.1)
        time.sleep(0.5)
        rss = _rss_mib(proc.pid)
        for _ in range(min(200, n)):  # warm-up
            conn.request("POST", PATH, BODY, {"Content-Type": "application/json"})
            conn.getresponse().read()
        t = time.perf_counter()
        for _ in range(n):
            conn.request("POST", PATH, BODY, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        latency = (time.perf_counter() - t) / n * 1e6
        conn.close()
        return rss, latency
    finally:
        proc.terminate()
        proc.wait(30)


def _summary(values: list[float], base: list[float] | None) -> dict[str, Any]:
    med = statistics.median(values)
    out: dict[str, Any] = {"median": med, "min": min(values), "max": max(values), "runs": values}
    if base is not None:
        ratios = [v / b for v, b in zip(values, base)]
        out["vs_starlette"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def run(rounds: int = 5, requests: int = 5000) -> dict[str, Any]:
    """Measure every stack, interleaved over `rounds`; returns the JSON-able result."""
    raw: dict[str, dict[str, list[float]]] = {s: {"import_s": [], "idle_rss_mib": [], "asgi_us": [], "loopback_us": []}
                                              for s in STACKS}
    for _ in range(rounds):
        for stack in STACKS:
            raw[stack]["import_s"].append(import_seconds(stack))
            raw[stack]["asgi_us"].append(asgi_overhead_us(stack, requests))
            rss, lat = served(stack, requests)
            raw[stack]["idle_rss_mib"].append(rss)
            raw[stack]["loopback_us"].append(lat)
    from importlib.metadata import version

    result = {"benchmark": "serve_stack", "rounds": rounds, "requests": requests, "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {p: version(p) for p in ("starlette", "fastapi", "pydantic", "uvicorn")}, "stacks": {}}
    for stack in STACKS:
        result["stacks"][stack] = {k: _summary(v, None if stack == "starlette" else raw["starlette"][k])
                                   for k, v in raw[stack].items()}
    return result


@click.command(context_settings={"show_default": True})
@click.option("--rounds", default=5, help="Interleaved rounds (each: every stack once).")
@click.option("--requests", default=5000, help="Requests per in-process and loopback measurement.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
def main(rounds: int, requests: int, out: str) -> None:
    """Starlette vs FastAPI for huse serve: import time, idle RSS, per-request overhead."""
    def body():
        result = run(rounds, requests)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        for stack, r in result["stacks"].items():
            click.echo(f"{stack:17s} import {r['import_s']['median'] * 1e3:6.0f} ms  idle RSS "
                       f"{r['idle_rss_mib']['median']:5.1f} MiB  in-process {r['asgi_us']['median']:6.0f} us  "
                       f"loopback {r['loopback_us']['median']:6.0f} us")
        click.echo(f"-> {out}")
    run_cli(body)


def run_cli(fn):
    from huse.runtime.cli import run_cli as cli

    cli(fn)


if __name__ == "__main__":
    main()
