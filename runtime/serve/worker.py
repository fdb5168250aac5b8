"""The model process of `huse serve`, and the HTTP front's handle on it (`Worker`, `RemoteBatcher`).

`huse serve` runs as two processes, as Triton's and TorchServe's frontends do: the front (app.py:
uvicorn, the protocol, admission, metrics, search and the page) and this one, which holds the
model instances, the decoding pool and the dynamic batchers (batcher.py, models.py). Python runs
one thread at a time per process: in one process, decoding, batching and each batch's describe
took the interpreter lock from the event loop, and under overload a health probe waited for it
for hundreds of milliseconds while the loop's share of the cores was free. Apart, the front's
event loop never waits on model work, and this process may run at a lower priority as a whole
(`--worker-nice`).

The two talk over a socket pair. Each message is a frame: two little-endian u32 (the length of a
JSON head, the total length of the blobs after it), the head, then the blobs (photo and title bytes
of a request; the float32 vectors of an embed answer), their lengths in the head's "lens" (-1:
None). Both ends are this package and a client's bytes are only carried, never parsed here; no pickle.

Front to model process: "config" (first), "run" (id, model, items), "cancel" (id: its caller stopped
waiting, so its queued items are dropped), "stop". Model process to front: "ready" or "failed",
"done" (id, with the result, the request's error, or "cancelled"), each carrying the batch sizes run
since the last one (the front's `huse_batch_items` histogram). When the front's end closes, this
process stops.

Both processes log through this module (`log`, `_log_error`: one JSON line per error) and freeze what
they loaded (`freeze_loaded`); app.py imports them from here, so the two modules do not import each other.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import io
import itertools
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from huse.runtime._collector import THRESHOLDS
from huse.runtime.errors import HuseError
from huse.runtime.serve.batcher import Admission, Overloaded
from huse.runtime.serve.protocol import CLASSIFY_MODEL, EMBED_MODEL, Items, RequestError

_HEAD = struct.Struct("<II")


def frame(head: dict[str, Any], blobs: Sequence[bytes | None] = ()) -> bytes:
    """One message: `head` (JSON) and `blobs` (bytes or None each)."""
    if blobs:
        head = {**head, "lens": [-1 if b is None else len(b) for b in blobs]}
    h = json.dumps(head).encode()
    body = b"".join(b for b in blobs if b)
    return _HEAD.pack(len(h), len(body)) + h + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[bytes | None]]:
    """The next message: (head, blobs). Raises asyncio.IncompleteReadError when the other end has closed."""
    hl, bl = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    data = await reader.readexactly(hl + bl)
    head = json.loads(data[:hl])
    blobs: list[bytes | None] = []
    at = hl
    for n in head.get("lens", ()):
        if n < 0:
            blobs.append(None)
        else:
            blobs.append(data[at:at + n])
            at += n
    return head, blobs


def _items_frame(rid: int, model: str, items: Items) -> bytes:
    images, titles = items.images or [], items.titles or []
    return frame({"t": "run", "id": rid, "model": model, "params": items.parameters,
                  "images": items.images is not None, "titles": items.titles is not None}, [*images, *titles])


def _items(head: dict[str, Any], blobs: list[bytes | None]) -> Items:
    n = len(blobs) // (head["images"] + head["titles"])
    images = blobs[:n] if head["images"] else None
    titles = blobs[-n:] if head["titles"] else None
    return Items(images, titles, head["params"])


def _result_frame(rid: int, model: str, result: Any, batches: list) -> bytes:
    if model == EMBED_MODEL:
        vectors, errors = result
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return frame({"t": "done", "id": rid, "shape": list(vectors.shape), "errors": {str(i): e for i, e in errors.items()},
                      "batches": batches}, [vectors.tobytes()])
    return frame({"t": "done", "id": rid, "result": result, "batches": batches})


def _result(model: str, head: dict[str, Any], blobs: list[bytes | None]) -> Any:
    if model == EMBED_MODEL:
        vectors = np.frombuffer(blobs[0], dtype=np.float32).reshape(head["shape"]).copy()
        return vectors, {int(i): e for i, e in head["errors"].items()}
    return head["result"]


# -- the front's side --------------------------------------------------------------------------
class WorkerExited(Exception):
    """The model process is gone."""


class Worker:
    """The front's handle on the model process: starts it, sends requests, routes answers.

    Args:
        config: what the model process needs (`worker_config`).
        on_batch: called with (model, items) for each batch the model process ran.
        on_exit: called once with a message when the process ends without being asked to.
    """

    def __init__(self, config: dict[str, Any], on_batch: Callable[[str, int], None],
                 on_exit: Callable[[str], None]):
        self.config, self.on_batch, self.on_exit = config, on_batch, on_exit
        self.ready = False
        self.proc: subprocess.Popen | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, tuple[asyncio.Future, str, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._reader_task: asyncio.Task | None = None
        self._stopping = False
        self._loaded: asyncio.Future | None = None

    async def start(self) -> None:
        """Start the process; `loaded()` waits for its models."""
        ours, theirs = socket.socketpair()
        # A process group of its own, so a Ctrl+C in the terminal reaches the front alone, which finishes
        # its requests and then stops this process (it also stops when the front's end closes). Not a
        # session of its own: Linux's autogroups share the CPU equally between sessions, whatever
        # their nice, and the front would lose its priority over this process.
        # Not `-m huse.runtime.serve.worker`: the package imports this module first, and runpy would run
        # a second copy of it as __main__ (with a RuntimeWarning on every start).
        self.proc = subprocess.Popen([sys.executable, "-c", "from huse.runtime.serve.worker import main; main()",
                                      str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, process_group=0)
        theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        self._loaded = asyncio.get_running_loop().create_future()
        self._writer.write(frame({"t": "config", "config": self.config}))
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def loaded(self) -> None:
        """Returns once the model process has loaded and warmed every instance; raises HuseError if it could not."""
        await self._loaded

    def run(self, model: str, items: Items, replied: Callable[[], None]) -> asyncio.Future:
        """Send the items to the model process; the future of their result (what the model's batcher
        returns there). Cancelling it drops the items there (a caller that stopped waiting).

        Args:
            replied: called once the model process is done with the items (answered, failed, dropped
                after the caller stopped waiting, or the process gone), also when the caller stopped
                waiting before: until then the items may be in a batch.
        Raises:
            WorkerExited: the process is gone (at once; from the future when it goes while the items wait).
        The future raises RequestError, HuseError or Overloaded when the request's own work raised it there.
        """
        if self._writer is None or self._writer.is_closing():
            raise WorkerExited("the model process is not running")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, model, replied)
        self._writer.write(_items_frame(rid, model, items))
        future.add_done_callback(lambda f: self._cancel(rid) if f.cancelled() else None)
        return future

    def _cancel(self, rid: int) -> None:
        if rid in self._pending and not self._writer.is_closing():
            self._writer.write(frame({"t": "cancel", "id": rid}))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head, blobs = await read_frame(reader)
                kind = head["t"]
                if kind == "done":
                    future, model, replied = self._pending.pop(head["id"])
                    for n in head.get("batches", ()):
                        self.on_batch(model, n)
                    replied()
                    if future.done():
                        continue
                    if "error" in head:
                        future.set_exception(_error(head))
                    elif head.get("cancelled"):
                        future.cancel()
                    else:
                        future.set_result(_result(model, head, blobs))
                elif kind == "ready":
                    self.ready = True
                    self._loaded.set_result(None)
                elif kind == "failed":
                    self._loaded.set_exception(HuseError(head["error"]))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.ready = False
        gone = WorkerExited("the model process exited")
        for future, _, replied in self._pending.values():
            replied()
            if not future.done():
                future.set_exception(gone)
        self._pending.clear()
        if not self._loaded.done():
            self._loaded.set_exception(HuseError("the model process exited while loading the bundle (its log is above)"))
        elif not self._stopping:
            code = await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
            self.on_exit(f"the model process exited unexpectedly (exit code {code}); stopping the server")

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask the process to finish what it runs and exit; kill it after `timeout` seconds."""
        self._stopping = True
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame({"t": "stop"}))
            self._writer.close()
        if self.proc is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)


def _error(head: dict[str, Any]) -> Exception:
    if head["error"] == "request":
        return RequestError(head["message"], status=head["status"], retry_after=head.get("retry_after"))
    if head["error"] == "huse":
        return HuseError(head["message"])
    if head["error"] == "overloaded":
        return Overloaded(head["message"])
    return RuntimeError(head["message"])  # logged by the model process, with its traceback


class RemoteBatcher:
    """One served model's batcher as the front sees it: admission here (so a refusal costs the
    front nothing and never reaches the model process), the work there.

    Args:
        worker: the model process.
        model: the served model's name.
        admission: its queue bounds (`Admission`).
    """

    def __init__(self, worker: Worker, model: str, admission: Admission):
        self.worker, self.model, self.admission = worker, model, admission

    @property
    def admitted(self) -> int:
        return self.admission.admitted

    def check(self, n: int) -> None:
        self.admission.check(n)

    def submit(self, items: Items, n: int) -> asyncio.Future:
        """Admit the items and send them; the future of their result.

        Raises:
            Overloaded: they may not be admitted (at once, before anything is sent: a refusal
                costs no task and no exception kept in one, which would leave reference cycles
                for the collector, whose pauses hold up the event loop).
            WorkerExited: the model process is gone.
        """
        self.admission.check(n)
        future = self.worker.run(self.model, items, lambda: self.admission.release(n))
        self.admission.admit(n)
        return future

    def ran(self, n: int) -> None:
        """The model process ran a batch of n items: how fast the queue drains (`Admission.answered`,
        once per batch as in the batcher itself, not once per request: a batch's requests are
        answered together)."""
        self.admission.answered(n)


def worker_config(config: Any) -> dict[str, Any]:
    """What the model process needs of a ServeConfig."""
    workers = config.workers if config.workers is not None else min(4, os.cpu_count() or 1)
    return {"bundle": str(config.bundle), "backend": config.backend, "precision": config.precision,
            "instances": config.instances, "max_batch": config.max_batch, "max_delay_ms": config.max_delay_ms,
            "max_queue": config.max_queue, "threads": config.threads or max(1, (os.cpu_count() or 1) // config.instances),
            "workers": max(1, workers), "spin": config.spin, "worker_nice": config.worker_nice,
            "trusted_keys": list(config.trusted_keys) or None}


# -- shared by both processes ------------------------------------------------------------------
log = logging.getLogger("huse.serve")


def freeze_loaded() -> None:
    """Once a process of `huse serve` has loaded what it serves (modules, labels, sessions).

    What is loaded lives as long as the server: frozen, the collector stops re-scanning it, and a
    young generation of 50,000 objects (`_collector.THRESHOLDS`) lets most collections find requests
    already answered.
    Collecting was 17% of the event loop's samples at concurrency 64 before (py-spy).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def _log_error(kind: str, route: str, status: int, message: str, **extra) -> None:
    """One structured (JSON) log line per error."""
    log.error(json.dumps({"event": "error", "kind": kind, "route": route, "status": status, "error": message,
                          "time": round(time.time(), 3), **extra}, ensure_ascii=False))


def _log_json_lines() -> None:
    """The server's own log: one JSON object per line on stderr (errors, readiness), nothing prefixed."""
    if not any(getattr(h, "_huse_serve", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._huse_serve = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# -- the model process -------------------------------------------------------------------------
def _warm_up(clf) -> None:
    """Load every graph and run each once, so the first request pays no session start."""
    from PIL import Image

    height, width = clf.image_spec.size
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buf, "PNG")
    png = buf.getvalue()
    clf.classify(images=[png, png, None], titles=["warm up", None, "warm up"])
    clf.embed_image([png])
    if clf.manifest.get("visual_dim"):
        clf.embed_visual([png])


async def _serve(sock: socket.socket) -> None:
    from huse.runtime.classifier import Classifier
    from huse.runtime.serve.batcher import Batcher, Instances
    from huse.runtime.serve.models import ClassifyModel, EmbedModel

    _log_json_lines()  # errors as the front logs them: one JSON line each on stderr

    reader, writer = await asyncio.open_connection(sock=sock)
    head, _ = await read_frame(reader)
    c = head["config"]
    if c["worker_nice"]:
        # The whole process below the front: on a contended core the front's event loop wins, so
        # health probes, refusals and new connections are not held up by a batch or a decode.
        os.nice(c["worker_nice"])
    try:
        classifiers = [Classifier(c["bundle"], backend=c["backend"], precision=c["precision"],
                                  batch_size=max(c["max_batch"], 1), threads=c["threads"], spinning=c["spin"],
                                  trusted_keys=c["trusted_keys"]) for _ in range(c["instances"])]
        instances = Instances(classifiers)
        await asyncio.gather(*(instances.call(i, _warm_up) for i in range(len(classifiers))))
    except Exception as e:  # a bundle that cannot run: say so; the front stops, never serving half a model
        writer.write(frame({"t": "failed", "error": str(e) if isinstance(e, HuseError) else f"{type(e).__name__}: {e}"}))
        await writer.drain()
        return
    freeze_loaded()
    pool = ThreadPoolExecutor(c["workers"], thread_name_prefix="huse-prepare")
    models = {CLASSIFY_MODEL: ClassifyModel(classifiers[0]), EMBED_MODEL: EmbedModel(classifiers[0])}
    ran = {name: collections.deque() for name in models}  # batch sizes not yet reported (append, popleft: thread-safe)
    batchers = {name: Batcher(model, instances, pool, c["max_batch"], c["max_delay_ms"] / 1000, c["max_queue"],
                              on_batch=ran[name].append) for name, model in models.items()}
    for b in batchers.values():
        b.start()
    writer.write(frame({"t": "ready"}))
    tasks: dict[int, asyncio.Task] = {}

    def answer(rid: int, model: str, outcome: Any) -> bytes:
        """The "done" frame of a request: its result, or the exception it ended with."""
        if not isinstance(outcome, BaseException):
            batches = [ran[model].popleft() for _ in range(len(ran[model]))]
            return _result_frame(rid, model, outcome, batches)
        e = outcome
        if isinstance(e, asyncio.CancelledError):
            return frame({"t": "done", "id": rid, "cancelled": True})
        if isinstance(e, RequestError):
            return frame({"t": "done", "id": rid, "error": "request", "message": str(e), "status": e.status,
                          "retry_after": e.retry_after})
        if isinstance(e, HuseError):
            return frame({"t": "done", "id": rid, "error": "huse", "message": str(e)})
        if isinstance(e, Overloaded):
            return frame({"t": "done", "id": rid, "error": "overloaded", "message": str(e)})
        _log_error("internal", "model-process", 500, f"{type(e).__name__}: {e}",
                   traceback="".join(traceback.format_exception(e)))
        return frame({"t": "done", "id": rid, "error": "internal", "message": f"{type(e).__name__}: {e}"})

    def finished(rid: int, model: str, task: asyncio.Task) -> None:
        """Every request's task ends with its "done" frame, which is what frees its place in the front's queue:
        also one cancelled before it ever ran (the front's cancel read in the same turn as the request, as when a
        large request outlives its deadline while it arrives), whose coroutine never reaches a try block."""
        tasks.pop(rid, None)
        outcome = asyncio.CancelledError() if task.cancelled() else task.exception() or task.result()
        writer.write(answer(rid, model, outcome))

    loop = asyncio.get_running_loop()
    try:
        while True:
            head, blobs = await read_frame(reader)
            kind = head["t"]
            if kind == "run":
                rid, model, items = head["id"], head["model"], _items(head, blobs)
                if not _buffered(reader):  # nothing else has arrived: a lone client's request may run here
                    try:
                        done, outcome = batchers[model].run_now(items, len(items))
                    except Exception as e:
                        done, outcome = True, e
                    if done:
                        writer.write(answer(rid, model, outcome))
                        continue
                tasks[rid] = task = loop.create_task(batchers[model].submit(items, len(items)))
                task.add_done_callback(functools.partial(finished, rid, model))
            elif kind == "cancel":
                task = tasks.get(head["id"])
                if task is not None:
                    task.cancel()
            elif kind == "stop":
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the front has gone
    if tasks:
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    for b in batchers.values():
        await b.stop()
    await loop.run_in_executor(None, lambda: (pool.shutdown(wait=True), instances.close(),
                                              [clf.close() for clf in classifiers]))
    try:
        await writer.drain()
        writer.close()
    except ConnectionError:
        pass  # the front closed its end first


def _buffered(reader: asyncio.StreamReader) -> bool:
    """Whether the reader holds bytes already received beyond the frame just read (asyncio's
    StreamReader keeps them in `_buffer`; a reader without one counts as holding some)."""
    return len(getattr(reader, "_buffer", b"?")) > 0


def main(argv: Sequence[str] | None = None) -> None:
    """The model process's entry (argument: its socket's file descriptor): started by the front
    (`Worker.start`), never by hand."""
    args = list(sys.argv[1:] if argv is None else argv)
    sock = socket.socket(fileno=int(args[0]))
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(_serve(sock))
    else:
        asyncio.run(_serve(sock))

