"""The routes behind the web page (static/index.html): what the page needs beside the /v1 API.

GET /ui/config                 what this server offers (index, visual space, review, labels)
GET /ui/item/{item}/image      an index item's photo as a thumbnail (?size=96|192|384)
GET /ui/item/{item}/photo      an index item's photo as stored (the page searches from it)
/ui/review/...                 the review queue (review.py's ReviewQueue), when started with --review
POST /ui/signin                the token for a session cookie, with --token-file (app.py: auth is the front's)

Photos are looked up by item number in the server's own index, and read only from under the
images folder the operator names (--images), or from the index itself where it keeps the photos
a Parquet catalog held as bytes; a path never comes from a client.
Starlette is imported when the routes are made, so this module imports with the core only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from huse.runtime.errors import HuseError
from huse.runtime.serve.review import ReviewQueue
from huse.runtime.serve.thumbs import SIZES, Thumbnails, media_type

__all__ = ["page_for", "page_routes", "review_routes", "image_response", "json_error", "read_json"]

log = logging.getLogger("huse.serve")
MAX_BODY = 64 * 1024  # a decision is a few hundred bytes


def json_error(message: str, status: int):
    """`{"error": message}` with `status`, the protocol's error form."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def read_json(request) -> Any:
    """The request's JSON body, or a 400/413 JSONResponse saying what is wrong with it."""
    body = await request.body()
    if len(body) > MAX_BODY:
        return json_error(f"the body is {len(body)} bytes; at most {MAX_BODY} here", 413)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        return json_error(f"the request body is not valid JSON ({e}); send a JSON object", 400)


def image_response(thumbs: Thumbnails | None, path: str | Path | None, size: str | None,
                   kept: tuple[Any, bytes] | None = None):
    """The Starlette response for a photo: the JPEG thumbnail, or a JSON error (404: no photo,
    403: outside the images folder, 422: not a usable image, 400: a bad size). `kept`: (its cache key,
    the encoded photo) of a photo held as bytes, shown instead of the file at `path`."""
    from starlette.responses import Response

    if kept is None and path is None:
        return json_error("this product has no photo", 404)
    if kept is None and thumbs is None:
        return json_error("the server was started without --images, so it shows no photos; "
                          "restart it with --images FOLDER (the catalog's images folder)", 404)
    try:
        n = int(size) if size else SIZES[1]
    except ValueError:
        n = -1
    if n not in SIZES:
        return json_error(f"size must be one of {list(SIZES)}; got {size!r}", 400)
    if kept is not None:
        try:
            data = thumbs.of_bytes(*kept, n)
        except HuseError as e:
            return json_error(str(e), 422)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
    try:
        file = thumbs.confine(path)
    except HuseError as e:
        return json_error(str(e), 403)
    try:
        data = thumbs.get(file, n)
    except HuseError as e:
        return json_error(str(e), 422 if os.path.isfile(file) else 404)
    # private: the photos are the operator's catalog, not for shared caches
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def review_routes(queue: ReviewQueue, thumbs: Thumbnails) -> list:
    """The review API under /ui/review (Starlette routes; sync endpoints, and the fsync of a
    decision, run in Starlette's thread pool, so the disk never blocks the event loop).

    GET  /ui/review/state                   progress, labels, journal
    GET  /ui/review/items?after=P&limit=N   the next undecided items
    POST /ui/review/decide                  {"row", "action", "label"?, "reviewer"?} -> saved (after fsync)
    GET  /ui/review/image/{row}?size=S      the row's photo as a thumbnail (from the images folder only)

    Args:
        queue: the ReviewQueue.
        thumbs: a `Thumbnails` over the catalog's images folder.
    Returns:
        A list of `starlette.routing.Route`.
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route


    def state(request):
        return JSONResponse({"progress": queue.progress(), "labels": queue.labels, "journal": str(queue.journal.path),
                             "catalog": str(queue.catalog)})

    def items(request):
        try:
            after, limit = int(request.query_params.get("after", -1)), int(request.query_params.get("limit", 20))
        except ValueError:
            return json_error("after and limit must be integers", 400)
        return JSONResponse({"items": [it.to_dict() for it in queue.page(after, limit)], "progress": queue.progress()})

    async def decide(request):
        body = await read_json(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            row = int(body["row"])
            # the fsync runs in the thread pool: the event loop keeps serving while the disk works
            return JSONResponse(await run_in_threadpool(queue.decide, row, str(body.get("action")), body.get("label"),
                                                        body.get("reviewer")))
        except (KeyError, TypeError, ValueError):
            return json_error('a decision is {"row": int, "action": "accept"|"correct"|"skip", "label": str}', 400)
        except HuseError as e:
            return json_error(str(e), 400)

    held = Thumbnails(queue.photos)  # copies of the photos a Parquet catalog holds (nothing else is read there)

    def image(request):
        try:
            path = queue.image_path(int(request.path_params["row"]))
        except HuseError as e:
            return json_error(str(e), 404)
        mine = path is not None and os.path.dirname(path) == str(held.root)
        return image_response(held if mine else thumbs, path, request.query_params.get("size"))

    return [Route("/ui/review/state", state), Route("/ui/review/items", items),
            Route("/ui/review/decide", decide, methods=["POST"]),
            Route("/ui/review/image/{row:int}", image)]


def page_routes(labels: list[str], index=None, images: str | Path | None = None, review=None) -> list:
    """The page's routes, to mount before the API (`create_app(extra_routes=...)`).

    Args:
        labels: the bundle's leaf classes (the page offers their prefixes as search filters).
        index: the open `Index` the server searches, or None.
        images: the folder product photos are served from (None: no photos are served).
        review: a `ReviewQueue`, or None (its photos come from its catalog's images folder).
    Returns:
        A list of `starlette.routing.Route`.
    """
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    thumbs = Thumbnails(images) if images is not None else None
    held = Thumbnails() if index is not None and index.holds_photos else None  # the photos the index keeps

    def config(request):
        return JSONResponse({
            "index": index is not None, "visual": bool(index is not None and index.has_visual),
            "items": len(index) if index is not None else 0, "photos": thumbs is not None,
            "held_photos": held is not None, "review": review is not None, "labels": labels})

    def item_photo_of(request) -> tuple[int, str | None, bytes | None]:
        """The requested item, its photo's path, and the photo the index keeps for it (a Parquet catalog's
        bytes, where it has no path)."""
        if index is None:
            raise HuseError("the server was started without --index")
        item = int(request.path_params["item"])
        path = index.records([item])[item]["image"]  # HuseError for an item the index does not hold
        return item, path, index.photo(item) if held is not None and path is None else None

    def item_image(request):
        try:
            item, path, data = item_photo_of(request)
        except HuseError as e:
            return json_error(str(e), 404)
        size = request.query_params.get("size")
        return image_response(thumbs, path, size) if data is None else image_response(held, path, size, kept=(item, data))

    def item_photo(request):
        try:
            _, path, data = item_photo_of(request)
            if data is None and (thumbs is None or path is None):
                return image_response(thumbs, path, None)
            data, kind = (data, media_type(data)) if data is not None else thumbs.original(path)
        except HuseError as e:
            return json_error(str(e), 404)
        return Response(data, media_type=kind, headers={"Cache-Control": "private, max-age=3600"})

    routes = [Route("/ui/config", config), Route("/ui/item/{item:int}/image", item_image),
              Route("/ui/item/{item:int}/photo", item_photo)]
    if review is not None:
        routes += review_routes(review, Thumbnails(review.images))
    return routes


def page_for(review: str | Path | None = None, catalog: str | Path | None = None, images: str | Path | None = None,
             journal: str | Path | None = None):
    """What `huse serve --review/--catalog/--images/--journal` mounts: a function of the loaded
    server (its labels and index) that returns the page's routes (`serve(config, extra_routes=...)`).

    Args:
        review: PREDS from `huse classify` to review, or None.
        catalog: the catalog PREDS was made from (needed with `review`).
        images: the folder photos are served from (default: the catalog's folder, else none).
        journal: the review journal (default: beside PREDS).
    Returns:
        server -> list of routes.
    Raises:
        HuseError: options that do not go together, before anything loads.
    """
    if review is not None and catalog is None:
        raise HuseError("--review PREDS needs --catalog CATALOG, the catalog PREDS was made from "
                        "(the review shows its photos and titles)")
    if journal is not None and review is None:
        raise HuseError("--journal is the journal of a review; give --review PREDS --catalog CATALOG too")
    if catalog is not None and not Path(catalog).is_file():
        raise HuseError(f"--catalog {catalog} does not exist")
    if images is None and catalog is not None:
        images = Path(catalog).parent
    if images is not None and not Path(images).is_dir():
        raise HuseError(f"--images {images} is not a folder")

    def routes(server) -> list:
        labels = list(server.labels)
        queue = ReviewQueue(review, catalog, labels, journal=journal, images=images) if review is not None else None
        if queue is not None:
            p = queue.progress()
            log.info(json.dumps({"event": "review", "rows": p["total"], "done": p["done"],
                                 "journal": str(queue.journal.path)}))
        return page_routes(labels, index=server.index, images=images, review=queue)
    return routes
