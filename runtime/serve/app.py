"""The ASGI app of `huse serve`, its HTTP front: routes, auth, limits, admission, metrics,
readiness, graceful shutdown.

It speaks the Open Inference Protocol (huse.runtime.serve.protocol) and the /v1 JSON API, admits
items and hands them to the model process (huse.runtime.serve.worker), where the dynamic batchers
(huse.runtime.serve.batcher) run them; it never runs a model. Starlette and uvicorn are imported
here, so `import huse.runtime.serve` and `huse serve --help` work without the `serve` extra.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
import signal
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Sequence

from huse.runtime._lazy import lazy_import
from huse.runtime._priority import lower_thread_priority
from huse.runtime.bundle import is_multi_label, load_manifest, require_precision
from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import Hierarchy
from huse.runtime.labels import needs_review
from huse.runtime.serve.batcher import Admission, Overloaded
from huse.runtime.serve.protocol import (CLASSIFY_MODEL, CLASSIFY_PARAMETERS, EMBED_MODEL, EMBED_PARAMETERS,
                                         ITEM_FIELDS, MODELS, PROTOCOL_PARAMETERS, RequestError, classify_parameters,
                                         classify_tensors, dumps, embed_parameters, embed_tensors,
                                         encode_infer_response, model_metadata, parse_infer_request,
                                         parse_json_body, parse_v1_items, refuse_unknown, Items)
from huse.runtime.serve.worker import (RemoteBatcher, Worker, WorkerExited, _log_error, _log_json_lines,
                                       freeze_loaded, log, worker_config)

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Endpoints a load balancer or orchestrator probes without a token.
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
# With --token-file, the page's own files (no data in them) and its sign-in need no token either: a browser
# sends no bearer token, so the page signs in once and then sends a session cookie (`session_cookie`).
PAGE_FILES = ("/", "/index.html", "/app.js", "/app.css")
SIGNIN_PATH = "/ui/signin"
V1_MODELS = {"/v1/classify": CLASSIFY_MODEL, "/v1/embed": EMBED_MODEL}
INFER_ROUTE = "/v2/models/{model}/infer"
STARTED = "huse.started"  # scope key: time.monotonic() when the request's headers arrived


@dataclass
class ServeConfig:
    """Everything `huse serve` is started with (the CLI's options, one field each).

    Defaults are the CLI's; see `huse serve --help` for what each does.
    """

    bundle: str
    index: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    precision: str = "fp32"
    backend: str = "auto"
    max_batch: int = 64
    # 3 ms: at low load a lone request pays at most this; under load the queue fills a batch
    # before it expires, so it costs nothing there (the trade-off is measured by `huse-bench serve`).
    max_delay_ms: float = 3.0
    max_queue: int = 1024          # items admitted at once; beyond: 503 + Retry-After
    instances: int = 1
    threads: int | None = None     # onnxruntime threads per instance (None: cores / instances)
    workers: int | None = None     # prepare/finish threads (None: min(4, cores))
    # onnxruntime thread spinning. On (2 cores, idle machine, 3 interleaved rounds): concurrency 1 p50 1.81-1.90 ms
    # vs 2.65-2.79 off, concurrency 64 1,045-1,089 vs 936-964 req/s; under 4x overload it answered 15-25% fewer
    # requests (its threads spin while the loop and decoding want the cores). README, "Spinning".
    spin: bool = True
    # The model process runs this much below the HTTP front (0: the same priority). 10, not 5: under 4x
    # overload (2 cores, 10 s at 4,300 req/s, 2 runs each) health probes took p50 5.0-6.8 ms, max
    # 62-66 ms with 10 against 10.4-10.6 and 57-121 ms with 5 (19: 3.5-3.8 and 47-57 ms, but a
    # model that any busy process on the device would starve); concurrency 1 and 64 did not move. On a
    # phosphor-icons MiniLM bundle (10 s at 1,500 req/s, 2 runs each): max 22-30 ms with 10, 37-41 with 5.
    worker_nice: int = 10
    max_body_mb: float = 64.0
    max_items: int = 256           # items per request
    timeout_s: float = 30.0        # per-request deadline
    grace_s: float = 30.0          # SIGTERM: time for in-flight requests
    min_confidence: float = 0.0
    token: str | None = None       # bearer token (from --token-file)
    insecure: bool = False
    trusted_keys: Sequence[str] = field(default_factory=tuple)
    max_connections: int = 4096



class Metrics:
    """Prometheus metrics of one server (a registry of its own, so tests can run several)."""

    def __init__(self):
        pc = lazy_import("prometheus_client", "serve")
        self.pc = pc
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("huse_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = pc.Histogram("huse_request_seconds", "Request latency by route", ["route"], registry=r,
                                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch = pc.Histogram("huse_batch_items", "Items per model batch", ["model"], registry=r,
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.items = pc.Counter("huse_items", "Items answered", ["model"], registry=r)
        self.errors = pc.Counter("huse_errors", "Errors by kind (item: a per-item error in a 200)", ["kind"], registry=r)
        self.queue = pc.Gauge("huse_queue_items", "Items admitted and not yet answered", ["model"], registry=r)
        # Label children bound once: labels() takes a lock and builds its key on every call.
        self.items_of = {m: self.items.labels(m) for m in MODELS}
        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), bound on first use (routes, statuses and kinds are few)."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def request(self, route: str, status: int, seconds: float) -> None:
        """One answered request: its count by route and status, its latency."""
        self.child(self.requests, route, str(status)).inc()
        self.child(self.latency, route).observe(seconds)

    def error(self, kind: str, n: int = 1) -> None:
        if n:
            self.child(self.errors, kind).inc(n)

    def render(self) -> tuple[bytes, str]:
        return self.pc.generate_latest(self.registry), self.pc.CONTENT_TYPE_LATEST


class Server:
    """The loaded state of `huse serve`'s front: the model process, admission, index, metrics, readiness.

    Args:
        config: the options.
        manifest: the bundle's verified manifest (labels and hierarchy for metadata and the page;
            the model process runs the models).
        index: an opened Index for /v1/search, or None.
    """

    def __init__(self, config: ServeConfig, manifest: dict[str, Any], index: Any = None):
        self.config = config
        self.labels: list[str] = manifest["labels"]
        self.index = index
        self.depth = Hierarchy(self.labels).depth
        self.multi_label = is_multi_label(manifest)
        self.metrics = Metrics()
        self.failed: str | None = None
        self.worker = Worker(worker_config(config), on_batch=self._ran, on_exit=self._worker_exited)
        self._batch_items = {name: self.metrics.batch.labels(name) for name in MODELS}
        # A quarter of the deadline for the wait behind the items already admitted: the request's own
        # decoding, batch and way back take the rest, and the estimate lags a sudden flood, which
        # takes the cores the estimate was measured with. Under 4x overload (2 cores, 2 s deadline,
        # `huse-bench serve`'s overload run, 2 runs each, another job loading the cores) half the
        # deadline let the slowest answer take 2.03-2.20 s, a quarter 1.10-1.16 s, with as many
        # requests served (3,406-3,689 vs 3,660-3,926).
        self.batchers = {name: RemoteBatcher(self.worker, name, Admission(config.max_queue, config.timeout_s / 4))
                         for name in MODELS}
        for name, b in self.batchers.items():
            self.metrics.queue.labels(name).set_function(lambda b=b: b.admitted)
        self._search_thread: ThreadPoolExecutor | None = None
        self._warm: asyncio.Task | None = None
        self._loaded = False  # the models and the index loaded and warmed, and the "ready" line logged
        self._stopping = False

    @property
    def ready(self) -> bool:
        """The models loaded and warmed in the model process, the index (if any) here, and not stopping. It turns
        true after the "ready" log line, so that whoever sees ready also finds the line (its model process pid)."""
        return self.worker.ready and self._loaded and not self._stopping

    # -- lifetime --------------------------------------------------------------------
    async def start(self) -> None:
        # Search runs below the event loop: on a contended core the loop wins.
        lower = functools.partial(lower_thread_priority, self.config.worker_nice)
        self._search_thread = ThreadPoolExecutor(1, thread_name_prefix="huse-search", initializer=lower)
        await self.worker.start()
        # Loading and warming run in the model process and on the search thread, so liveness answers meanwhile.
        self._warm = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.worker.loaded()
            if self.index is not None:
                await loop.run_in_executor(self._search_thread, _warm_index, self.index)
        except Exception as e:  # a bundle that cannot run: say so and stop, never serve half a model
            what = str(e) if isinstance(e, HuseError) else f"{type(e).__name__}: {e}"
            self._stop_with(f"the bundle could not be loaded: {what}", "load", "startup")
            return
        freeze_loaded()
        c = self.config
        log.info(json.dumps({"event": "ready", "url": f"http://{c.host}:{c.port}", "models": list(MODELS),
                             "precision": c.precision, "instances": c.instances, "max_batch": c.max_batch,
                             "max_delay_ms": c.max_delay_ms, "search": self.index is not None,
                             "model_process": self.worker.proc.pid}))
        self._loaded = True

    def _ran(self, model: str, n: int) -> None:
        """The model process ran a batch of n items of `model`."""
        self._batch_items[model].observe(n)
        self.batchers[model].ran(n)

    def _worker_exited(self, message: str) -> None:
        self._stop_with(message, "model_process", "server")

    def _stop_with(self, message: str, kind: str, route: str) -> None:
        """Log, then stop the server (`serve` raises with the message): never serve half a model. The
        first failure is the cause (a model process that could not load the bundle then exits too)."""
        if self.failed is not None:
            return
        self.failed = message
        _log_error(kind, route, 0, message)
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self._stopping = True
        if self._warm is not None and not self._warm.done():
            self._warm.cancel()
        await self.worker.stop(self.config.grace_s)
        if self._search_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._search_thread.shutdown, True)
        if self.failed is None:  # a failure has said why in its own error line
            code = self.worker.proc.returncode if self.worker.proc is not None else None
            log.info(json.dumps({"event": "stopped", "model_process_exit": code}))

    # -- work ------------------------------------------------------------------------
    async def run(self, receive, model: str, items: Items, started: float | None = None) -> Any:
        """Items through a model's batcher, within the request's deadline (`--timeout` from when its
        headers arrived, `started`: time.monotonic()); a client that disconnects while it waits has
        its queued items dropped."""
        if not self.ready:
            raise RequestError(f"model {model!r} is not ready yet (loading and warming up); retry shortly",
                               status=503, retry_after=1)
        left = self.config.timeout_s - (time.monotonic() - started if started is not None else 0.0)
        try:
            work = self.batchers[model].submit(items, len(items))
        except (Overloaded, WorkerExited) as e:
            raise _unavailable(e) from None
        # The work's future and a task watching the socket; asyncio.wait's own timeout is the deadline.
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait((work, gone), timeout=max(0.0, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work not in done:
            work.cancel()  # its queued items are dropped before they reach the model
            if gone in done:
                raise ClientGone()
            raise RequestError(f"the request did not finish within its {self.config.timeout_s:g} s deadline "
                               f"(--timeout); its work was dropped. The server is busy: retry later or with "
                               f"fewer items", status=504)
        try:
            result = work.result()
        except (Overloaded, WorkerExited) as e:
            raise _unavailable(e) from None
        self.metrics.items_of[model].inc(len(items))
        return result

    def shed(self, model: str | None) -> None:
        """Refuse a request for `model` (None or unknown: nothing to refuse) whose queue is full,
        before its body is read.

        Under overload, reading, parsing and decoding bodies that cannot be served would keep the
        event loop from everything else, health probes included; a 503 costs it next to nothing.

        Raises:
            RequestError: 503 with Retry-After, when the model is at --max-queue or its
                queue's expected wait is past the deadline (`Batcher.check`).
        """
        batcher = self.batchers.get(model)
        if batcher is not None:
            try:
                batcher.check(1)
            except Overloaded as e:
                raise _at_capacity(e) from None

    async def search(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """Per query {"hits": [...]} or, for a query without a usable vector, {"error": why}; a 400 when
        every query failed (as `huse search` exits 1 then)."""
        if self.index is None:
            raise RequestError("this server was started without --index; /v1/search needs `huse serve BUNDLE --index IDX`",
                               status=404)
        if not self.ready:
            raise RequestError("the index is not ready yet; retry shortly", status=503, retry_after=1)
        refuse_unknown(query, SEARCH_FIELDS, "in the search query")  # e.g. "text" (the CLI's --text) for "title"
        queries = query["queries"] if "queries" in query else [{k: query[k] for k in ITEM_FIELDS if k in query}]
        if not isinstance(queries, list) or not queries:
            raise RequestError('"queries" must be a non-empty list of {"image": base64, "title": str}')
        items = parse_v1_items({"items": queries}, self.config.max_items)
        if all(i is None for i in items.images) and all(t is None for t in items.titles):
            raise RequestError('a search query needs "title" (text), "image" (base64) or both')
        k, target, space, prefix = query.get("k", 10), query.get("target", "image"), query.get("space", "universal"), \
            query.get("filter")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise RequestError(f"k is {k!r}; expected an integer from 1 to 1000")
        texts = [t.decode("utf-8") if t is not None else None for t in items.titles]
        images = items.images

        def go():
            found = self.index.search_batch(texts=texts if any(t is not None for t in texts) else None,
                                            images=images if any(i is not None for i in images) else None,
                                            k=k, target=target, filter=prefix, space=space)
            if len(found.errors) == len(found.hits):
                i = min(found.errors)
                raise RequestError(f"query {i} has {found.errors[i]}; all {len(found.hits)} queries failed")
            return [{"error": found.errors[i]} if i in found.errors else {"hits": [h.to_dict() for h in q]}
                    for i, q in enumerate(found.hits)]
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._search_thread, go), self.config.timeout_s)


SEARCH_FIELDS = (*ITEM_FIELDS, "queries", "k", "target", "space", "filter")  # one query's fields, or "queries"


def _at_capacity(e: Overloaded) -> RequestError:
    return RequestError(f"the server is at capacity ({e}); retry after 1 s", status=503, retry_after=1)


def _unavailable(e: Overloaded | WorkerExited) -> RequestError:
    """A 503: the queue is full (retry after 1 s), or the model process is gone (the server is stopping)."""
    if isinstance(e, Overloaded):
        return _at_capacity(e)
    return RequestError(f"{e}; the server is stopping", status=503)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _warm_index(index) -> None:
    index.search(texts=["warm up"], k=1)


# -- the app ---------------------------------------------------------------------------------
def create_app(server: Server, extra_routes: Sequence[Any] = ()):
    """The Starlette app for a Server.

    Args:
        server: the loaded state (models, batchers, index).
        extra_routes: Starlette routes mounted before the API (e.g. a review page's).
    Returns:
        An ASGI app (Starlette) wrapped in the auth, body-limit and metrics middleware.
    """
    lazy_import("starlette", "serve")
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount, Route

    c = server.config

    async def body_of(request: Request) -> bytes:
        return await request.body()

    async def server_metadata(request: Request):
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("huse-edge")
        except PackageNotFoundError:
            v = "0"
        return JSONResponse({"name": "huse", "version": v, "extensions": ["binary_tensor_data"]})

    def model_name(request: Request) -> str:
        name = request.path_params["model"]
        if name not in MODELS:
            raise RequestError(f"unknown model {name!r}; this server has {list(MODELS)}", status=404)
        return name

    async def metadata(request: Request):
        return JSONResponse(model_metadata(model_name(request), server.depth, server.multi_label))

    async def model_ready(request: Request):
        model_name(request)
        return Response(status_code=200 if server.ready else 503)

    async def v1_items(request: Request, parameters: tuple[str, ...]) -> Items:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await _multipart(request, c.max_items, parameters)
        items = parse_v1_items(parse_json_body(await body_of(request)), c.max_items)
        refuse_unknown(items.parameters, ("items", *parameters), f"in a {request.url.path} request")  # e.g. "topk"
        return items

    async def v1_classify(request: Request):
        items = await v1_items(request, CLASSIFY_PARAMETERS)
        classify_parameters(items.parameters)
        results = await server.run(request.receive, CLASSIFY_MODEL, items, request.scope.get(STARTED))
        _count_item_errors(server, results)
        if c.min_confidence > 0:
            for r in results:
                if "top_k" in r:
                    r["needs_review"] = needs_review(r, c.min_confidence)
        return Response(dumps({"results": results}), media_type="application/json")

    async def v1_embed(request: Request):
        items = await v1_items(request, EMBED_PARAMETERS)
        embed_parameters(items.parameters)
        vectors, errors = await server.run(request.receive, EMBED_MODEL, items, request.scope.get(STARTED))
        server.metrics.error("item", len(errors))
        results = [{"index": i, "error": errors[i]} if i in errors else {"index": i, "embedding": v}
                   for i, v in enumerate(vectors.tolist())]
        return Response(dumps({"results": results}), media_type="application/json")

    async def v1_search(request: Request):
        query = parse_json_body(await body_of(request))
        if not isinstance(query, dict):
            raise RequestError('expected a JSON object {"image": base64, "title": str, "k": 10, ...} or {"queries": [...]}')
        return Response(dumps({"results": await server.search(query)}), media_type="application/json")

    async def signin(request: Request):
        """The page's sign-in on a server with --token-file: the token, once, for a session cookie."""
        body = parse_json_body(await body_of(request))
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise RequestError('expected a JSON object {"token": "<the server\'s --token-file>"}')
        if server.config.token is None:
            return JSONResponse({"signed_in": True})  # nothing to sign in to
        if not hmac.compare_digest(token.encode(), server.config.token.encode()):
            await asyncio.sleep(1.0)  # a guess a second, per connection
            raise RequestError("wrong token; ask whoever started the server for its --token-file", status=401)
        response = JSONResponse({"signed_in": True})
        name, value = session_cookie(server.config)
        response.set_cookie(name.decode(), value.decode(), httponly=True, samesite="strict")
        return response

    async def metrics(request: Request):
        data, ctype = server.metrics.render()
        return Response(data, media_type=ctype.split(";")[0], headers={"content-type": ctype})

    def endpoint(path: str, fn):
        """A route that answers its own errors and counts itself (latency, status)."""
        async def wrapped(request: Request):
            start = time.perf_counter()
            try:
                response = await fn(request)
            except Exception as e:
                response = respond_error(server, path, e)
            server.metrics.request(path, response.status_code, time.perf_counter() - start)
            return response
        return wrapped

    table = [("/v2", server_metadata, ["GET"]), ("/v2/models/{model}", metadata, ["GET"]),
             ("/v2/models/{model}/ready", model_ready, ["GET"]),
             ("/v1/classify", v1_classify, ["POST"]), ("/v1/embed", v1_embed, ["POST"]),
             ("/v1/search", v1_search, ["POST"]), ("/metrics", metrics, ["GET"]), (SIGNIN_PATH, signin, ["POST"])]
    api = [Route(path, endpoint(path, fn), methods=methods) for path, fn, methods in table]
    routes = list(extra_routes) + api
    if (STATIC / "index.html").is_file():
        from starlette.staticfiles import StaticFiles
        routes.append(Mount("/", StaticFiles(directory=STATIC, html=True)))

    @asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    return Front(app, server)


async def _multipart(request, max_items: int, parameters: tuple[str, ...]) -> Items:
    """A multipart upload: files `image` (repeatable), fields `title` (repeatable) and the route's `parameters`."""
    lazy_import("multipart", "serve")
    form = await request.form(max_files=max_items, max_fields=max_items + 16)
    try:
        refuse_unknown(form.keys(), ("image", "title", *parameters), "in the upload")  # e.g. a file field 'photo'
        files = [await f.read() for f in form.getlist("image") if hasattr(f, "read")]
        titles = [t for t in form.getlist("title") if isinstance(t, str)]
        params: dict[str, Any] = {}
        for key in parameters:
            if key in form:
                params[key] = int(form[key]) if key == "top_k" and str(form[key]).isdigit() else form[key]
    finally:
        await form.close()
    if files and titles and len(files) != len(titles):
        raise RequestError(f"the upload has {len(files)} images but {len(titles)} titles; send one title per image "
                           f"(an empty title for none), or only images, or only titles")
    n = max(len(files), len(titles))
    if n == 0:
        raise RequestError("the upload holds no 'image' files and no 'title' fields")
    if n > max_items:
        raise RequestError(f"the upload holds {n} items; this server takes at most {max_items} per request", status=413)
    return Items([f or None for f in files] if files else None,
                 [t.encode() if t else None for t in titles] if titles else None, params)


def session_cookie(config: ServeConfig) -> tuple[bytes, bytes]:
    """The page's session cookie on a server with --token-file: (name, value). The value is an HMAC of the
    token, so the cookie never carries the token itself and a new token ends every session; the name has
    the port, because a browser sends a host's cookies to all its ports (two servers, two sessions)."""
    token = config.token.encode()
    return f"huse_session_{config.port}".encode(), hmac.new(token, b"huse-edge page session", "sha256").hexdigest().encode()


def _cookie(header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header, or None."""
    for part in (header or b"").split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return value
    return None


class Front:
    """The ASGI entry of `huse serve`, on raw ASGI messages in front of Starlette. It answers:

    - what a request's headers decide (`at_once`): health probes, and refusals before any body is
      read: a wrong bearer token (401), a body over --max-body-mb (413), a full queue (503 +
      Retry-After, also when the queue's expected wait already exceeds the deadline). Under uvicorn's
      httptools protocol these are written by the protocol itself (`_protocol`), without an ASGI task;
    - `POST /v2/models/{model}/infer`, the hot path: Starlette's routing, middleware and
      Request/Response objects were ~15% of the event loop's samples at concurrency 64 (py-spy).

    Everything else (metadata, /v1, /metrics, the page) goes on to Starlette, whose routes answer
    their own errors (`respond_error`).
    """

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.token = server.config.token.encode() if server.config.token else None
        self.session = session_cookie(server.config) if self.token is not None else None
        self.max_body = int(server.config.max_body_mb * 1024 * 1024)

    def at_once(self, scope) -> tuple[int, bytes, dict[str, str] | None] | None:
        """The answer (status, body, headers) to an HTTP request that its headers decide, counted in the
        metrics; None when it needs its body and the app. Records when the request arrived (scope[STARTED]).

        Under overload most requests are refused here, and the event loop that refuses them also
        answers the health probes: behind Starlette's routing and middleware, or behind an ASGI task
        each, those probes queued with the flood they are meant to see through."""
        started = scope[STARTED] = time.monotonic()
        path, method = scope["path"], scope["method"]
        if path in OPEN_PATHS:
            status = 405 if method not in ("GET", "HEAD") else 200 if path == OPEN_PATHS[0] or self.server.ready \
                else 503
            self.server.metrics.request(path, status, time.monotonic() - started)
            return status, b"", None
        auth = length = cookie = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
            elif name == b"cookie":
                cookie = value
        model = _infer_model(path) if method == "POST" else None
        try:
            if self.token is not None and not self.signed(path, auth, cookie):
                raise RequestError("missing or wrong bearer token; send 'Authorization: Bearer <token>' "
                                   "(the server's --token-file)", status=401)
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise RequestError(f"the request body is {length.decode(errors='replace')} bytes; this server "
                                   f"takes at most {self.max_body} (--max-body-mb)", status=413)
            if method == "POST":
                self.server.shed(model or V1_MODELS.get(path))
        except RequestError as e:
            status, body, headers = error_reply(self.server, INFER_ROUTE if model else "limit", e)
            if model is not None:  # a refusal of another route counts only as an error (its route is Starlette's)
                self.server.metrics.request(INFER_ROUTE, status, time.monotonic() - started)
            return status, body, headers
        return None

    def signed(self, path: str, auth: bytes | None, cookie: bytes | None) -> bool:
        """Whether a request may go on, on a server with a token: the bearer token, or the page's session
        cookie (both compared in constant time); the page's files and its sign-in need neither."""
        if path in PAGE_FILES or path == SIGNIN_PATH:
            return True
        session = _cookie(cookie, self.session[0])
        return hmac.compare_digest(auth or b"", b"Bearer " + self.token) or (
            session is not None and hmac.compare_digest(session, self.session[1]))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if STARTED not in scope:  # else the protocol has asked already (`_protocol`)
            reply = self.at_once(scope)
            if reply is not None:
                return await _send(send, *reply)
        model = _infer_model(scope["path"]) if scope["method"] == "POST" else None
        if model is None:  # the /v1 routes' deadline counts from scope[STARTED] too
            return await self.app(scope, _capped(receive, self.max_body), send)
        started = scope[STARTED]
        header_length = next((v.decode("latin-1") for k, v in scope["headers"]
                              if k == b"inference-header-content-length"), None)
        try:
            body = await _read_body(receive, self.max_body)
            reply, headers = await infer(self.server, model, body, header_length, receive, started)
            status = 200
        except Exception as e:
            status, reply, headers = error_reply(self.server, INFER_ROUTE, e)
        await _send(send, status, reply, headers)
        self.server.metrics.request(INFER_ROUTE, status, time.monotonic() - started)


def _infer_model(path: str) -> str | None:
    """The model named by an inference path /v2/models/{model}/infer, else None."""
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        name = path[len("/v2/models/"):-len("/infer")]
        if name and "/" not in name:
            return name
    return None


async def infer(server: Server, model: str, body: bytes, header_length: str | None, receive,
                started: float) -> tuple[bytes, dict[str, str]]:
    """`POST /v2/models/{model}/infer`: parse, run through the model's batcher, encode.

    Returns:
        (body, headers) of the 200 response.
    Raises:
        RequestError: an unknown model (404), a malformed request (400), overload (503), deadline (504).
    """
    if model not in MODELS:
        raise RequestError(f"unknown model {model!r}; this server has {list(MODELS)}", status=404)
    c = server.config
    req = parse_infer_request(body, header_length, c.max_items)
    ours = [k for k in req.items.parameters if k not in PROTOCOL_PARAMETERS and not k.startswith("triton_")]
    refuse_unknown(ours, CLASSIFY_PARAMETERS if model == CLASSIFY_MODEL else EMBED_PARAMETERS,
                   f"in the parameters of a {model!r} request")  # e.g. "topk" for "top_k"
    if model == CLASSIFY_MODEL:
        classify_parameters(req.items.parameters)  # a bad parameter is a 400 before any work
        results = await server.run(receive, model, req.items, started)
        _count_item_errors(server, results)
        tensors = classify_tensors(results, server.depth, c.min_confidence, server.multi_label)
    else:
        embed_parameters(req.items.parameters)
        vectors, errors = await server.run(receive, model, req.items, started)
        server.metrics.error("item", len(errors))
        tensors = embed_tensors(vectors, errors)
    return encode_infer_response(model, tensors, req)


def _count_item_errors(server: Server, results: list[dict]) -> None:
    server.metrics.error("item", sum("error" in r for r in results))


async def _read_body(receive, limit: int) -> bytes:
    """The whole request body; 413 when it grows past `limit` bytes (chunked, without a Content-Length)."""
    receive, chunks = _capped(receive, limit), []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """One whole response on raw ASGI messages; a 499 (the client has gone) sends nothing."""
    if status == 499:
        return
    head = [(b"content-length", str(len(body)).encode())]
    if headers:
        head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def error_reply(server: Server, route: str, e: BaseException) -> tuple[int, bytes, dict[str, str]]:
    """The one place an error becomes an answer: `{"error": ...}` with the protocol's status, a
    metric and one JSON log line; an unexpected exception is a 500 whose traceback stays in the log.

    Returns:
        (status, body, headers).
    """
    if isinstance(e, ClientGone):
        server.metrics.error("disconnected")
        return 499, b"", {}  # nginx's "client closed request": nothing is sent
    code, message, headers, extra = 500, "internal server error (logged on the server)", {}, {}
    if isinstance(e, RequestError):
        code, message = e.status, str(e)
        if e.retry_after is not None:
            headers["retry-after"] = str(e.retry_after)
    elif isinstance(e, HuseError):
        code, message = 400, str(e)
    else:
        extra = {"exception": f"{type(e).__name__}: {e}",
                 "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}
    kind = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large", 503: "overloaded",
            504: "deadline"}.get(code, "internal")
    server.metrics.error(kind)
    if code not in (401, 503):  # a refused token or a full queue is not worth a line per request
        _log_error(kind, route, code, message, **extra)
    if code == 401:
        headers["www-authenticate"] = "Bearer"
    headers["content-type"] = "application/json"
    return code, dumps({"error": message}), headers


def respond_error(server: Server, route: str, e: BaseException):
    """`error_reply` as a Starlette Response (for the routes behind `Front`)."""
    from starlette.responses import Response

    code, body, headers = error_reply(server, route, e)
    return Response(body if code != 499 else b"", status_code=code, headers=headers)


def _capped(receive, limit: int):
    """`receive` that refuses (413) a body growing past `limit` bytes, e.g. chunked without a Content-Length."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestError(f"the request body passed {limit} bytes; this server takes at most that "
                                   f"(--max-body-mb)", status=413)
        return message
    return wrapped


# -- running it ------------------------------------------------------------------------------
def load_server(config: ServeConfig) -> Server:
    """Verify and open the bundle (one Classifier per instance) and the index: a bad bundle is a
    HuseError here, before any port is opened."""
    from huse.runtime.backends import runner_class

    c = config
    if c.host not in LOOPBACK and not c.token and not c.insecure:
        raise HuseError(f"--host {c.host} exposes the server beyond this machine; give --token-file FILE (clients "
                        f"send 'Authorization: Bearer <token>') or, on a trusted network, --insecure")
    for name, value in (("--max-batch", c.max_batch), ("--max-queue", c.max_queue), ("--instances", c.instances),
                        ("--max-items", c.max_items), ("--threads", c.threads), ("--workers", c.workers)):
        if value is not None and value < 1:  # --threads and --workers: None is the default
            raise HuseError(f"{name} must be at least 1; got {value}")
    # Past 65535 the port wrapped (70000 listened on 4464) while the server announced the number asked for.
    for name, value, low, high in (("--port", c.port, 1, 65535), ("--worker-nice", c.worker_nice, 0, 19)):
        if not low <= value <= high:
            raise HuseError(f"{name} must be from {low} to {high}; got {value}")
    for name, value in (("--max-delay-ms", c.max_delay_ms), ("--grace", c.grace_s)):
        if value < 0:
            raise HuseError(f"{name} must be 0 or more; got {value}")
    for name, value in (("--timeout", c.timeout_s), ("--max-body-mb", c.max_body_mb)):
        if value <= 0:
            raise HuseError(f"{name} must be more than 0; got {value}")
    if not 0.0 <= c.min_confidence <= 1.0:
        raise HuseError(f"--min-confidence must be between 0 and 1; got {c.min_confidence}")
    if c.backend != "auto":
        runner_class(c.backend)  # a misspelt name, before the port opens
    keys = list(c.trusted_keys) or None
    # Verified here, before the port opens (labels and hierarchy for metadata and the page); the model
    # process opens the bundle again to run it. Not a Classifier: on a GPU machine choosing its backend
    # opens a CUDA context, which the front has no use for.
    manifest = load_manifest(c.bundle, trusted_keys=keys)
    require_precision(manifest, c.bundle, c.precision)
    index = None
    if c.index:
        from huse.runtime.index import Index

        index = Index.open(c.index, bundle=c.bundle, trusted_keys=keys)
    return Server(c, manifest, index)


def serve(config: ServeConfig, extra_routes: Sequence[Any] | Callable[[Server], Sequence[Any]] = ()) -> None:
    """Run `huse serve` until SIGTERM or Ctrl+C: stop accepting, finish in-flight requests within
    `grace_s`, exit 0.

    Raises:
        HuseError: a bad bundle, index or option (before the port opens), or a missing extra.
    """
    uvicorn = lazy_import("uvicorn", "serve")
    server = load_server(config)
    _check_port(config.host, config.port)
    # routes that need the loaded server (the page's: its index and labels) come as a function of it
    app = create_app(server, extra_routes(server) if callable(extra_routes) else extra_routes)
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    cfg = uvicorn.Config(app, host=config.host, port=config.port, loop=loop, http=_protocol(http, app), log_level="warning",
                         access_log=False, timeout_graceful_shutdown=config.grace_s, lifespan="on",
                         limit_concurrency=config.max_connections, timeout_keep_alive=5,
                         proxy_headers=False)  # no proxy in front: its middleware would only cost
    _log_json_lines()
    _raise_fd_limit()
    # uvicorn re-raises the signal it stopped on once it is done; a SIGTERM or Ctrl+C it has already
    # handled gracefully must then end the process with 0, not as killed (or click's "Aborted!", exit 1).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(cfg).run()
    if server.failed:
        raise HuseError(server.failed)


def _check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on before the model process starts (uvicorn would say so in a
    log line of its own, after the model loaded, and exit 3)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise HuseError(f"--host {host} is not an address of this machine ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            raise HuseError(f"cannot listen on {host}:{port} ({e.strerror}): another server may be using it; stop it "
                            "or choose another --port") from None


class _OneWrite:
    """A connection's transport that holds a write until the next write or the end of the current
    event-loop step, then sends what it holds in one call.

    uvicorn writes a response's status line and headers, then its body, in two calls: two system
    calls and two TCP segments per response, each waking the client. The transport's other
    methods are the wrapped one's.
    """

    def __init__(self, transport):
        self._transport, self._held, self._loop = transport, [], asyncio.get_running_loop()

    def write(self, data) -> None:
        if self._held:
            self._held.append(data)
            self.flush()
        else:
            self._held.append(data)
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def _protocol(http: str, front: Front) -> type:
    """uvicorn's HTTP protocol class `http` (httptools or h11), its transport wrapped in `_OneWrite`.

    Under httptools, a request that `front.at_once` answers from its headers is answered by the
    protocol as soon as they are parsed, in the same event-loop step: no ASGI task, ASGI messages or
    header checks. Under 4x overload most requests are such refusals, and the event loop that makes
    them also answers health probes. Against the ASGI path, in 3 interleaved rounds of 10 s at 7,900
    req/s offered to an int8-cpu server (2 cores): health p50 14-16 ms vs 21-73 ms, max 157-334 ms vs
    643-1,173 ms, and 16% more requests served. The body the client still sends is skipped by
    uvicorn's parser (the cycle is complete); keep-alive and pipelining go on as after uvicorn's own
    responses. A client that asked to close after the request (`Connection: close`) gets a lingering
    close: its connection closes once its body has arrived (or after the keep-alive timeout), not while
    it is still sending. h11 (without httptools), or a uvicorn whose protocol has no `_start_asgi_task`,
    goes through `Front.__call__`, which asks `at_once` the same (checked by hand with h11).
    """
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS[http])

    class Protocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(_OneWrite(transport))

        _lingering = False

        def _start_asgi_task(self, cycle, app) -> None:  # httptools: each request's ASGI task starts here
            reply = front.at_once(cycle.scope)
            if reply is None:
                return super()._start_asgi_task(cycle, app)
            cycle.response_started = cycle.response_complete = True
            self.transport.write(_head(*reply, self.server_state.default_headers, cycle.keep_alive))
            if not cycle.keep_alive:
                # A lingering close, as nginx and Apache do: the client may still be sending its body, and
                # closing now would answer those bytes with a reset that loses the response. Close once the
                # body has arrived (on_message_complete), or after the keep-alive timeout at the latest.
                self._lingering = True
                self.loop.call_later(self.timeout_keep_alive, self._close)
            self.on_response_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self._lingering:
                self._close()

        def _close(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return Protocol


_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def _head(status: int, body: bytes, headers: dict[str, str] | None, default_headers, keep_alive: bool) -> bytes:
    """A whole HTTP/1.1 response as uvicorn writes one: its default headers (date, server) first."""
    lines = [_STATUS_LINES[status]]
    for name, value in default_headers:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"content-length: %d\r\n" % len(body))
    for name, value in (headers or {}).items():
        lines += [name.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines += [b"\r\n", body]
    return b"".join(lines)


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def _raise_fd_limit() -> None:
    """Each connection holds a file descriptor: take the hard limit, so a few thousand idle
    clients cannot exhaust a soft limit of 1,024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
