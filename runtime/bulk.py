"""Bulk classify/embed of whole catalogs: streaming, sharded, resumable; locally or on Ray Data.

    run_bulk(BulkJob(bundle="bundles/mine", data="catalog.csv", out="preds/", task="classify"))

Layout of an output directory (the clip-retrieval / autofaiss habit):

    part-00000.parquet        classify: one prediction row per catalog row (or .jsonl, --format jsonl)
    part-00000.npy            embed: float32 (n, dim) vectors, NaN rows where the row failed
    part-00000.parquet        embed: row, product_id, image, name, classes, modality, warning, error
    part-00000.image.npy      embed --mode index: the vectors an index holds (image, text and, with a bundle's
    part-00000.text.npy         visual vectors, visual), NaN where left out; the table adds image_error and
    part-00000.visual.npy       text_error, why, and names photos by absolute path (`huse index build
                                --embeddings` builds the index from them, from any directory)
    _manifest.json            settings, and per finished shard: row range, counts, sha256 of its files
    _SUCCESS                  written last: the output is complete

`--out X.jsonl` or `X.csv` (classify): the same shards in `X.shards/`, joined into that one file at the end.

Shard k holds catalog records [k * shard_rows, (k + 1) * shard_rows). Work happens in
`OUT.partial/`; a shard's files are written to temporary names and renamed, then listed in the
manifest (itself replaced atomically), so a killed job never leaves a half shard that looks
finished. `resume=True` verifies the listed shards' sha256, keeps them and redoes the rest.
Only when every shard is done does `OUT.partial` replace `OUT`, so a previous complete output
stays valid until then. Batches never cross shards, so a shard redone is bit-identical.

`process_batch` (records -> rows [+ vectors]) is the engine-agnostic unit: the local engine
runs it with a thread pool that prepares the next batches (`prepare_batch`: decode, tokenise)
while the model runs; the Ray engine runs it in a `map_batches` actor per worker. A Spark
`predict_batch_udf` would wrap the same function.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from huse.runtime._collector import THRESHOLDS, fewer_collections
from huse.runtime._lazy import lazy_import
from huse.runtime._priority import PRIORITIES, set_thread_priority
from huse.runtime.bundle import has_visual, is_multi_label
from huse.runtime.catalog import Record, Shard, check_catalog_file, count_rows, iter_catalog, plan_shards
from huse.runtime.classifier import Classifier, Decoded, Prepared
from huse.runtime.errors import HuseError, row_error
from huse.runtime.files import (CSV_ENCODING, from_sheet_cell, is_own_csv, is_own_jsonl, one_writer, sha256_file,
                                sheet_cell)
from huse.runtime.labels import needs_review, parse_paths
from huse.runtime.preprocess import is_url
from huse.runtime.product_vectors import MODALITIES, embed_products, vector_widths

__all__ = ["BulkJob", "BulkResult", "prepare_batch", "process_batch", "run_bulk", "read_predictions", "read_embeddings",
           "iter_embeddings"]

TASKS = ("classify", "embed")
FORMATS = ("parquet", "jsonl")
SINGLE_FILES = (".jsonl", ".csv")  # classify --out FILE: one file instead of a shard folder
# File names classify does not write (a spreadsheet, plain JSON): refused, not made a folder of Parquet shards by
# that name. `X.parquet` stays a folder name, as Spark and Ray name datasets.
NOT_WRITTEN = (".xlsx", ".xls", ".ods", ".json", ".ndjson", ".tsv", ".txt")
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
LAYOUT_VERSION = 1
IDENTITY = ("data_sha256", "bundle_sha256")  # settings that say which catalog and model an output was made from


@dataclass
class BulkJob:
    """Everything a bulk run needs. The fields marked (output) decide the output bytes: a resume
    with any of them changed is refused."""

    bundle: str
    data: str
    out: str
    task: str = "classify"  # (output) classify or embed
    images: str | None = None  # (output) folder image paths resolve against
    encoding: str | None = None
    confine_images: bool = False  # (output) refuse image paths that could leave `images` (third-party catalogs)
    mode: str = "auto"  # (output) auto/fused/image/text; embed: auto/image/text/index
    top_k: int = 5  # (output)
    min_confidence: float = 0.0  # (output) top-1 score below it -> needs_review
    batch_size: int = 64  # (output) items per model call; batches never cross shards
    shard_rows: int = 10_000  # (output) rows per shard: the unit of resume and of work on Ray
    format: str = "parquet"  # (output) parquet or jsonl
    precision: str = "fp32"  # (output)
    backend: str = "auto"
    device: str | None = None
    threads: int | None = None  # onnxruntime intra-op threads per process (or per Ray actor)
    spinning: bool = False  # onnxruntime thread spinning: off, see OnnxrtRunner
    workers: int | None = None  # threads preparing batches (decode, tokenise); None: sized with `threads`
    # idle: the prepare pool runs only on cores onnxruntime's threads leave (its barrier waits) and yields
    # at once when they wake. Not the default: where other processes want the cores, an idle-only thread
    # starves and the model waits for its batches (0.13 vs 0.60 of model-only at load 7 on 2 cores)
    prepare_priority: str = "normal"
    engine: str = "local"  # local or ray
    address: str | None = None  # Ray cluster (HOST:PORT of its head, or auto); None starts a local instance
    actors: int = 2  # Ray actors (each holds one Classifier)
    resume: bool = False
    progress: bool = True
    trusted_keys: tuple[str, ...] = ()  # Ed25519 public keys: refuse the bundle unless signed by one (also on Ray workers)
    max_shards: int | None = None  # stop after this many shards (tests and benchmarks of kill/resume)
    classifier: Callable[[], Classifier] | None = field(default=None, repr=False)  # local engine: e.g. a torch baseline

    OUTPUT_FIELDS = ("task", "images", "mode", "top_k", "min_confidence", "batch_size", "shard_rows", "format",
                     "precision")

    def settings(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.OUTPUT_FIELDS}
        d["images"] = str(Path(self.images).resolve()) if self.images else None
        if self.confine_images:  # only when on, so runs from before the option still resume
            d["confine_images"] = True
        d["data"] = str(Path(self.data).resolve())
        # What the rows and vectors are made of: a resume with another model or an edited catalog would mix two
        # runs' answers in one output, and the shards' own sha256 cannot tell (kept apart: see _same_settings)
        d["data_sha256"] = sha256_file(self.data)
        d["bundle_sha256"] = sha256_file(Path(self.bundle) / "manifest.json")  # it lists every file's sha256
        return d


@dataclass
class BulkResult:
    """What a run did. rows: catalog rows; redone: rows processed in this run (not resumed)."""

    out: Path
    rows: int = 0
    classified: int = 0
    errors: int = 0
    warnings: int = 0
    needs_review: int = 0
    image_failures: int = 0  # rows whose image could not be used (a title may have saved them)
    shards: int = 0
    shards_resumed: int = 0
    shards_retried: int = 0
    rows_done_now: int = 0
    seconds: float = 0.0  # the whole call
    work_seconds: float = 0.0  # from the model being loaded (local) or the actors being asked (Ray) to the end
    backend: str = ""
    first_image_error: str | None = None
    known: int = 0  # rows with classes the bundle has that were classified
    right: int = 0  # of those, top-1 == classes
    # multi-label: over those rows, predicted labels among the row's classes, labels predicted, classes given
    labels_right: int = 0
    labels_predicted: int = 0
    labels_given: int = 0
    unknown_classes: int = 0  # rows classified whose classes the bundle does not have (not in the accuracy)

    @property
    def items_per_s(self) -> float:
        t = self.work_seconds or self.seconds
        return self.rows_done_now / t if t else 0.0


# ------------------------------------------------------------------------------------------
# The per-batch function


def _valid(records: list[Record]) -> tuple[list[int], dict[int, str]]:
    """Indices of usable records and the errors of the others (the catalog's: a malformed cell, a bad class path)."""
    ok = [i for i, r in enumerate(records) if not r.error]
    return ok, {i: r.error for i, r in enumerate(records) if r.error}


def prediction_fields(res: dict[str, Any], min_confidence: float) -> dict[str, Any]:
    """An output row's prediction fields from one `Classifier.classify` result (not an error): mode, the
    top-1 label and score, top_k, path and needs_review (`labels.needs_review`; a multi-label bundle adds
    every predicted class in `labels`, each reviewed on its own score)."""
    best = res["top_k"][0]
    out = dict(mode=res["mode"], label=best["label"], score=best["score"], top_k=res["top_k"], path=res["path"],
               needs_review=needs_review(res, min_confidence))
    if "labels" in res:
        out["labels"] = [{"label": x["label"], "score": x["score"], "needs_review": bool(x["score"] < min_confidence)}
                         for x in res["labels"]]
    return out


def _base_row(r: Record) -> dict[str, Any]:
    """The catalog's own fields of an output row; a photo held in the catalog itself (bytes) is not copied."""
    image = r.image if isinstance(r.image, str) else None
    return {"row": r.row, "product_id": r.product_id, "image": image, "name": r.name, "classes": r.classes}


@dataclass
class Ready:
    """A batch after `prepare_batch`: which records are usable, the others' errors, and the usable
    ones made ready for the model (classify: a `Prepared`; embed: their decoded images)."""

    ok: list[int]
    errors: dict[int, str]
    items: Prepared | Decoded | None


def prepare_batch(clf: Classifier, records: list[Record], job: BulkJob) -> Ready:
    """The CPU work of a batch before the model: validate, decode, stack, tokenise. Thread-safe and
    runs no graph, so the local engine runs it for the next batch while the model runs this one."""
    ok, errors = _valid(records)
    use = [records[i] for i in ok]
    images = [r.image for r in use] if job.mode != "text" else None
    if not use:
        return Ready(ok, errors, None)
    if job.task == "classify":
        return Ready(ok, errors, clf.prepare(images, [r.name for r in use] if job.mode != "image" else None, job.mode))
    return Ready(ok, errors, clf.decode(images) if images is not None else None)


def process_batch(clf: Classifier, records: list[Record], job: BulkJob, ready: Ready | None = None,
                  probs: dict[str, np.ndarray] | None = None) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """The engine-agnostic unit of bulk work: catalog records -> output rows (+ embeddings).

    Args:
        clf: the Classifier (one per process or actor).
        records: the batch, in catalog order.
        job: task, mode, top_k, min_confidence.
        ready: `prepare_batch(clf, records, job)` done already (in another thread), or None.
        probs: classify: `clf.infer(ready.items)` done already, or None.
    Returns:
        (rows, vectors): one dict per record, in order, each with an `error` (and no
        prediction) or a prediction; vectors (n, dim) float32 for embed (NaN for failed rows).
    """
    ready = ready if ready is not None else prepare_batch(clf, records, job)
    ok, use = ready.ok, [records[i] for i in ready.ok]
    rows = [_base_row(r) for r in records]
    for i, e in ready.errors.items():
        rows[i]["error"] = e
    if job.task == "classify":
        if probs is None and use:
            probs = clf.infer(ready.items)
        results = clf.describe(ready.items, probs, top_k=job.top_k) if use else []
        for i, res in zip(ok, results):
            row = rows[i]
            if "error" in res:
                row["error"] = row_error(records[i].row, res["error"])
                continue
            row.update(prediction_fields(res, job.min_confidence))
            if "warning" in res:
                row["warning"] = row_error(records[i].row, res["warning"])
        return rows, None
    if job.mode == "index":
        return _index_rows(clf, records, ready, rows)
    images = ready.items
    titles = [r.name for r in use] if job.mode != "image" else None
    # embed: the image embedding where the image works, else the title's (auto), with a warning
    dim = int(clf.manifest["embedding_dim"])
    vectors = np.full((len(records), dim), np.nan, dtype=np.float32)
    img_vec = clf.embed_image(images) if images is not None and use else None
    # A row's image vector is usable when it has a photo that decoded (a row without one is in no error list)
    has_img = [img_vec is not None and u.image is not None and j not in img_vec.errors for j, u in enumerate(use)]
    need_text = [j for j in range(len(use)) if not has_img[j]]
    txt_vec = clf.embed_text([titles[j] for j in need_text]) if titles is not None and need_text else None
    txt_pos = {j: k for k, j in enumerate(need_text)}
    for j, i in enumerate(ok):
        row, r = rows[i], records[i]
        if has_img[j]:
            vectors[i], row["modality"] = img_vec.vectors[j], "image"
        elif txt_vec is not None and txt_pos[j] not in txt_vec.errors:
            vectors[i], row["modality"] = txt_vec.vectors[txt_pos[j]], "text"
            if img_vec is not None and r.image is not None:
                row["warning"] = row_error(r.row, f"{img_vec.errors[j]}; embedded by title only")
        else:
            msg = (img_vec.errors.get(j) if img_vec is not None else None) or (
                txt_vec.errors.get(txt_pos[j]) if txt_vec is not None else None) or "no usable image or title"
            row["error"] = row_error(r.row, msg if r.image or r.name else "has no image or title")
    return rows, vectors


def _index_rows(clf: Classifier, records: list[Record], ready: Ready,
                rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """embed --mode index: every vector an index holds per row (`product_vectors.embed_products`, the rule
    `huse index build` follows), NaN where left out, and why in the rows' image_error and text_error."""
    use = [records[i] for i in ready.ok]
    got, why = embed_products(clf, use, ready.items) if use else ({}, {})
    vectors = {m: np.full((len(records), w), np.nan, dtype=np.float32)
               for m, w in vector_widths(clf.manifest, has_visual(clf.manifest)).items()}
    for m, v in got.items():
        vectors[m][ready.ok] = v
    for i, row in enumerate(rows):
        if row["image"] and not is_url(row["image"]):  # the index is built elsewhere, from another directory
            row["image"] = os.path.abspath(row["image"])
        if i in ready.errors:  # the catalog's own error: neither modality
            row["image_error"] = row["text_error"] = row["error"]
    for j, i in enumerate(ready.ok):
        row, r = rows[i], records[i]
        for m in MODALITIES:
            row[f"{m}_error"] = why[m].get(j)
        row["modality"] = "+".join(m for m in MODALITIES if row[f"{m}_error"] is None) or None
        if row["modality"] is None:
            row["error"] = row_error(r.row, "has no usable image or title" if r.image or r.name else
                                      "has no image or title")
        elif row["image_error"] and r.image:  # a photo that failed, saved by its title (image_failures counts it)
            row["warning"] = row_error(r.row, f"{row['image_error']}; indexed by title only")
    return rows, vectors


# ------------------------------------------------------------------------------------------
# Shard files


def _schema(task: str, multi_label: bool = False, index: bool = False):
    pa = lazy_import("pyarrow", "scale")
    base = [("row", pa.int64()), ("product_id", pa.string()), ("image", pa.string()), ("name", pa.string()),
            ("classes", pa.string())]
    if task == "classify":
        base += [("mode", pa.string()), ("label", pa.string()), ("score", pa.float64()), ("needs_review", pa.bool_()),
                 ("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
                 ("path", pa.list_(pa.struct([("level", pa.int64()), ("label", pa.string()), ("score", pa.float64())])))]
        if multi_label:
            base += [("labels", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64()),
                                                     ("needs_review", pa.bool_())])))]
    else:
        base += [("modality", pa.string())]
        if index:
            base += [("image_error", pa.string()), ("text_error", pa.string())]
    return pa.schema(base + [("warning", pa.string()), ("error", pa.string())])


def _table_bytes(rows: list[dict[str, Any]], task: str, fmt: str, multi_label: bool = False,
                 index: bool = False) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n"
                       for r in rows).encode("utf-8")
    pa = lazy_import("pyarrow", "scale")
    pq = lazy_import("pyarrow.parquet", "scale")
    schema = _schema(task, multi_label, index)
    table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in schema.names}, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# `huse classify --out preds.csv`: one flat row per prediction, for spreadsheets (programs: JSONL or Parquet). A
# list becomes one cell, its items joined by "|" (the separator of a catalog's class paths, so no label holds it),
# its scores in a second cell in the same order; floats as Python writes them (they read back exactly).
CSV_COLUMNS = ("row", "product_id", "image", "name", "classes", "mode", "label", "score", "needs_review", "top_k",
               "top_k_scores", "path", "path_scores")
CSV_MULTI_LABEL = ("labels", "label_scores")
CSV_TAIL = ("warning", "error")


def _csv_header(multi_label: bool) -> list[str]:
    return [*CSV_COLUMNS, *(CSV_MULTI_LABEL if multi_label else ()), *CSV_TAIL]


def _csv_cells(row: dict[str, Any], header: list[str]) -> list[str]:
    """A prediction row (as the JSONL shards hold it) as the cells of `header`."""
    flat = dict(row)
    for key, scores in (("top_k", "top_k_scores"), ("path", "path_scores"), ("labels", "label_scores")):
        if row.get(key) is not None:
            flat[key] = "|".join(x["label"] for x in row[key])
            flat[scores] = "|".join(repr(float(x["score"])) for x in row[key])
    if row.get("needs_review") is not None:
        flat["needs_review"] = "true" if row["needs_review"] else "false"
    return ["" if flat.get(k) is None else sheet_cell(str(flat[k])) for k in header]


def _from_csv(cells: dict[str, str]) -> dict[str, Any]:
    """A CSV prediction row back in the shape `iter_predictions` yields (the JSONL rows' shape)."""
    # (a short row's missing cells are None, a long row's extra ones a list under None: neither is a column's value)
    cells = {k: from_sheet_cell(v) for k, v in cells.items() if isinstance(v, str)}

    def pairs(key: str, scores: str) -> list[dict[str, Any]]:
        labels, values = cells.get(key) or "", cells.get(scores) or ""
        return [{"label": a, "score": float(b)} for a, b in zip(labels.split("|"), values.split("|"))] if labels else []

    text = ("product_id", "image", "name", "classes", "mode", "label", "warning", "error")  # as written
    row: dict[str, Any] = {"row": int(cells["row"]), **{k: cells[k] for k in text if cells.get(k)}}
    if cells.get("score"):
        row["score"] = float(cells["score"])
    if cells.get("needs_review"):
        row["needs_review"] = cells["needs_review"] == "true"
    if cells.get("top_k"):
        row["top_k"] = pairs("top_k", "top_k_scores")
        row["path"] = [{"level": i, **p} for i, p in enumerate(pairs("path", "path_scores"), 1)]
    if cells.get("labels"):
        row["labels"] = pairs("labels", "label_scores")
    return row


def _npy_bytes(vectors: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """files.write_atomic with a temp name of this process's own: a shard retried on another Ray worker
    while the first is still writing it must not share a temp file with it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(k: int) -> str:
    return f"part-{k:05d}"


def write_shard(folder: Path, shard: Shard, rows: list[dict[str, Any]], vectors: np.ndarray | dict | None,
                job: BulkJob, retried: bool = False) -> dict[str, Any]:
    """Write one shard's files (temp name + rename each) and return its manifest entry."""
    name = shard_name(shard.index)
    bundle = json.loads((Path(job.bundle) / "manifest.json").read_text())  # verified when the Classifier loaded it
    multi = job.task == "classify" and is_multi_label(bundle)  # its shards then carry a `labels` column
    files = {f"{name}.{job.format}": _table_bytes(rows, job.task, job.format, multi, index=job.mode == "index")}
    if isinstance(vectors, dict):  # embed --mode index: one file per index space
        files.update({f"{name}.{m}.npy": _npy_bytes(v) for m, v in vectors.items()})
    elif vectors is not None:
        files[f"{name}.npy"] = _npy_bytes(vectors)
    for fname, data in files.items():
        _write_atomic(folder / fname, data)
    return {"shard": shard.index, "start": shard.start, "count": len(rows),
            "rows": [rows[0]["row"], rows[-1]["row"]] if rows else [],
            "files": {fname: hashlib.sha256(data).hexdigest() for fname, data in files.items()},
            **_counts(rows, set(bundle["labels"])), "retried": retried}


def _counts(rows: list[dict[str, Any]], labels: set[str]) -> dict[str, Any]:
    warn = [r["warning"] for r in rows if r.get("warning")]
    # Rows whose image could not be used (a title may have saved them): many mean a wrong --images.
    img_fail = [r.get("warning") or r.get("error") for r in rows
                if r.get("image") and "image" in (r.get("warning") or r.get("error") or "")]
    given = [(r, parse_paths(r["classes"])) for r in rows if r.get("classes") and r.get("label")]
    # Accuracy counts the rows whose classes the bundle has: a class it never learnt (another taxonomy, a new
    # category) cannot be its answer, and is counted apart rather than as wrong.
    known = [(r, paths) for r, paths in given if labels.intersection(paths)]
    # A multi-label row's predicted set against its classes (those the bundle has): micro-F1's three counts.
    sets = [({x["label"] for x in r["labels"]}, labels.intersection(paths)) for r, paths in known if "labels" in r]
    return {"errors": sum(r.get("error") is not None for r in rows), "warnings": len(warn),
            # right: the top-1 label is one of the row's classes (for one path: equal to it)
            "known": len(known), "right": sum(r["label"] in paths for r, paths in known),
            "unknown_classes": len(given) - len(known),
            **({"labels_right": sum(len(p & t) for p, t in sets), "labels_predicted": sum(len(p) for p, _ in sets),
                "labels_given": sum(len(t) for _, t in sets)} if sets else {}),
            "needs_review": sum(bool(r.get("needs_review")) for r in rows),
            "image_failures": len(img_fail), "first_image_error": img_fail[0] if img_fail else None}


# ------------------------------------------------------------------------------------------
# Output directory: staging, manifest, resume, final swap


class _Output:
    """OUT.partial while working; OUT once complete. The manifest lists only verified shards."""

    def __init__(self, job: BulkJob):
        self.job = job
        self.out = Path(job.out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.manifest: dict[str, Any] = {}
        self.created = False  # OUT.partial was made by this run (not a resumed one)

    def _check_target(self) -> None:
        _check_not_input(self.out, self.job)
        if self.out.exists() and not (self.out / MANIFEST).is_file() and (
                self.out.is_file() or any(self.out.iterdir())):
            raise HuseError(f"--out {self.out} exists and is not a huse output folder; choose another path "
                            "(a previous output of huse classify/embed is replaced only when the new one is complete)")

    def open(self) -> set[int]:
        """Prepare OUT.partial; returns the shards already done (resume)."""
        self._check_target()
        settings = self.job.settings()
        if self.partial.exists():
            if not self.job.resume:
                raise HuseError(f"{self.partial} holds an interrupted run; pass --resume to continue it, "
                                "or delete it to start over")
            old = self._load(self.partial)
            self._same_settings(old, settings)
            self.manifest = old
            return self._verify()
        if self.job.resume and (self.out / SUCCESS).is_file():
            old = self._load(self.out)
            self._same_settings(old, settings)
            self.manifest, self.partial = old, self.out  # complete already: nothing to redo
            return {int(k) for k in old["shards"]}
        self.partial.mkdir(parents=True)
        self.created = True
        self.manifest = {"layout": LAYOUT_VERSION, "settings": settings, "shards": {}, "complete": False}
        self._save()
        return set()

    def _load(self, folder: Path) -> dict[str, Any]:
        try:
            return json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise HuseError(f"{folder / MANIFEST} is unreadable ({e}); delete {folder} to start over") from None

    def _same_settings(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        old = old.get("settings", {})
        changed = [k for k in IDENTITY if k in old and old[k] != new[k]]  # absent in runs from before them
        if "data_sha256" in changed:
            raise HuseError(f"--resume with a catalog that changed since the interrupted run: {self.job.data} no "
                            "longer has the bytes its finished shards were made from. Resume with the catalog as it "
                            f"was, or delete {self.partial} to start over")
        if changed:
            raise HuseError(f"--resume with another bundle than the interrupted run: {self.job.bundle} is not the "
                            "model its finished shards were made with, and one output must come from one model. "
                            f"Resume with that bundle, or delete {self.partial} to start over")
        new = {k: v for k, v in new.items() if k not in IDENTITY}
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise HuseError(f"--resume with other settings than the interrupted run ({what}); rerun with the same "
                            f"options, or delete {self.partial} to start over")

    def _verify(self) -> set[int]:
        """Keep the listed shards whose files match their sha256; delete everything else."""
        good, keep = {}, {MANIFEST}
        for k, entry in self.manifest["shards"].items():
            if all((self.partial / f).is_file() and sha256_file(self.partial / f) == h for f, h in entry["files"].items()):
                good[k] = entry
                keep |= set(entry["files"])
        for p in self.partial.iterdir():
            if p.name not in keep:  # temp files and shards of the run that was killed mid-write
                p.unlink()
        self.manifest["shards"] = good
        self._save()
        return {int(k) for k in good}

    def discard_if_empty(self) -> None:
        """Remove OUT.partial if this run made it and finished no shard (e.g. the bundle was refused):
        there is nothing to resume, and a leftover would make the corrected rerun ask for --resume."""
        if self.created and not self.manifest.get("shards"):
            shutil.rmtree(self.partial, ignore_errors=True)

    def _save(self) -> None:
        _write_atomic(self.partial / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def add(self, entry: dict[str, Any]) -> None:
        self.manifest["shards"][str(entry["shard"])] = entry
        self._save()

    def finish(self, totals: dict[str, Any]) -> Path:
        if self.partial == self.out:
            return self.out
        self.manifest["complete"] = True
        self.manifest["totals"] = totals
        self._save()
        (self.partial / SUCCESS).write_text(json.dumps(totals) + "\n")
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.out)
        return self.out


# ------------------------------------------------------------------------------------------
# Engines


def _shards(job: BulkJob, done: set[int]) -> Iterator[tuple[Shard, list[Record]]]:
    """Stream (shard, records) in catalog order; finished shards are parsed past, not kept."""
    k, n, buf = 0, 0, []
    for rec in iter_catalog(job.data, job.images, encoding=job.encoding, confine=job.confine_images):
        if k not in done:
            buf.append(rec)
        n += 1
        if n == (k + 1) * job.shard_rows:
            if k not in done:
                yield Shard(k, k * job.shard_rows, len(buf), 0, buf[0].row), buf
            k, buf = k + 1, []
    if buf:
        yield Shard(k, k * job.shard_rows, len(buf), 0, buf[0].row), buf


def default_workers(threads: int | None) -> int:
    """Decode threads: on a small CPU one (onnxruntime keeps the rest), else a quarter of the cores."""
    cores = os.cpu_count() or 1
    return max(1, (cores - 1) // 4) if threads is None else max(1, cores - threads)


class _Prefetcher:
    """Prepares (`prepare_batch`) the next batches in a thread pool while the model runs this one:
    up to one batch per worker ahead, so memory stays at a few batches. `run_shard` also finishes
    classify batches in the same pool."""

    def __init__(self, clf: Classifier, workers: int, job: BulkJob):
        self.clf, self.job, self.depth = clf, job, max(1, workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="huse-prepare", initializer=set_thread_priority,
                                       initargs=(job.prepare_priority,)) if workers > 0 else None

    def run(self, batches: list[list[Record]]) -> Iterator[tuple[list[Record], Ready]]:
        """Each batch with its `Ready`, in order."""
        pending = deque(self.pool.submit(prepare_batch, self.clf, b, self.job) for b in batches[:self.depth])
        for k, batch in enumerate(batches):
            ready = pending.popleft().result()
            if k + self.depth < len(batches):
                pending.append(self.pool.submit(prepare_batch, self.clf, batches[k + self.depth], self.job))
            yield batch, ready

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def run_shard(clf: Classifier, shard: Shard, records: list[Record], job: BulkJob,
              prefetch: _Prefetcher | None = None) -> tuple[list[dict], np.ndarray | dict | None]:
    """All batches of one shard through `process_batch`. With a prefetch pool, classify's calling
    thread only runs the model (`clf.infer`): the pool prepares the next batches and finishes
    (describes, builds the rows of) the last ones, a bounded number in flight, in order."""
    batches = [records[s:s + job.batch_size] for s in range(0, len(records), job.batch_size)]
    if prefetch is None or prefetch.pool is None:
        done = [process_batch(clf, b, job) for b in batches]
    else:
        done, finishing = [], deque()
        for batch, ready in prefetch.run(batches):
            if job.task == "classify":
                probs = clf.infer(ready.items) if ready.items is not None else None
                finishing.append(prefetch.pool.submit(process_batch, clf, batch, job, ready, probs))
            else:  # embed runs its graphs inside process_batch: here, on this thread
                finishing.append(_done(process_batch(clf, batch, job, ready)))
            while len(finishing) > prefetch.depth:
                done.append(finishing.popleft().result())
        done += [f.result() for f in finishing]
    rows = [r for rs, _ in done for r in rs]
    vecs = [v for _, v in done if v is not None]
    if vecs and isinstance(vecs[0], dict):
        return rows, {m: np.concatenate([v[m] for v in vecs]) for m in vecs[0]}
    return rows, (np.concatenate(vecs) if vecs else None)


class _Progress:
    """tqdm on stderr when installed, else one line per shard with items/s and ETA.

    The bar appears on `show()` (once the model is loaded), so a refused bundle's error is the
    only thing on stderr: one line, as the CLI promises."""

    def __init__(self, total: int, initial: int, enabled: bool, unit: str):
        self.total, self.done, self.t0, self.enabled, self.bar = total, initial, time.perf_counter(), enabled, None
        self.start, self.unit, self.shown = initial, unit, False

    def show(self) -> None:
        if self.shown or not self.enabled:
            return
        self.shown = True
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit=self.unit, dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1)
        except ImportError:
            pass

    def update(self, n: int) -> None:
        self.show()
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        dt = time.perf_counter() - self.t0
        rate = (self.done - self.start) / dt if dt else 0.0
        eta = (self.total - self.done) / rate if rate and self.total > self.done else 0.0
        print(f"{self.done}/{self.total} rows, {rate:.0f} items/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _make_classifier(job: BulkJob, threads: int | None) -> Classifier:
    if job.classifier is not None:
        return job.classifier()
    # Whole text batches: cut by rows (what a lone caller's batch gets), a titles-only catalog took 1.29x the time
    # here, its second part and the prepare pool taking turns on the same cores (README "Catalog scale").
    return Classifier(job.bundle, backend=job.backend, precision=job.precision, device=job.device,
                      batch_size=job.batch_size, threads=threads, spinning=job.spinning,
                      trusted_keys=list(job.trusted_keys) or None, row_parts=1)


@fewer_collections()
def _run_local(job: BulkJob, output: _Output, done: set[int], progress: _Progress, result: BulkResult) -> None:
    # One thread reads the next shard's records and writes the last shard's files while the model runs
    # this shard's (the first shard is read while the model loads): on the calling thread both kept the
    # model waiting, ~12 us an item, 5% of int8-cpu's time on 2 cores. In order, at most one shard
    # waiting to be written.
    io_thread = ThreadPoolExecutor(1, thread_name_prefix="huse-io")
    shards = _shards(job, done)
    upcoming = io_thread.submit(next, shards, None)
    clf, prefetch, writing = None, None, None

    def write(shard: Shard, rows: list[dict[str, Any]], vectors: np.ndarray | None) -> None:
        output.add(write_shard(output.partial, shard, rows, vectors, job))
        result.rows_done_now += len(rows)
        progress.update(len(rows))

    try:
        clf = _make_classifier(job, job.threads)
        result.backend = f"{clf.backend} ({clf.device}, {job.precision})"
        workers = default_workers(job.threads) if job.workers is None else job.workers
        prefetch = _Prefetcher(clf, workers, job)
        n_shards, t0 = 0, time.perf_counter()
        while (item := upcoming.result()) is not None:
            progress.show()  # once the first shard is read: a catalog refused at its first rows is one line too
            if job.max_shards is not None and n_shards >= job.max_shards:
                break
            upcoming = io_thread.submit(next, shards, None)
            rows, vectors = run_shard(clf, *item, job, prefetch)
            if writing is not None:
                writing.result()
            writing = io_thread.submit(write, item[0], rows, vectors)
            n_shards += 1
        if writing is not None:
            writing.result()
        result.work_seconds = time.perf_counter() - t0
    finally:
        io_thread.shutdown(wait=True)  # a shard waiting to be written is finished work: written, never cancelled
        if prefetch is not None:
            prefetch.close()
        if clf is not None:
            clf.close()


class RayShardWorker:
    """A Ray Data actor: one Classifier (its bundle verified against its sha256 manifest here,
    on the worker), `run_shard` on each shard descriptor, the shard written to the shared output."""

    def __init__(self, job: dict[str, Any], folder: str):
        gc.set_threshold(*THRESHOLDS)  # the actor's process is its own: as `_run_local` runs (`_collector`)
        self.job = BulkJob(**job)
        self.folder = Path(folder)
        self.clf = _make_classifier(self.job, self.job.threads or 1)
        # Ray's parallelism is one actor per core: on CPU each prepares its batches inline (a prepare thread
        # per actor oversubscribed 2 cores: 3,518 items/s vs 4,181 inline, 2 actors, int8-cpu); with a GPU
        # one thread prepares the next batch while the GPU runs this one.
        workers = self.job.workers if self.job.workers is not None else int(self.job.device == "cuda")
        self.prefetch = _Prefetcher(self.clf, workers, self.job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = []
        for i in range(len(batch["index"])):
            shard = Shard(*(int(batch[k][i]) for k in ("index", "start", "count", "offset", "first_row")))
            # Temp files of an earlier attempt at this shard mean Ray retried it.
            retried = any(self.folder.glob(f".{shard_name(shard.index)}.*.tmp-*"))
            records = list(iter_catalog(self.job.data, self.job.images, encoding=self.job.encoding, shard=shard,
                                        confine=self.job.confine_images))
            rows, vectors = run_shard(self.clf, shard, records, self.job, self.prefetch)
            entries.append(json.dumps(write_shard(self.folder, shard, rows, vectors, self.job, retried=retried)))
        return {"entry": np.asarray(entries, dtype=object)}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a HOST:PORT where nothing listens: ray.init would retry it for minutes."""
    if address == "auto":  # Ray finds the cluster this node belongs to, or says it found none
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HuseError(f"--address {address} is not HOST:PORT (the Ray head's GCS address, port 6379 unless "
                        "`ray start --port` set another) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise HuseError(f"no Ray cluster answers at --address {address} ({e}); start its head with `ray start "
                        "--head` or check the address `ray start` printed") from None


def _run_ray(job: BulkJob, output: _Output, done: set[int], progress: _Progress, result: BulkResult) -> None:
    ray = lazy_import("ray", "scale")
    lazy_import("ray.data", "scale")
    if not ray.is_initialized():
        if job.address:
            try:
                ray.init(address=job.address, log_to_driver=False)
            except ConnectionError as e:
                raise HuseError(
                    f"could not join the Ray cluster at --address {job.address} ({e}). Check that its head is up "
                    f"(`ray status --address {job.address}`) and that this is its GCS address (HOST:6379 unless "
                    "`ray start --port` said otherwise). A cluster with token authentication (Ray 2.59+ turns it "
                    "on for `ray start`) needs RAY_AUTH_MODE=token here and its token in RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token (`ray get-auth-token` on the head prints it)") from None
        else:  # a new local instance on loopback, no dashboard, even where a `ray start` cluster runs
            ray.init(address="local", num_cpus=max(job.actors, 1), include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
    shards = [s for s in plan_shards(job.data, job.shard_rows, encoding=job.encoding) if s.index not in done]
    if job.max_shards is not None:
        shards = shards[:job.max_shards]
    if not shards:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows; Ray's bars (or log lines) would interleave with it
    items = [asdict(s) for s in shards]
    spec = {k: v for k, v in asdict(job).items() if k != "classifier"}
    spec["progress"] = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard: every actor gets work
    gpu = 1 if job.device == "cuda" else 0
    actors = min(job.actors, len(shards))  # an actor without a shard would only load the bundle
    ds = ds.map_batches(RayShardWorker, fn_constructor_kwargs={"job": spec, "folder": str(output.partial.resolve())},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=job.threads or 1, num_gpus=gpu)  # Ray Data restarts a dead actor and retries its shard
    result.backend = f"ray ({actors} actor{'s' * (actors > 1)}, {job.precision})"
    progress.show()
    t0 = time.perf_counter()
    for row in ds.iter_rows():
        entry = json.loads(row["entry"])
        output.add(entry)
        result.rows_done_now += entry["count"]
        progress.update(entry["count"])
    result.work_seconds = time.perf_counter() - t0


def run_bulk(job: BulkJob) -> BulkResult:
    """Classify or embed a whole catalog into a sharded output folder (see the module docstring).

    Args:
        job: the bundle, catalog, output folder and settings.
    Returns:
        The counts (rows, classified, errors, warnings, needs_review, shards resumed/retried) and speed.
    Raises:
        HuseError: bad settings, an output path that would destroy something, a mismatched resume.
    """
    _check_job(job)
    target = Path(job.out)
    suffix = target.suffix.lower()
    single = suffix in SINGLE_FILES
    if job.task != "classify" and suffix in (*SINGLE_FILES, ".npy", ".parquet"):
        raise HuseError(f"--out {target} names a file, but huse embed writes a folder (.npy vectors + a metadata "
                        f"table per shard); give --out a folder name such as {target.with_suffix('')}/, and read it "
                        "with huse.runtime.bulk.read_embeddings(FOLDER)")
    if job.task == "classify" and suffix in NOT_WRITTEN:
        stem = target.with_suffix("")
        raise HuseError(f"--out {target}: huse classify writes one file as .jsonl or .csv (a spreadsheet opens the "
                        f".csv), or Parquet shards into a folder; give --out {stem}.csv, {stem}.jsonl or {stem}/")
    if single:  # one JSONL or CSV file: shards (JSONL) in OUT.shards, joined and renamed at the end
        _check_not_input(target, job)
        if target.is_dir():
            raise HuseError(f"--out {target} is a folder; give a {suffix} file name or a folder name without {suffix}")
        own = (is_own_jsonl(target, "row", ("top_k", "error")) if suffix == ".jsonl"
               else is_own_csv(target, CSV_COLUMNS))
        if not own:  # as a folder that is not a huse output is refused
            raise HuseError(f"--out {target} exists and is not predictions of huse classify; choose another path "
                            "(a previous output is replaced only when the new one is complete)")
        job = replace(job, out=str(target.with_name(target.name + ".shards")), format="jsonl")
    if job.format == "parquet":  # now, not when the first shard is written after its rows were classified
        try:
            lazy_import("pyarrow.parquet", "scale")
        except HuseError as e:
            raise HuseError(f"{e}, or write JSON Lines shards with --format jsonl") from None
    # One run at a time per output: a second would resume (and clean) the first's OUT.partial under it.
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with one_writer(out.with_name(f".{out.name}.lock"), f"--out {target} is being written by another huse run "
                    "right now; wait for it to finish (or stop it, then --resume)", remove=True):
        return _run_bulk(job, target, single)


def _run_bulk(job: BulkJob, target: Path, single: bool) -> BulkResult:
    t0 = time.perf_counter()
    output = _Output(job)
    done = output.open()
    result = BulkResult(out=Path(job.out), shards_resumed=len(done))
    if output.partial != output.out:  # not already complete
        initial = sum(e["count"] for e in output.manifest["shards"].values())
        progress = None
        try:  # from the first read of the catalog: a file it cannot read leaves no OUT.partial to --resume
            progress = _Progress(count_rows(job.data), initial, job.progress, "rows")
            (_run_ray if job.engine == "ray" else _run_local)(job, output, done, progress, result)
        except BaseException:
            output.discard_if_empty()
            raise
        finally:
            if progress is not None:
                progress.close()
    result.seconds = time.perf_counter() - t0
    entries = sorted(output.manifest["shards"].values(), key=lambda e: e["shard"])
    result.shards = len(entries)
    result.rows = sum(e["count"] for e in entries)
    result.errors = sum(e["errors"] for e in entries)
    result.warnings = sum(e["warnings"] for e in entries)
    result.needs_review = sum(e["needs_review"] for e in entries)
    result.image_failures = sum(e["image_failures"] for e in entries)
    result.shards_retried = sum(bool(e.get("retried")) for e in entries)
    result.first_image_error = next((e["first_image_error"] for e in entries if e.get("first_image_error")), None)
    result.known = sum(e.get("known", 0) for e in entries)
    result.right = sum(e.get("right", 0) for e in entries)
    for key in ("labels_right", "labels_predicted", "labels_given"):
        setattr(result, key, sum(e.get(key, 0) for e in entries))
    result.unknown_classes = sum(e.get("unknown_classes", 0) for e in entries)
    result.classified = result.rows - result.errors
    if job.max_shards is None or output.partial == output.out:
        result.out = output.finish({"rows": result.rows, "errors": result.errors, "warnings": result.warnings,
                                    "needs_review": result.needs_review, "shards": result.shards})
    else:
        result.out = output.partial
    if single and result.out == Path(job.out):
        result.out = _join(result.out, target, job)
    return result


def _check_not_input(out: Path, job: BulkJob) -> None:
    data, out = Path(job.data).resolve(), out.resolve()
    if out == data or out in data.parents:
        raise HuseError(f"--out {out} would replace or contain the catalog {job.data}; choose another path")
    if job.images and out == Path(job.images).resolve():
        raise HuseError(f"--out {out} is the images folder; choose another path")


def _join(folder: Path, target: Path, job: BulkJob) -> Path:
    """The JSONL shards of a complete output, in order, as one file (temp + rename), then the folder goes: the
    shards' bytes as they are for a .jsonl target; a .csv one gets a header and a flat row per prediction."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if target.suffix.lower() == ".csv":
        header = _csv_header(is_multi_label(json.loads((Path(job.bundle) / "manifest.json").read_text())))
        with open(tmp, "w", encoding=CSV_ENCODING, newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(_csv_cells(row, header) for row in iter_predictions(folder))
            f.flush()
            os.fsync(f.fileno())
    else:
        with open(tmp, "wb") as f:
            for e in sorted(_complete(folder)["shards"].values(), key=lambda e: e["shard"]):
                for fname in e["files"]:
                    with open(folder / fname, "rb") as part:
                        shutil.copyfileobj(part, f)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, target)
    shutil.rmtree(folder)
    return target


def _check_job(job: BulkJob) -> None:
    if job.task not in TASKS:
        raise HuseError(f"task {job.task!r} is not one of {list(TASKS)}")
    if job.format not in FORMATS:
        raise HuseError(f"--format {job.format!r} is not one of {list(FORMATS)}")
    for name in ("batch_size", "top_k", "shard_rows", "actors"):
        v = getattr(job, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise HuseError(f"--{name.replace('_', '-')} must be a positive integer; got {v!r}")
    if job.workers is not None and job.workers < 0:
        raise HuseError(f"--workers must be 0 (decode on the calling thread) or more; got {job.workers}")
    if job.threads is not None and job.threads <= 0:
        raise HuseError(f"--threads must be a positive integer; got {job.threads}")
    if job.prepare_priority not in PRIORITIES:
        raise HuseError(f"--prepare-priority {job.prepare_priority!r} is not one of {list(PRIORITIES)}")
    if not 0.0 <= job.min_confidence <= 1.0:
        raise HuseError(f"--min-confidence must be between 0 and 1; got {job.min_confidence}")
    modes = ("auto", "fused", "image", "text") if job.task == "classify" else ("auto", "image", "text", "index")
    if job.mode not in modes:
        raise HuseError(f"--mode {job.mode!r} is not one of {list(modes)} for {job.task}")
    if job.engine not in ("local", "ray"):
        raise HuseError(f"--engine {job.engine!r} is not one of ['local', 'ray']")
    if job.address and job.engine != "ray":
        raise HuseError(f"--address {job.address} names a Ray cluster, which only --engine ray uses; add --engine ray")
    if job.address and job.address.startswith("ray://"):  # Ray Data fails inside its executor there
        raise HuseError(f"--address {job.address} is a Ray Client address, and Ray Data does not run over Ray "
                        "Client: run huse on a node of the cluster (or as a Ray Job there) with --address auto or "
                        "HEAD:6379, the catalog, bundle and --out on paths every node sees")
    if job.address:
        _check_reachable(job.address)
    check_catalog_file(job.data)
    if not Path(job.bundle).is_dir():
        raise HuseError(f"bundle {job.bundle} is not a folder; create one with `huse-export RUN --out BUNDLE`")


# ------------------------------------------------------------------------------------------
# Reading outputs back


def _complete(folder: Path) -> dict[str, Any]:
    if not (folder / SUCCESS).is_file():
        raise HuseError(f"{folder} is not a complete huse output ({SUCCESS} missing)")
    return json.loads((folder / MANIFEST).read_text())


def iter_predictions(folder: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a complete output (predictions, or an embed output's metadata) in catalog order, streamed a
    shard and a Parquet batch at a time: memory stays that of one batch, whatever the output's size. `folder`
    may also be the one file `huse classify --out X.jsonl` or `X.csv` writes."""
    folder = Path(folder)
    if folder.is_file():
        yield from _iter_prediction_file(folder)
        return
    m = _complete(folder)
    for e in sorted(m["shards"].values(), key=lambda e: e["shard"]):
        for fname in e["files"]:
            if fname.endswith(".jsonl"):
                with open(folder / fname, encoding="utf-8") as f:
                    yield from (json.loads(line) for line in f if line.strip())
            elif fname.endswith(".parquet"):
                pq = lazy_import("pyarrow.parquet", "scale")
                for batch in pq.ParquetFile(folder / fname).iter_batches(batch_size=4096):
                    yield from batch.to_pylist()


def _iter_prediction_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding=CSV_ENCODING, newline="") as f:
            yield from (_from_csv(cells) for cells in csv.DictReader(f))
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise HuseError(f"predictions {path}, line {n}: not JSON ({e.msg})") from None


def read_predictions(folder: str | Path) -> list[dict[str, Any]]:
    """All rows of a complete output, in catalog order, as a list (for small outputs and tests)."""
    return list(iter_predictions(folder))


def iter_embeddings(folder: str | Path) -> Iterator[tuple[list[dict[str, Any]], dict[str, np.ndarray]]]:
    """(metadata rows, vectors) of each shard of a complete embed output in catalog order, one shard in memory at
    a time, each file checked against the sha256 the manifest lists. vectors: {"embedding": (n, dim)}, or for
    `--mode index` {"image", "text"[, "visual"]}.

    Raises:
        HuseError: not a complete embed output, or a file that does not match its sha256.
    """
    import io

    folder = Path(folder)
    m = _complete(folder)
    if m["settings"].get("task") != "embed":
        raise HuseError(f"{folder} holds the predictions of huse {m['settings'].get('task')}, not embeddings")
    for e in sorted(m["shards"].values(), key=lambda e: e["shard"]):
        rows, vectors = [], {}
        for fname, digest in e["files"].items():
            data = (folder / fname).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise HuseError(f"{folder / fname} does not match the sha256 in {folder / MANIFEST}: it changed or "
                                "is damaged since huse embed wrote it; run huse embed again")
            if fname.endswith(".npy"):
                vectors[fname.split(".")[1] if fname.count(".") == 2 else "embedding"] = np.load(
                    io.BytesIO(data), allow_pickle=False)
            elif fname.endswith(".jsonl"):
                rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            else:
                pq = lazy_import("pyarrow.parquet", "scale")
                rows = pq.read_table(io.BytesIO(data)).to_pylist()
        yield rows, vectors


def read_embeddings(folder: str | Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(vectors, metadata rows) of a complete embed output, in catalog order (for outputs that fit in memory;
    `iter_embeddings` streams them a shard at a time)."""
    rows, vecs = [], []
    for r, v in iter_embeddings(folder):
        if "embedding" not in v:
            raise HuseError(f"{folder} holds the vectors of an index (huse embed --mode index: {sorted(v)}); build "
                            "the index from it with `huse index build BUNDLE --embeddings FOLDER --out INDEX`")
        rows += r
        vecs.append(v["embedding"])
    return (np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)), rows
