"""Triton Inference Server Python-backend model for a huse bundle (written by `huse-export BUNDLE --triton REPO`).

One file serves both models of the repository, chosen by the config parameter `task`:
- `huse` (classify): inputs `image` (BYTES, encoded JPEG/PNG; empty = no photo) and `title` (BYTES,
  UTF-8; empty = no title), each [N, 1]; outputs `top_k_labels` BYTES [N, K], `top_k_scores` FP32
  [N, K], `path_labels` BYTES [N, L], `path_scores` FP32 [N, L] (L = hierarchy depth, "" / 0
  padding), `mode`, `error`, `warning` BYTES [N, 1] ("" when none) and `needs_review` BOOL [N, 1].
  K is 5 unless the request parameter `top_k` says otherwise (at most the number of classes); `mode`
  (auto, fused, image, text) as in `huse classify`; the config's `min_confidence` marks top-1 scores
  below it `needs_review` (a multi-label bundle: any label's score).
- `huse_embed` (embed): the same inputs; outputs `embedding` FP32 [N, D] (the photo's universal
  embedding, else the title's, as `huse embed` does; NaN for a failed item; request parameter
  `space` "visual": the photo's visual-similarity vector) and `error` BYTES [N, 1].

It needs only the lean runtime in Triton's Python environment (`pip install 'huse-edge[ort]'`, or
`huse-edge[trt]` with TensorRT on Jetson): no torch, no web server. Triton's dynamic batcher hands
`execute` several requests; their items run as one batch through `huse serve`'s own model stages and
protocol helpers (huse.runtime.serve.models / .protocol), so both servers answer alike. A bad item gets
its own `error`; it never fails the other items or requests. `run_requests` needs no Triton, so the
benchmark's PyTriton anchor (huse.benchmarks.pytriton_anchor) runs exactly this code.
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

# A request is (images, titles, parameters): images and titles are object arrays of bytes, [n, 1] or [n]
# (None when the request has no such input), parameters the request's parameters as a dict.
Request = tuple[Any, Any, dict[str, Any]]


def _column(values: Any) -> list[bytes | None] | None:
    """One BYTES input as a list with one entry per item, an empty element meaning "none"."""
    if values is None:
        return None
    flat = np.asarray(values, dtype=object)
    flat = flat.reshape(len(flat), -1)[:, 0] if flat.ndim else flat.reshape(1)
    return [bytes(v) if v is not None and len(v) else None for v in flat]


def run_requests(model, requests: list[Request]) -> list[dict[str, np.ndarray]]:
    """Run several requests' items as one batch through `huse serve`'s own model stages.

    Args:
        model: a huse.runtime.serve.models ClassifyModel or EmbedModel (prepare_many / run / finish).
        requests: (images, titles, parameters) per request.
    Returns:
        Per request: output name -> array (the serving contract's tensors, from huse serve's protocol
        helpers), or {"_error": message} for a request that is malformed as a whole (bad top_k, mode,
        space; unequal inputs).
    """
    from huse.runtime.errors import HuseError
    from huse.runtime.serve.models import ClassifyModel
    from huse.runtime.serve.protocol import Items, classify_tensors, embed_tensors

    parts, out, asked = [], [], []
    for images, titles, params in requests:
        images, titles = _column(images), _column(titles)
        if images is not None and titles is not None and len(images) != len(titles):
            out.append({"_error": f"input image has {len(images)} rows but title has {len(titles)}; "
                                  "send one of each per item"})
        elif images is None and titles is None:
            out.append({"_error": "the request has neither an image nor a title input"})
        else:
            out.append(None)
            asked.append(Items(images, titles, params))
    prepared = iter(model.prepare_many(asked))  # every request's photos decoded as one batch
    for i, o in enumerate(out):
        if o is None:
            part = next(prepared)
            if isinstance(part, HuseError):
                out[i] = {"_error": str(part)}
            elif isinstance(part, Exception):
                raise part
            else:
                parts.append(part)
    answers = iter(model.finish(parts, model.run(model.clf, parts)) if parts else [])
    classify = isinstance(model, ClassifyModel)
    for i, o in enumerate(out):
        if o is None:
            answer = next(answers)
            tensors = (classify_tensors(answer, model.clf.hierarchy.depth, model.min_confidence,
                                        model.clf.multi_label) if classify
                       else embed_tensors(*answer))
            out[i] = {name: array for name, (_, array) in tensors.items()}
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
        from huse.runtime.serve.models import ClassifyModel, EmbedModel

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        task = params.get("task", "classify")
        # The bundle travels inside the repository; its path in the config is relative to this model's folder.
        bundle = os.path.join(args["model_repository"], params.get("bundle", "1/bundle"))
        threads = int(params["threads"]) if params.get("threads") else None
        clf = Classifier(bundle, precision=params.get("precision", "fp32"), batch_size=int(config["max_batch_size"]),
                         threads=threads, spinning=False)
        self.model = (ClassifyModel(clf, float(params.get("min_confidence", "0"))) if task == "classify"
                      else EmbedModel(clf))
        # Warm up every graph (sessions load on first use), so the model turns ready only when it answers at speed.
        photo = _blank_png(clf.image_spec.size)
        clf.classify(images=[photo, photo, None], titles=["warm up", None, "warm up"])

    def execute(self, requests):
        parsed = []
        for r in requests:
            image = pb_utils.get_input_tensor_by_name(r, "image")
            title = pb_utils.get_input_tensor_by_name(r, "title")
            params = json.loads(r.parameters() or "{}")
            parsed.append((None if image is None else image.as_numpy(),
                           None if title is None else title.as_numpy(), params))
        responses = []
        for out in run_requests(self.model, parsed):
            if "_error" in out:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(out["_error"])))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in out.items()]))
        return responses

    def finalize(self) -> None:
        self.model.clf.close()
