"""Triton Inference Server Python-backend model for a huse bundle (written by `huse-export BUNDLE --triton REPO`).

One file serves both models of the repository, chosen by the config parameter `task`:
- `huse` (classify): inputs `image` (BYTES, encoded JPEG/PNG; empty = no photo) and `title` (BYTES,
  UTF-8; empty = no title), each [N, 1]; outputs `top_k_labels` BYTES [N, K], `top_k_scores` FP32
  [N, K], `path_labels` BYTES [N, L], `path_scores` FP32 [N, L] (L = hierarchy depth, "" / 0
  padding), `mode`, `error`, `warning` BYTES [N, 1] ("" when none) and `needs_review` BOOL [N, 1].
  K is 5 unless the request parameter `top_k` says otherwise (at most the number of classes); `min_confidence` (request parameter,
  else the config's) marks top-1 scores below it `needs_review`.
- `huse_embed` (embed): the same inputs; outputs `embedding` FP32 [N, D] (the photo's universal
  embedding, else the title's, as `huse embed` does; NaN for a failed item) and `error` BYTES [N, 1].

It needs only the lean runtime in Triton's Python environment (`pip install 'huse-edge[ort]'`, or
`huse-edge[trt]` with TensorRT on Jetson): no torch. Triton's dynamic batcher hands `execute` several
requests; their items are classified as one batch. A bad item gets its own `error`; it never fails
the other items or requests. The request helpers below are plain numpy, so the benchmark's PyTriton
anchor (huse.benchmarks.pytriton_anchor) runs exactly this code around the same Classifier.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # loaded outside Triton for its request helpers (the PyTriton anchor)
    pb_utils = None

DEFAULT_TOP_K = 5
# A request is (images, titles, parameters): images and titles are object arrays of bytes, [n, 1] or [n]
# (None when the request has no such input), parameters the request's parameters as a dict.
Request = tuple[Any, Any, dict[str, Any]]


def _column(values: Any, n: int) -> list[bytes | None]:
    """One BYTES input as a list of n entries, an empty element meaning "none"."""
    if values is None:
        return [None] * n
    flat = np.asarray(values, dtype=object).reshape(n, -1)[:, 0]
    return [bytes(v) if v is not None and len(v) else None for v in flat]


def _count(images: Any, titles: Any) -> int:
    given = [np.asarray(v, dtype=object) for v in (images, titles) if v is not None]
    if not given:
        raise ValueError("a request needs an `image` or a `title` input")
    n = len(given[0])
    if any(len(g) != n for g in given):
        raise ValueError(f"`image` has {len(given[0])} rows but `title` has {len(given[-1])}; send one of each per item")
    return n


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)) or not str(value).isdigit() \
            or int(value) < 1:
        raise ValueError(f"request parameter {name} must be a positive integer, got {value!r}")
    return int(value)


def _text(values: list[str], n: int) -> np.ndarray:
    return np.asarray([v.encode("utf-8") for v in values], dtype=object).reshape(n, -1)


def classify_requests(clf, requests: list[Request], min_confidence: float = 0.0) -> list[dict[str, np.ndarray]]:
    """Classify the items of several requests as one batch; one output dict per request.

    Args:
        clf: a huse.runtime.Classifier.
        requests: (images, titles, parameters) per request.
        min_confidence: top-1 score below which `needs_review` is true, unless a request says otherwise.
    Returns:
        Per request: its output arrays, or {"_error": message} for a request that is malformed as a whole.
    """
    depth = clf.hierarchy.depth
    sizes, images, titles, asks, out = [], [], [], [], []
    for imgs, txts, params in requests:
        try:
            n = _count(imgs, txts)
            ask = (_positive_int(params.get("top_k", DEFAULT_TOP_K), "top_k"),
                   float(params.get("min_confidence", min_confidence)))
        except (TypeError, ValueError) as e:
            sizes.append(None)
            asks.append(str(e))
            continue
        sizes.append(n)
        asks.append(ask)
        images += _column(imgs, n)
        titles += _column(txts, n)
    results = []
    if images:
        has_image = any(v is not None for v in images)
        # Titles go in whenever there are no photos, so that items with neither get their own error.
        prepared = clf.prepare(images if has_image else None,
                               titles if any(v is not None for v in titles) or not has_image else None)
        k_max = max(a[0] for a in asks if isinstance(a, tuple))
        results = clf.describe(prepared, clf.infer(prepared), top_k=k_max)
    start = 0
    for n, ask in zip(sizes, asks):
        if n is None:
            out.append({"_error": ask})
            continue
        (k, threshold), part = ask, results[start:start + n]
        k = min(k, len(clf.labels))  # as Classifier.classify: never more classes than the bundle has
        start += n
        labels, scores = [[""] * k for _ in part], np.zeros((n, k), np.float32)
        path_labels, path_scores = [[""] * depth for _ in part], np.zeros((n, depth), np.float32)
        review = np.zeros((n, 1), bool)
        for i, r in enumerate(part):
            for j, t in enumerate(r.get("top_k", [])[:k]):
                labels[i][j], scores[i, j] = t["label"], t["score"]
            for j, p in enumerate(r.get("path", [])):
                path_labels[i][j], path_scores[i, j] = p["label"], p["score"]
            review[i, 0] = "error" not in r and r["top_k"][0]["score"] < threshold
        out.append({
            "top_k_labels": np.asarray([[s.encode("utf-8") for s in row] for row in labels], dtype=object).reshape(n, k),
            "top_k_scores": scores,
            "path_labels": np.asarray([[s.encode("utf-8") for s in row] for row in path_labels],
                                      dtype=object).reshape(n, depth),
            "path_scores": path_scores,
            "mode": _text([r.get("mode", "") for r in part], n),
            "needs_review": review,
            "error": _text([r.get("error", "") for r in part], n),
            "warning": _text([r.get("warning", "") for r in part], n),
        })
    return out


def embed_requests(clf, requests: list[Request]) -> list[dict[str, np.ndarray]]:
    """Universal embeddings of several requests' items as one batch: the photo's, else the title's
    (as `huse embed` does); a failed item gets a NaN row and an `error`. One output dict per request."""
    dim = int(clf.manifest["embedding_dim"])
    sizes, images, titles, out = [], [], [], []
    for imgs, txts, _ in requests:
        try:
            n = _count(imgs, txts)
        except ValueError as e:
            sizes.append(str(e))
            continue
        sizes.append(n)
        images += _column(imgs, n)
        titles += _column(txts, n)
    vectors = np.full((len(images), dim), np.nan, np.float32)
    errors = [""] * len(images)
    with_image = [i for i, v in enumerate(images) if v is not None]
    img = clf.embed_image([images[i] for i in with_image]) if with_image else None
    for j, i in enumerate(with_image):
        if j in img.errors:
            errors[i] = img.errors[j]
        else:
            vectors[i] = img.vectors[j]
    need_text = [i for i in range(len(images)) if np.isnan(vectors[i, 0]) and titles[i] is not None]
    txt = clf.embed_text([titles[i] for i in need_text]) if need_text else None
    for j, i in enumerate(need_text):
        if j in txt.errors:
            errors[i] = "; ".join(e for e in (errors[i], txt.errors[j]) if e)
        else:
            vectors[i], errors[i] = txt.vectors[j], ""
    for i in range(len(images)):
        if images[i] is None and titles[i] is None:
            errors[i] = "the item has no image or title"
    start = 0
    for n in sizes:
        if isinstance(n, str):
            out.append({"_error": n})
            continue
        out.append({"embedding": vectors[start:start + n], "error": _text(errors[start:start + n], n)})
        start += n
    return out


def _blank_png(size) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (int(size[1]), int(size[0])), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


class TritonPythonModel:
    """The Python-backend model: loads the bundle once per instance, classifies (or embeds) each batch."""

    def initialize(self, args: dict[str, str]) -> None:
        from huse.runtime import Classifier

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.task = params.get("task", "classify")
        self.min_confidence = float(params.get("min_confidence", "0"))
        # The bundle travels inside the repository; its path in the config is relative to this model's folder.
        bundle = os.path.join(args["model_repository"], params.get("bundle", "1/bundle"))
        threads = int(params["threads"]) if params.get("threads") else None
        self.clf = Classifier(bundle, precision=params.get("precision", "fp32"), batch_size=int(config["max_batch_size"]),
                              threads=threads, spinning=False)
        # Warm up every graph (sessions load on first use), so the model turns ready only when it answers at speed.
        photo = _blank_png(self.clf.image_spec.size)
        self.clf.classify(images=[photo, photo, None], titles=["warm up", None, "warm up"])

    def execute(self, requests):
        parsed = []
        for r in requests:
            image = pb_utils.get_input_tensor_by_name(r, "image")
            title = pb_utils.get_input_tensor_by_name(r, "title")
            params = json.loads(r.parameters() or "{}")
            parsed.append((None if image is None else image.as_numpy(), None if title is None else title.as_numpy(), params))
        if self.task == "classify":
            outs = classify_requests(self.clf, parsed, self.min_confidence)
        else:
            outs = embed_requests(self.clf, parsed)
        responses = []
        for out in outs:
            if "_error" in out:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(out["_error"])))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in out.items()]))
        return responses

    def finalize(self) -> None:
        self.clf.close()
