"""The wire formats of `huse serve`, as pure functions (no HTTP server here).

Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST API): JSON requests and responses
with `inputs`/`outputs` of `name`, `datatype`, `shape`, `data`, plus Triton's binary-data
extension (the JSON header first, its length in the `Inference-Header-Content-Length` header,
then the raw tensors; a BYTES tensor is each element as a 4-byte little-endian length and its
bytes). JSON cannot carry raw bytes, so in JSON an `image` element is base64 text and a `title`
element is plain text; with the binary extension both are raw bytes. An empty element means
"none" (no photo, no title). Also the /v1 JSON codecs. Errors are `RequestError`s that carry
the HTTP status the protocol gives; the app writes them as `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from huse.runtime.classifier import MODES
from huse.runtime.errors import HuseError
from huse.runtime.labels import needs_review
from huse.runtime.preprocess import is_url

CLASSIFY_MODEL, EMBED_MODEL = "huse", "huse_embed"
MODELS = (CLASSIFY_MODEL, EMBED_MODEL)
INPUTS = ("image", "title")
SPACES = ("universal", "visual")
HEADER_LENGTH = "Inference-Header-Content-Length"
# Datatypes a request may use for an input, and their numpy dtypes (what a binary tensor decodes to).
NUMPY_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
               "FP32": np.float32, "FP64": np.float64}


class RequestError(HuseError):
    """A request the server will not run, with the HTTP status to answer it with (400 by default).

    Args:
        message: what was asked, what was found, what to do.
        status: 400 malformed, 404 unknown model or route, 413 too large, 503 overloaded, 504 deadline.
        retry_after: seconds, for 503 (the Retry-After header).
    """

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class Items:
    """What a request asks about, one entry per item: photo bytes and title bytes (None: absent)."""

    images: list[bytes | None] | None
    titles: list[bytes | None] | None
    parameters: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images if self.images is not None else self.titles)


@dataclass
class InferRequest:
    """A parsed `POST /v2/models/{model}/infer`.

    `outputs` is None when the request names none (then every output is sent); each entry is
    (name, binary) with binary None when the request left it to `binary_default`.
    """

    items: Items
    id: str | None = None
    outputs: list[tuple[str, bool | None]] | None = None
    binary_default: bool = False


# -- requests --------------------------------------------------------------------------------
def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object") from None


def _split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """Elements of a binary BYTES tensor: each a 4-byte little-endian length then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise RequestError(f"input {name!r}: binary BYTES data ends inside an element's 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise RequestError(f"input {name!r}: element {len(out)} says {size} bytes but only {len(raw) - pos} remain")
        out.append(raw[pos:pos + size])
        pos += size
    if len(out) != count:
        raise RequestError(f"input {name!r}: the shape says {count} elements but the binary data holds {len(out)}")
    return out


def _shape_items(name: str, shape: Any) -> int:
    if (not isinstance(shape, list) or not shape or len(shape) > 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or (len(shape) == 2 and shape[1] != 1)):
        raise RequestError(f"input {name!r} has shape {shape!r}; expected [N] or [N, 1] (one element per item)")
    return shape[0]


def _element(name: str, value: Any, i: int, binary: bool) -> bytes | None:
    if binary:
        return value or None
    if not isinstance(value, str):
        raise RequestError(f"input {name!r} element {i} is a {type(value).__name__}; BYTES elements in JSON are "
                           f"strings ({'base64 of the photo' if name == 'image' else 'the title'})")
    if not value:
        return None
    if name == "title":
        return value.encode("utf-8", errors="surrogatepass")
    if value.startswith("data:") and ";base64," in value[:100]:  # a data URL, as a browser's FileReader makes
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        hint = (" (the server never reads a URL or a file path: send the photo's bytes)"
                if is_url(value) or value.startswith("/") else "")
        raise RequestError(f"input 'image' element {i} is not base64{hint}; in JSON send each photo base64-encoded, "
                           f"or use the binary-data extension") from None


def parse_infer_request(body: bytes, header_length: str | None = None, max_items: int | None = None) -> InferRequest:
    """Parse an inference request of the `huse` or `huse_embed` model.

    Args:
        body: the whole request body.
        header_length: the `Inference-Header-Content-Length` header, when binary tensors follow the JSON.
        max_items: refuse requests with more items than this (413).
    Returns:
        The items, the request id, the outputs asked for.
    Raises:
        RequestError: malformed JSON, unknown inputs, wrong datatype or shape, inconsistent binary data.
    """
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} is {header_length!r}; expected the JSON header's length in bytes") from None
        if not 0 <= size <= len(body):
            raise RequestError(f"{HEADER_LENGTH} is {size} but the body holds {len(body)} bytes")
        head, binary = body[:size], memoryview(body)[size:]
    else:
        head, binary = body, memoryview(b"")
    req = _json(head)
    if not isinstance(req, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("the request has no 'inputs' list; send inputs 'image' and/or 'title' (BYTES, shape [N])")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be a JSON object")
    values: dict[str, list[bytes | None]] = {}
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise RequestError("each entry of 'inputs' must be an object with name, datatype, shape and data")
        name = tensor.get("name")
        if name not in INPUTS:
            raise RequestError(f"unknown input {name!r}; this model takes {list(INPUTS)}")
        if name in values:
            raise RequestError(f"input {name!r} is given twice")
        if tensor.get("datatype") != "BYTES":
            raise RequestError(f"input {name!r} has datatype {tensor.get('datatype')!r}; expected 'BYTES' "
                               f"({'encoded JPEG/PNG/WebP bytes' if name == 'image' else 'UTF-8 text'})")
        n = _shape_items(name, tensor.get("shape"))
        tparams = tensor.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                                   f"binary bytes left after the JSON header")
            elements: list[Any] = _split_bytes(bytes(binary[offset:offset + size]), n, name)
            offset += size
        else:
            elements = tensor.get("data")
            if not isinstance(elements, list):
                raise RequestError(f"input {name!r} has no 'data' list (nor binary_data_size)")
            if elements and isinstance(elements[0], list):  # the protocol allows nested rows for [N, 1]
                elements = [x for row in elements for x in (row if isinstance(row, list) else [row])]
            if len(elements) != n:
                raise RequestError(f"input {name!r}: the shape says {n} elements but 'data' holds {len(elements)}")
        values[name] = [_element(name, v, i, size is not None) for i, v in enumerate(elements)]
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} binary bytes after the JSON header belong to no input")
    counts = {k: len(v) for k, v in values.items()}
    if len(set(counts.values())) > 1:
        raise RequestError(f"inputs have different item counts {counts}; give one element per item in each")
    n = next(iter(counts.values()))
    if n == 0:
        raise RequestError("the request holds no items (shape [0])")
    if max_items is not None and n > max_items:
        raise RequestError(f"the request holds {n} items; this server takes at most {max_items} per request "
                           f"(--max-items): split it", status=413)
    outputs = req.get("outputs")
    wanted = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise RequestError("'outputs' must be a list of objects with a 'name'")
        wanted = [(o["name"], (o.get("parameters") or {}).get("binary_data")) for o in outputs]
    rid = req.get("id")
    return InferRequest(Items(values.get("image"), values.get("title"), params),
                        id=str(rid) if rid is not None else None, outputs=wanted,
                        binary_default=bool(params.get("binary_data_output", False)))


# Request parameters the Open Inference Protocol and Triton's clients set themselves (tritonclient's
# TRITON_RESERVED_REQUEST_PARAMS, and any "triton_..."): never taken for a misspelt model parameter.
PROTOCOL_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
                       "binary_data_output")
CLASSIFY_PARAMETERS = ("top_k", "mode")  # what a classify request may set (/v1: beside "items")
EMBED_PARAMETERS = ("space",)
ITEM_FIELDS = ("image", "title")  # a /v1 item's, and a search query's


def refuse_unknown(given: Any, allowed: Sequence[str], where: str) -> None:
    """A 400 naming the fields of `given` that `allowed` lacks: a misspelt field is said, not ignored."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown} {where}; it takes {list(allowed)}")


def classify_parameters(params: dict[str, Any]) -> tuple[int, str]:
    """`top_k` and `mode` of a classify request (defaults 5 and "auto").

    Raises:
        RequestError: a top_k that is not a positive integer, an unknown mode.
    """
    top_k = params.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 1000:
        raise RequestError(f"parameter top_k is {top_k!r}; expected an integer from 1 to 1000")
    mode = params.get("mode", "auto")
    if mode not in MODES:
        raise RequestError(f"parameter mode is {mode!r}; expected one of {list(MODES)}")
    return top_k, mode


def embed_parameters(params: dict[str, Any]) -> str:
    """`space` of an embed request (default "universal")."""
    space = params.get("space", "universal")
    if space not in SPACES:
        raise RequestError(f"parameter space is {space!r}; expected one of {list(SPACES)}")
    return space


# -- responses -------------------------------------------------------------------------------
def classify_tensors(results: list[dict[str, Any]], depth: int, min_confidence: float = 0.0,
                     multi_label: bool = False) -> dict[str, tuple[str, np.ndarray]]:
    """The `huse` model's output tensors from `Classifier.classify`-style results.

    Args:
        results: one dict per item (top_k, path, mode, error, warning; labels for multi-label).
        depth: the hierarchy's depth L (path columns; shorter paths padded with "" and 0).
        min_confidence: top-1 below it (a multi-label item: any of its labels) sets needs_review.
        multi_label: the bundle is multi-label: add `labels`, each item's label set as the JSON
            /v1/classify gives ([{"label", "score", "threshold", "path"}], "" for a failed item),
            since a set of any size with its paths fits no fixed-shape tensor.
    Returns:
        name -> (datatype, array), one row per item.
    """
    n = len(results)
    k = max((len(r["top_k"]) for r in results if "top_k" in r), default=0)
    labels = np.full((n, k), b"", dtype=object)
    scores = np.zeros((n, k), dtype=np.float32)
    path_labels = np.full((n, depth), b"", dtype=object)
    path_scores = np.zeros((n, depth), dtype=np.float32)
    mode, error, warning = (np.full((n, 1), b"", dtype=object) for _ in range(3))
    review = np.zeros((n, 1), dtype=bool)
    for i, r in enumerate(results):
        error[i, 0] = r.get("error", "").encode()
        warning[i, 0] = r.get("warning", "").encode()
        if "top_k" not in r:
            continue
        mode[i, 0] = r["mode"].encode()
        for j, t in enumerate(r["top_k"]):
            labels[i, j], scores[i, j] = t["label"].encode(), t["score"]
        for j, p in enumerate(r["path"]):
            path_labels[i, j], path_scores[i, j] = p["label"].encode(), p["score"]
        review[i, 0] = needs_review(r, min_confidence)
    tensors = {"top_k_labels": ("BYTES", labels), "top_k_scores": ("FP32", scores),
               "path_labels": ("BYTES", path_labels), "path_scores": ("FP32", path_scores),
               "mode": ("BYTES", mode), "needs_review": ("BOOL", review),
               "error": ("BYTES", error), "warning": ("BYTES", warning)}
    if multi_label:
        sets = np.full((n, 1), b"", dtype=object)
        for i, r in enumerate(results):
            if "labels" in r:
                sets[i, 0] = dumps(r["labels"])
        tensors["labels"] = ("BYTES", sets)
    return tensors


def embed_tensors(vectors: np.ndarray, errors: dict[int, str]) -> dict[str, tuple[str, np.ndarray]]:
    """The `huse_embed` model's output tensors: embedding (N, D) FP32 with NaN rows, error (N, 1)."""
    error = np.full((len(vectors), 1), b"", dtype=object)
    for i, e in errors.items():
        error[i, 0] = e.encode()
    return {"embedding": ("FP32", vectors.astype(np.float32, copy=False)), "error": ("BYTES", error)}


def _binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype]).tobytes()


def _json_data(datatype: str, array: np.ndarray) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [x.decode("utf-8", errors="replace") for x in flat]
    if datatype == "FP32":  # JSON has no NaN: a failed item's row is null
        return [None if math.isnan(x) else x for x in flat.tolist()]
    return flat.tolist()


def encode_infer_response(model: str, tensors: dict[str, tuple[str, np.ndarray]], request: InferRequest
                          ) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for `tensors`, in JSON or with binary outputs as asked.

    Returns:
        (body, headers): headers carry Content-Type, and Inference-Header-Content-Length when
        binary outputs follow the JSON.
    Raises:
        RequestError: the request asked for an output the model does not have.
    """
    wanted = request.outputs if request.outputs is not None else [(name, None) for name in tensors]
    outputs, chunks = [], []
    for name, binary in wanted:
        if name not in tensors:
            raise RequestError(f"model {model!r} has no output {name!r}; it has {list(tensors)}")
        datatype, array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.binary_default if binary is None else binary:
            raw = _binary(datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(datatype, array)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, ensure_ascii=False).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(model: str, depth: int, multi_label: bool = False) -> dict[str, Any]:
    """`GET /v2/models/{model}`: inputs and outputs with name, datatype and shape (-1: any size);
    a multi-label bundle's `huse` adds `labels` (`classify_tensors`)."""
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
              {"name": "title", "datatype": "BYTES", "shape": [-1]}]
    if model == CLASSIFY_MODEL:
        outputs = [{"name": "top_k_labels", "datatype": "BYTES", "shape": [-1, -1]},
                   {"name": "top_k_scores", "datatype": "FP32", "shape": [-1, -1]},
                   {"name": "path_labels", "datatype": "BYTES", "shape": [-1, depth]},
                   {"name": "path_scores", "datatype": "FP32", "shape": [-1, depth]},
                   {"name": "mode", "datatype": "BYTES", "shape": [-1, 1]},
                   {"name": "needs_review", "datatype": "BOOL", "shape": [-1, 1]},
                   {"name": "error", "datatype": "BYTES", "shape": [-1, 1]},
                   {"name": "warning", "datatype": "BYTES", "shape": [-1, 1]}]
        if multi_label:
            outputs.append({"name": "labels", "datatype": "BYTES", "shape": [-1, 1]})
    else:
        outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]},
                   {"name": "error", "datatype": "BYTES", "shape": [-1, 1]}]
    return {"name": model, "versions": ["1"], "platform": "huse", "inputs": inputs, "outputs": outputs}


# -- /v1 JSON --------------------------------------------------------------------------------
def parse_v1_items(req: Any, max_items: int | None = None) -> Items:
    """`{"items": [{"image": base64, "title": str}, ...], ...other parameters}` -> Items; one item may also
    come as the object itself, `{"image": base64, "title": str, ...other parameters}` (as a /v1/search query).

    Raises:
        RequestError: not an object, no items, an item that is not an object, bad base64.
    """
    if isinstance(req, dict) and "items" not in req and any(k in req for k in ITEM_FIELDS):
        req = {k: v for k, v in req.items() if k not in ITEM_FIELDS} | {"items": [{k: req[k] for k in ITEM_FIELDS if k in req}]}
    if not isinstance(req, dict) or not isinstance(req.get("items"), list) or not req["items"]:
        raise RequestError('expected a JSON object {"items": [{"image": "<base64>", "title": "..."}, ...]}, '
                           'or one item {"image": "<base64>", "title": "..."}')
    items = req["items"]
    if max_items is not None and len(items) > max_items:
        raise RequestError(f"the request holds {len(items)} items; this server takes at most {max_items} per request "
                           f"(--max-items): split it", status=413)
    images, titles = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(f"item {i} must be an object with 'image' (base64) and/or 'title' (text)")
        if set(item) - set(ITEM_FIELDS):
            raise RequestError(f"item {i} has {sorted(set(item) - set(ITEM_FIELDS))}: an item holds only 'image' "
                               "(base64) and/or 'title' (text); request parameters (top_k, k, ...) go beside the list, not in an item")
        img, title = item.get("image"), item.get("title")
        images.append(None if img is None else _element("image", img, i, False))
        if title is not None and not isinstance(title, str):
            raise RequestError(f"item {i}: 'title' must be a string")
        titles.append(title.encode("utf-8", errors="surrogatepass") if title else None)
    params = {k: v for k, v in req.items() if k != "items"}
    return Items(images, titles, params)


def parse_json_body(body: bytes) -> Any:
    """The JSON of a /v1 request body (RequestError when it is not JSON)."""
    return _json(body)


def dumps(obj: Any) -> bytes:
    """JSON bytes of a response (NaN, which JSON lacks, as null)."""
    return json.dumps(_nan_to_none(obj), ensure_ascii=False).encode()


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj
