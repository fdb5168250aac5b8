"""The Python API: `Classifier(bundle).classify(images=..., titles=...)`."""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from huse.runtime.backends import resolve_backend, runner_class
from huse.runtime.bundle import (CPU_ONLY_PRECISIONS, check_graph, is_multi_label, load_manifest, require_precision,
                                 require_visual)
from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import Hierarchy
from huse.runtime.labels import label_path, predict_sets, sigmoid
from huse.runtime.preprocess import ImageBatch, ImageInput, ImageSpec, load_images
from huse.runtime.tokenizer import concat_inputs, load_tokenizer, normalise_title

log = logging.getLogger("huse.runtime")

MODES = ("auto", "fused", "image", "text")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HuseError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _per_item(value: Any, name: str) -> Any:
    """A list with one entry per item; a lone string/path/image would otherwise be iterated item by character.
    Any other sequence becomes a list in its iteration order (a pandas Series indexes by label, so `value[i]`
    of a filtered DataFrame's column is another row's value, or a KeyError), its missing values (NaN, pd.NA)
    None, as they mean."""
    if value is None or isinstance(value, Decoded):
        return value
    if isinstance(value, (str, bytes, bytearray, os.PathLike, dict)) or not hasattr(value, "__len__") \
            or not hasattr(value, "__getitem__"):
        raise HuseError(f"{name}= takes a list with one entry per item (None for a missing one), got a "
                        f"{type(value).__name__}; for one item pass [{name[:-1]}]")
    kinds = set(map(type, value))  # at C speed: the common list of str (and None) is passed on as it is
    if any(issubclass(t, float) or t.__name__ in ("NAType", "NaTType") for t in kinds):
        return [None if _missing(v) else v for v in value]
    return value if isinstance(value, list) else list(value)


def _missing(v: Any) -> bool:
    """NaN or pandas' NA/NaT: what a table holds where a value is missing (pandas is never imported)."""
    return (isinstance(v, float) and v != v) or type(v).__name__ in ("NAType", "NaTType")


def _guarded(method):
    """Count the call as in flight, so that close() waits for it instead of pulling the sessions from under it."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._closing:
                raise HuseError("this Classifier is being closed (close() was called); create a new one to classify")
            self._active += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            with self._lock:
                self._active -= 1
                self._idle.notify_all()
    return wrapper


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, computed in float64, returned as float32.

    With a temperature it is `temperature_scale(softmax(logits), temperature)` in one step (one
    exp instead of exp, log and exp again): the runtime calibrates a graph's logits this way.
    """
    z = logits.astype(np.float64)
    if temperature != 1.0:
        z /= temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    e /= e.sum(axis=-1, keepdims=True)
    return e.astype(np.float32)


def temperature_scale(p: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities: p^(1/T) renormalised (for a softmax, softmax(logits / T)).

    The one calibration rule: training fits T on validation with it, the runtime applies it.
    """
    if temperature == 1.0:
        return p
    return softmax(np.log(np.clip(p.astype(np.float64), 1e-12, None)) / temperature)


@dataclass
class Embeddings:
    """Universal embeddings (L2-normalised rows). Rows of failed items are NaN and listed in `errors`."""

    vectors: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


# Images already decoded and preprocessed by `Classifier.decode` (one normalised batch, per-item
# errors and warnings): `classify`, `prepare` and `embed_image` accept it in place of `images`, so a
# caller can decode in its own threads (huse.runtime.bulk overlaps decoding with inference this way).
Decoded = ImageBatch


@dataclass
class Prepared:
    """Items made ready for the model by `Classifier.prepare` (decoded, stacked, tokenised).

    `classify` is `describe(prepared, infer(prepared))` after `prepare`; `prepare` and `describe`
    run no graph and are thread-safe, so huse.runtime.bulk prepares the next batch and describes
    the last one in other threads while the model runs this one."""

    results: list[dict[str, Any]]  # per item: {"index"}, plus the "error"/"warning" found while preparing
    groups: dict[str, tuple[list[int], dict[str, np.ndarray]]]  # graph -> (item indices, its feeds)
    warnings: dict[int, str]  # Pillow's, for items classified from their image

    def __len__(self) -> int:
        return len(self.results)

    @classmethod
    def merge(cls, parts: Sequence["Prepared"]) -> "Prepared":
        """One Prepared holding the items of `parts` in order, each graph's feeds concatenated (token
        inputs padded to the widest part first: `concat_inputs`), so that items prepared separately
        (e.g. by concurrent requests to a server) run as one batch. `describe` of the merge gives the
        parts' results one after another."""
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()
        results = [r for p in parts for r in p.results]
        groups: dict[str, tuple[list[int], dict[str, np.ndarray]]] = {}
        for group in ("fused", "image", "text"):
            present = [(off, p.groups[group]) for off, p in zip(offsets, parts) if group in p.groups]
            if present:
                idx = [off + i for off, (members, _) in present for i in members]
                feeds = concat_inputs([f for _, (_, f) in present])  # titles padded to one width
                groups[group] = (idx, feeds)
        warnings = {off + i: w for off, p in zip(offsets, parts) for i, w in p.warnings.items()}
        return cls(results, groups, warnings)


def top_classes(probs: np.ndarray, k: int) -> np.ndarray:
    """The k best classes of each row of probs (N, C), best first, ties to the lower class: exactly
    `np.argsort(-probs, axis=1, kind="stable")[:, :k]`. A full sort costs microseconds for a few dozen classes;
    for thousands it costs as much as the model, so large batches are partitioned first and only the rows'
    candidates (at or above the k-th score) sorted (benchmarks/experiments/describe_classes.py times the whole
    describe step: 4,000 classes, a batch of 64, 30 -> 4.2 ms with the level sums below)."""
    k = min(k, probs.shape[1])
    if probs.size <= 4096 or np.isnan(probs).any():
        return np.argsort(-probs, axis=1, kind="stable")[:, :k]
    neg = -probs
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1:k]
    rows, cols = np.nonzero(neg <= kth)  # row-major: each row's candidates, at least k, in class order
    order = np.lexsort((cols, neg[rows, cols], rows))  # by row, then score (best first), then class
    rows, cols = rows[order], cols[order]
    return cols[np.searchsorted(rows, np.arange(len(probs)))[:, None] + np.arange(k)]


class Classifier:
    """Classifies products from a photo, a title, or both, with a bundle from `huse-export`.

    Args:
        bundle: the bundle directory.
        backend: "auto" (TensorRT, else onnxruntime CUDA, else CPU), "onnxruntime" or "tensorrt".
        precision: "fp32", "fp16", "int8" (TensorRT's Q/DQ form) or "int8-cpu" (onnxruntime on CPUs
            only; "auto" then picks the CPU); the bundle must contain it.
        device: "cpu" or "cuda" for onnxruntime; None lets `backend` decide.
        batch_size: items per model call; larger inputs are split.
        threads: onnxruntime intra-op threads (None: all cores).
        row_parts: into how many parts by rows a word-CNN text batch is cut, the parts run at once (None:
            one per thread, `graph_row_parts`; 1: whole batches, for callers that keep the other cores
            busy themselves, as `huse classify`'s prepare pool does).
        spinning: onnxruntime's intra-op thread spinning (None: its default, on); off costs a
            little alone and saves a lot when other work shares the cores (TOOLCHAIN.md).
            In a process that called `huse.runtime.share_threads`, onnxruntime CPU sessions run on its one
            pool, and `threads`, `row_parts` and `spinning` do not apply to them.
        verify: check every bundle file's sha256 before loading (on by default).
        trusted_keys: Ed25519 public key files (PEM); when given, an unsigned or badly signed
            bundle is refused (extra `sign`). None: unsigned bundles load.

    One Classifier may be shared by threads. `close()` waits for the calls in flight, refuses
    calls that start while it waits, then releases the sessions; a later call loads them again.
    """

    def __init__(self, bundle: str | Path, backend: str = "auto", precision: str = "fp32", device: str | None = None,
                 batch_size: int = 64, threads: int | None = None, verify: bool = True,
                 spinning: bool | None = None, trusted_keys: Sequence[str | Path] | None = None,
                 row_parts: int | None = None):
        self.bundle = Path(bundle)
        self.batch_size = _positive_int(batch_size, "batch_size")
        if device not in (None, "cpu", "cuda"):
            raise HuseError(f"device {device!r} is not one of [None, 'cpu', 'cuda']")
        self.manifest = load_manifest(self.bundle, verify=verify, trusted_keys=trusted_keys)
        m = self.manifest
        require_precision(m, self.bundle, precision)
        self.precision = precision
        self.labels: list[str] = m["labels"]
        self.hierarchy = Hierarchy(self.labels)
        self.image_spec = ImageSpec.from_dict(m["preprocessing"])
        self.tokenizer = load_tokenizer(m["tokenizer"], self.bundle)
        self.fusion_weight = float(m["fusion"]["image_weight"])
        # Per-mode temperatures fitted on validation (scores are calibrated: see huse.train.baselines).
        self.temperature = {k: float(v) for k, v in m.get("calibration", {}).get("temperature", {}).items()}
        # Multi-label bundles (several class paths per product, runtime/labels.py): a sigmoid per class and
        # per-class thresholds per mode, tuned on val by training.
        self.multi_label = is_multi_label(m)
        self._activation = sigmoid if m.get("multilabel", {}).get("activation", "sigmoid") == "sigmoid" else softmax
        self.thresholds = {k: np.asarray(v, dtype=np.float32)
                           for k, v in m.get("multilabel", {}).get("thresholds", {}).items()}
        self.threads = threads
        self.row_parts = None if row_parts is None else _positive_int(row_parts, "row_parts")
        self.spinning = spinning
        if precision in CPU_ONLY_PRECISIONS:
            if backend == "tensorrt" or device == "cuda":
                raise HuseError(f"{precision!r} graphs are for onnxruntime on CPUs (uint8 activations that TensorRT "
                                f"and the GPU providers do not take); use precision='int8' or 'fp16' on a GPU")
            device = "cpu"
        self.backend, self.device, reason = resolve_backend(backend, device)
        if backend == "tensorrt":  # asked for by name: refused here, not at the first batch
            from huse.runtime.backends import gpu_backends

            ok, why = gpu_backends()["tensorrt"]
            if not ok:
                raise HuseError(f"backend='tensorrt' was asked for but TensorRT is not usable here ({why}); "
                                "use backend='onnxruntime', or 'auto' to pick the best available")
        if device == "cuda" and self.backend == "onnxruntime":
            from huse.runtime.backends.onnxrt.runner import cuda_provider_status

            ok, why = cuda_provider_status() if self.device == "cuda" else (False, reason)
            if not ok:  # never a silent CPU run when a GPU was asked for
                raise HuseError(f"device='cuda' was asked for but no GPU backend is usable here ({why}); "
                                "use device='cpu' (or leave device=None to pick the best available)")
        log.info("huse Classifier: %s on %s, %s (%s)", self.backend, self.device, precision, reason)
        self._runners: dict[str, Any] = {}
        self._lock = threading.Lock()  # guards _runners, _active, _closing
        self._idle = threading.Condition(self._lock)
        self._active, self._closing = 0, False

    # -- lifetime --------------------------------------------------------------------
    def _runner(self, graph: str):
        with self._lock:
            if graph not in self._runners:
                cls = runner_class(self.backend)
                onnx_file = self.bundle / self.manifest["models"][self.precision][graph]
                if self.backend == "onnxruntime":
                    from huse.runtime.backends.onnxrt.runner import graph_row_parts, graph_threads, onnx_files

                    encoder = self.manifest.get("model", {}).get("text_encoder")
                    path, weights = onnx_files(self.manifest["models"], self.precision, graph, self.device)
                    onnx_file = self.bundle / path
                    parts = graph_row_parts(graph, encoder, self.threads)
                    runner = cls(onnx_file, device=self.device, threads=graph_threads(graph, encoder, self.threads),
                                 spinning=self.spinning, row_parts=min(parts, self.row_parts or parts),
                                 weights=self.bundle / weights if weights else None)
                else:
                    runner = cls.for_bundle(self.bundle, self.manifest, graph, self.precision)
                runner.activate()
                if self.backend == "onnxruntime":  # the manifest must describe this graph before it runs
                    s = runner.session
                    try:
                        check_graph(self.manifest, graph, {i.name: i.shape for i in s.get_inputs()},
                                    {o.name: o.shape for o in s.get_outputs()},
                                    dict(s.get_modelmeta().custom_metadata_map), str(onnx_file))
                    except HuseError:
                        runner.deactivate()
                        raise
                self._runners[graph] = runner
            return self._runners[graph]

    def close(self) -> None:
        """Release the sessions, after the calls in flight on other threads finish."""
        with self._lock:
            self._closing = True
            try:
                self._idle.wait_for(lambda: self._active == 0)
                for r in self._runners.values():
                    r.deactivate()
                self._runners.clear()
            finally:
                self._closing = False

    def __repr__(self) -> str:
        return (f"Classifier({str(self.bundle)!r}, backend={self.backend!r}, device={self.device!r}, "
                f"precision={self.precision!r}, classes={len(self.labels)}{', multi_label=True' if self.multi_label else ''})")

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inputs ----------------------------------------------------------------------
    def decode(self, images: Sequence[ImageInput | None]) -> Decoded:
        """Decode and preprocess images (thread-safe); bad ones are listed in `errors` by index."""
        return self._images(images)

    def _images(self, images: Sequence[ImageInput | None] | Decoded) -> Decoded:
        return images if isinstance(images, ImageBatch) else load_images(_per_item(images, "images"), self.image_spec)

    def _titles(self, titles: Sequence[str | bytes | None]) -> tuple[dict[int, str], dict[int, str]]:
        texts, errors = {}, {}
        for i, t in enumerate(titles):
            try:
                text = normalise_title(t)
            except HuseError as e:
                errors[i] = str(e)
                continue
            if text is not None:
                texts[i] = text
        return texts, errors

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `graph` over any number of items in chunks of batch_size."""
        n = len(next(iter(feeds.values())))
        runner = self._runner(graph)
        if n <= self.batch_size:  # one chunk: no slicing and no copy into a concatenation
            return runner.infer(feeds)
        parts = [runner.infer({k: v[s:s + self.batch_size] for k, v in feeds.items()})
                 for s in range(0, n, self.batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # -- API -------------------------------------------------------------------------
    @_guarded
    def classify(self, images: Sequence[ImageInput | None] | None = None,
                 titles: Sequence[str | bytes | None] | None = None,
                 top_k: int = 5, mode: str = "auto") -> list[dict[str, Any]]:
        """Classify items from images, titles or both.

        Args:
            images: one image per item (path, bytes, PIL image, uint8 array) or None; or a `Decoded`.
            titles: one title per item, or None.
            top_k: how many leaf classes to return per item.
            mode: "auto" (fused where an item has both, else what it has), "fused", "image" or "text".
        Returns:
            One dict per item, in input order: {"index", "mode", "top_k": [{"label", "score"}],
            "path": [{"level", "label", "score"}]}; a multi-label bundle adds "labels": [{"label",
            "score", "threshold", "path"}], every class at or above its threshold, best first (the best
            class alone if none is), and its "path" is the best label's path (scores per class are
            independent sigmoids: a node's score is the best of its leaves) — or {"index", "error"} for an item that
            could not be classified; an item whose image failed but whose title is usable is
            classified by its title with a "warning", and an image Pillow warned about (corrupt
            EXIF, ...) is classified with a "warning" naming the file.
        Raises:
            HuseError: for the call as a whole: a lone string/path instead of a list, top_k not a
                positive integer, unequal lengths, an unknown mode.
        """
        top_k = _positive_int(top_k, "top_k")
        prepared = self.prepare(images, titles, mode)
        return self.describe(prepared, self._infer(prepared), top_k)

    def prepare(self, images: Sequence[ImageInput | None] | Decoded | None = None,
                titles: Sequence[str | bytes | None] | None = None, mode: str = "auto") -> Prepared:
        """The CPU work of `classify` before the model: decode, group by what each item has, stack, tokenise.

        Thread-safe, and it runs no graph, so it can run in other threads while the model runs.
        Arguments and errors as for `classify`.
        """
        if mode not in MODES:
            raise HuseError(f"mode {mode!r} is not one of {list(MODES)}")
        images, titles = _per_item(images, "images"), _per_item(titles, "titles")
        if images is None and titles is None:
            raise HuseError("classify needs images, titles or both")
        n = len(images if images is not None else titles)
        if images is not None and titles is not None and len(images) != len(titles):
            raise HuseError(f"got {len(images)} images but {len(titles)} titles; pass one of each per item (None for missing)")
        use_img = images is not None and mode in ("auto", "fused", "image")
        use_txt = titles is not None and mode in ("auto", "fused", "text")
        decoded = self._images(images) if use_img else None
        img, img_err = (decoded.rows, decoded.errors) if decoded is not None else ({}, {})
        txt, txt_err = self._titles(titles) if use_txt else ({}, {})

        results: list[dict[str, Any]] = [{"index": i} for i in range(n)]
        members: dict[str, list[int]] = {"fused": [], "image": [], "text": []}
        unusable = f"has no usable {'title' if mode == 'text' else 'image' if mode == 'image' else 'image or title'}"
        if decoded is None and mode != "fused":  # titles only: an item runs the text graph or has no usable title
            members["text"] = sorted(txt)
            for i in range(n):
                if i not in txt:
                    results[i]["error"] = txt_err.get(i) or f"item {i} {unusable}"
        else:
            for i in range(n):
                has_i, has_t = i in img, i in txt
                if mode == "fused" and not (has_i and has_t):
                    results[i]["error"] = img_err.get(i) or txt_err.get(i) or "fused mode needs both an image and a title"
                elif has_i and has_t:
                    members["fused"].append(i)
                elif has_i:
                    members["image"].append(i)
                elif has_t:
                    members["text"].append(i)
                    if i in img_err:
                        results[i]["warning"] = f"{img_err[i]}; classified by title only"
                else:
                    results[i]["error"] = img_err.get(i) or txt_err.get(i) or f"item {i} {unusable}"
        groups = {}
        for group, idx in members.items():
            if idx:
                feeds: dict[str, np.ndarray] = {}
                if group != "text":
                    feeds["image"] = decoded.stack(idx)
                if group != "image":
                    feeds.update(self.tokenizer.inputs([txt[i] for i in idx]))
                groups[group] = (idx, feeds)
        warnings = {i: w for i, w in decoded.warnings.items() if i in img} if decoded is not None else {}
        return Prepared(results, groups, warnings)

    @_guarded
    def infer(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """The model stage of `classify`: calibrated leaf probabilities (n, C) per group of `prepared`."""
        return self._infer(prepared)

    def _infer(self, prepared: Prepared) -> dict[str, np.ndarray]:
        return {group: self._probs(group, feeds) for group, (_, feeds) in prepared.groups.items()}

    def describe(self, prepared: Prepared, probs: dict[str, np.ndarray], top_k: int = 5) -> list[dict[str, Any]]:
        """The last stage of `classify`: top-k leaves and top-down paths of `infer`'s probabilities,
        one dict per item in input order (thread-safe; runs no graph)."""
        top_k = _positive_int(top_k, "top_k")
        results: list[dict[str, Any] | None] = [None] * len(prepared.results)
        for group, (idx, _) in prepared.groups.items():
            described = self._top_k_and_paths(probs[group], top_k, group, [prepared.results[i] for i in idx])
            for i, r in zip(idx, described):
                results[i] = r
        # Items no graph ran on (errors) are copies too: the caller may change what it gets.
        results = [r if r is not None else dict(base) for r, base in zip(results, prepared.results)]
        for i, w in prepared.warnings.items():  # e.g. corrupt EXIF: classified, but the user should know
            if "error" not in results[i]:
                results[i]["warning"] = w
        return results

    def _probs(self, group: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Calibrated leaf probabilities (N, C) of one graph on ready feeds."""
        out = self._run(group, feeds)
        if self.multi_label:  # per-class scores read against per-class thresholds: no temperature
            return out["probs"] if group == "fused" else self._activation(out["logits"])
        temperature = self.temperature.get(group, 1.0)
        if group == "fused":  # the graph's output is a mixture of probabilities, not logits
            return temperature_scale(out["probs"], temperature)
        return softmax(out["logits"], temperature)

    def _top_k_and_paths(self, probs: np.ndarray, top_k: int, mode: str,
                         bases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each item's result: a copy of its `bases` entry ({"index"}, maybe a "warning") with the top-k
        leaves and the top-down path of its row of probs (N, C), made a batch at a time."""
        order = top_classes(probs, top_k)
        scores = probs[np.arange(len(probs))[:, None], order]  # take_along_axis, without its ~2 us of Python
        if self.multi_label:
            return self._multilabel(probs, order, scores.tolist(), mode, bases)
        # One flat comprehension for the whole batch, then cut per item: the dicts are what it costs.
        labels, k = self.labels, order.shape[1]
        flat = [{"label": labels[j], "score": s} for j, s in zip(order.ravel().tolist(), scores.ravel().tolist())]
        return [dict(base, mode=mode, top_k=flat[i:i + k], path=path)
                for base, i, path in zip(bases, range(0, len(flat), k), self.hierarchy.top_down_dicts(probs))]

    def _multilabel(self, probs: np.ndarray, order: list, scores: list, mode: str,
                    bases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`_top_k_and_paths` of a multi-label bundle: top-k, and every class at or above its threshold."""
        thresholds = self.thresholds[mode]
        out = []
        for base, row, pred, o, sc in zip(bases, probs, predict_sets(probs, thresholds), order.tolist(), scores):
            chosen = sorted(np.flatnonzero(pred).tolist(), key=lambda j: -row[j])
            described = [{"label": self.labels[j], "score": float(row[j]), "threshold": round(float(thresholds[j]), 4),
                          "path": label_path(self.labels[j], row, self.labels)} for j in chosen]
            out.append(dict(base, mode=mode, top_k=[{"label": self.labels[j], "score": s} for j, s in zip(o, sc)],
                            path=described[0]["path"], labels=described))
        return out

    @_guarded
    def predict_proba(self, images: Sequence[ImageInput] | None = None, titles: Sequence[str] | None = None) -> np.ndarray:
        """Leaf probabilities (N, C) for clean inputs (raises on the first bad item); for evaluation."""
        images, titles = _per_item(images, "images"), _per_item(titles, "titles")
        group = "fused" if images is not None and titles is not None else "image" if images is not None else "text"
        feeds: dict[str, np.ndarray] = {}
        if images is not None:
            decoded = load_images(images, self.image_spec, warnings=False)
            if decoded.errors:
                raise HuseError(next(iter(decoded.errors.values())))
            feeds["image"] = decoded.array
        if titles is not None:
            feeds.update(self.tokenizer.inputs([normalise_title(t) or "" for t in titles]))
        return self._probs(group, feeds)

    @_guarded
    def embed_image(self, images: Sequence[ImageInput]) -> Embeddings:
        """Universal image embeddings (N, D); a bad image gives a NaN row and an entry in `errors`."""
        return self._embed_images(images, {"embedding": int(self.manifest["embedding_dim"])})["embedding"]

    @_guarded
    def embed_visual(self, images: Sequence[ImageInput]) -> Embeddings:
        """Visual-similarity vectors (N, visual_dim): the image graph's `visual` output, the frozen
        backbone's pooled features centred, PCA-whitened and L2-normalised (export/graphs.py). For "this
        same product / duplicates, from a photo"; the universal embedding (`embed_image`) is for "products
        of this kind" and cross-modal search. A bad image gives a NaN row and an entry in `errors`.

        Raises:
            HuseError: the bundle was exported before visual vectors (re-export it with this version).
        """
        return self._embed_images(images, {"visual": require_visual(self.manifest, self.bundle)})["visual"]

    @_guarded
    def embed_image_visual(self, images: Sequence[ImageInput]) -> tuple[Embeddings, Embeddings]:
        """`embed_image` and `embed_visual` of the same photos from one run of the image graph (what an
        index of both spaces needs: the graph runs once, not twice)."""
        out = self._embed_images(images, {"embedding": int(self.manifest["embedding_dim"]),
                                          "visual": require_visual(self.manifest, self.bundle)})
        return out["embedding"], out["visual"]

    @_guarded
    def embed_text(self, titles: Sequence[str | bytes | None]) -> Embeddings:
        """Universal text embeddings (N, D); an empty or bad title gives a NaN row and an entry in `errors`."""
        texts, errors = self._titles(_per_item(titles, "titles"))
        for i in range(len(titles)):
            if i not in texts and i not in errors:
                errors[i] = f"item {i}: title is empty"
        return self._embed("text", len(titles), texts, errors,
                           lambda idx: self.tokenizer.inputs([texts[i] for i in idx]))["embedding"]

    def _embed_images(self, images: Sequence[ImageInput] | Decoded, outputs: dict[str, int]) -> dict[str, Embeddings]:
        """{output: Embeddings} of the image graph's `outputs` (name: width), from one run of it."""
        decoded = self._images(_per_item(images, "images"))
        errors = {i: decoded.errors.get(i) or f"item {i}: no image" for i in range(len(images)) if i not in decoded.rows}
        return self._embed("image", len(images), decoded.rows, errors, lambda idx: {"image": decoded.stack(idx)}, outputs)

    def _embed(self, graph: str, n: int, ok: dict, errors: dict[int, str], make_feeds,
               outputs: dict[str, int] | None = None) -> dict[str, Embeddings]:
        """{output: Embeddings} of `graph`'s outputs (name: width; default the universal embedding)."""
        outputs = outputs or {"embedding": int(self.manifest["embedding_dim"])}
        vectors = {name: np.full((n, dim), np.nan, dtype=np.float32) for name, dim in outputs.items()}
        idx = sorted(ok)
        if idx:
            out = self._run(graph, make_feeds(idx))
            for name in outputs:
                if name not in out:  # e.g. a TensorRT engine built from an older graph
                    raise HuseError(f"the {graph} model of bundle {self.bundle} has no output {name!r} (it has "
                                    f"{sorted(out)}); re-export the bundle with this huse-edge version")
                vectors[name][idx] = out[name]
        return {name: Embeddings(v, dict(errors)) for name, v in vectors.items()}

    # -- one stage at a time (what huse-bench times) -----------------------------------
    def preprocess_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """The image graph's input for `images`: decoded, resized and normalised, stacked (N, 3, H, W).

        Raises:
            HuseError: an image cannot be read (naming it).
        """
        decoded = self._images(images)
        if decoded.errors:
            raise HuseError(next(iter(decoded.errors.values())))
        return decoded.array

    def run_graph(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one bundle graph ("image", "text" or "fused") on prepared feeds as one batch: the model
        stage alone, without decoding, tokenising or post-processing. The runner loads on first use."""
        return self._runner(graph).infer(feeds)

    @property
    def loaded_files(self) -> dict[str, Path]:
        """Graph -> the model file its runner loaded (an ONNX file, or a TensorRT engine), for graphs run so far."""
        return {graph: Path(r.path) for graph, r in self._runners.items()}
