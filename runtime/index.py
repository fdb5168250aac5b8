"""Product retrieval: a self-describing FAISS index over a catalog's universal embeddings.

    from huse.runtime import Index
    Index.build("bundle/", "catalog.csv", "idx/")              # embeds with the lean runtime
    Index.from_embed_output("bundle/", "emb/", "idx/")          # from `huse embed --mode index` (Ray, resumable)
    idx = Index.open("idx/")                                    # the bundle recorded in the manifest
    idx.search(texts=["black leather ankle boots"], k=10, target="image", filter="shoes<boots")

HUSE puts photos and titles in one L2-normalised space, so any query modality can search any
target. There is one FAISS index per target modality (image, text); `target="text"` lists each product's
title once (its photos' rows share it), and `target="product"` searches both and keeps one hit per
product_id (the best of its photos and title). A query with both a
photo and a title is the fused query: normalise(w * image + (1 - w) * text), w being the
bundle's fusion weight.

Two spaces (issue 10). The universal space is class-structured: it answers "products of this
kind", from a photo or a title. It does not keep two products of one class apart well, so a
bundle that has the visual-similarity output (export/graphs.py) also gets a third index,
`visual`, over the same photo rows: the frozen backbone's pooled features, PCA-whitened (the bundle's
`visual` output, export/graphs.py), centred on the indexed catalog (its mean kept in visual.centre.npy
for queries and later adds) and L2-normalised.
`search(images=..., space="visual")` answers "this same product / duplicates, from a photo"
(target "image" or "product"); titles and fused queries have no visual vector.

Index kinds (`kind="auto"` chooses by vector count and memory, `choose_kind`: flat, else ivf; never the graph):
- flat: `IDMap2,Flat`, exact inner product. Small catalogs (< FLAT_MAX vectors), or when asked.
- hnsw: `IDMap2,HNSW32`, a graph; fast and accurate while it fits the memory budget.
- ivf:  `IVF{nlist},SQ8`, 8-bit codes (a quarter of the memory) searched over `nprobe` lists, the
  max(RERANK * k, RERANK_MIN) best candidates re-scored exactly from the float vectors (memory-mapped from disk).
  The lists are read into RAM (memory-mapped above IVF_MMAP_ABOVE).
Search parameters (efSearch, nprobe) are tuned at build time against exact search on a sample of
queries until recall@10 >= TARGET_RECALL (as the sample's lower bound); the measured figure is in the
manifest.

Directory layout (every file's sha256 is in manifest.json and checked before the file is used,
hashed once per file version and then trusted by a stamp: runtime/stamps.py; no pickle anywhere):
- manifest.json: bundle path and fingerprint (sha256 of the bundle's manifest.json), precision,
  dim, fusion weight, kind, per-modality factory string, search parameters, recall, counts.
- items.jsonl (+ items.offsets.npy): one JSON object per item (row, product_id, name, image,
  classes), read by seeking to the hits only, so opening a 200k-item index reads no item text.
  A relative image path is kept relative to the index folder (manifest "image_paths"), so hits name
  the photo from any working directory, and an index moved together with its photos still finds
  them; the API returns it absolute. (Indexes made before keep the path as their catalog was read.)
- items.class.npy, items.product.npy, items.mods.npy, items.alive.npy: per-item class code,
  product code, which modalities are indexed (bit 1 image, 2 text), and the tombstone mask.
- {image,text,visual}.faiss (faiss.write_index; read memory-mapped, IVF lists into RAM up to IVF_MMAP_ABOVE),
  {image,text,visual}.vectors.npy
  (float32, NaN for rows not in that index; memory-mapped, read only for re-ranking, exact fallback,
  re-tuning). visual.* only when the bundle has the visual output; it holds exactly the image rows
  (a photo whose universal or visual vector failed is in neither), in manifest["visual_dim"] dims;
  visual.centre.npy: the catalog mean the visual vectors are centred on.
- excluded.jsonl: the rows left out of a modality (failed or missing photo/title) and why.
- photos.N.bin: the photos a catalog held as bytes (a Parquet image column), copied as given, one file
  per build or add (N: the first item it wrote); such an item's record names its span
  ("photo": [file, offset, size]) and `photo(item)` returns the bytes. Hits have no path for them
  (image None); the page shows them from here. `keep_photos=False` (`--no-photos`) leaves them out.

Memory (building): a catalog file is read twice, counted and then streamed EMBED_CHUNK rows at a time; the
vectors are embedded straight into the {image,text,visual}.vectors.npy files (memory-mapped: the page cache holds
them, not the process), each item's line is written as it comes, and each FAISS index is filled and tuned from
those files EXACT_ROWS rows at a time, one modality after the other. So a build holds one modality's FAISS index,
a few bytes of bookkeeping per item (offsets, codes, product ids) and the IVF training sample (IVF_TRAIN_MAX), not
the vectors (README "Retrieval": measured per product). `add` streams its catalog the same way into grown copies
of the vector files (a first pass reads its product ids); it reads the FAISS indexes whole to change them.

Signing (issue 12): `build(..., sign_key=KEY)` / `huse index build ... --sign KEY` signs
manifest.json with the bundles' Ed25519 scheme (runtime/signing.py, the one copy of the rule:
manifest.sig beside it). The manifest holds every file's sha256 and the bundle's fingerprint, so
the signature covers the whole index. `open(..., trusted_keys=[...])` / `huse search
--trusted-key PUB` refuses an unsigned or badly signed index, verifies every file it uses, and
opens the bundle with the same keys. `add`/`remove` re-sign with `sign_key`, else they drop the
now-stale signature: the changed index is unsigned (a trusted-key open refuses it), never
vouched for by a signature of other bytes.

Removal: flat and ivf delete the vectors from the FAISS index (`remove_ids`); FAISS's HNSW cannot
delete, so a removed item there is a tombstone that an IDSelector filters out at search time (and
the exact fallback skips): a removed product is never a hit. Rebuild to reclaim the space.

Changes are whole: an add or remove writes the index's next version in `.NAME.next` beside it (hard links to
the files it keeps: files are only ever replaced, never changed in place) and exchanges the two folders in one
rename (`Index._writing`), so a kill at any instant leaves the index as it was or as it is after.
"""

from __future__ import annotations

import array
import contextlib
import difflib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from huse.runtime.bundle import FORMAT as BUNDLE_FORMAT
from huse.runtime.bundle import has_visual, package_versions
from huse.runtime.classifier import _per_item, _positive_int
from huse.runtime.files import MANIFEST, check_replaceable, one_writer, sha256_file
from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import SEPARATOR, canonical
from huse.runtime.labels import PATH_SEPARATOR, join_paths, matches_prefix, parse_paths
from huse.runtime.product_vectors import MODALITIES, ROWS_OF, embed_products, vector_widths
from huse.runtime.stamps import sha256_matches

__all__ = ["Index", "Hit", "choose_kind", "parse_memory", "KINDS", "TARGETS", "SPACES"]

FORMAT = "huse-index"
FORMAT_VERSION = 1
LOCK = ".lock"  # held by the one add or remove at work (never listed in the manifest)
IMAGE_PATHS = "relative to the index folder"  # manifest["image_paths"]; absent: as the catalog was read
KINDS = ("auto", "flat", "hnsw", "ivf")
TARGETS = ("image", "text", "product")
MOD_BIT = {"image": 1, "text": 2}
SPACES = ("universal", "visual")
# The visual index centres its vectors on the catalog it was built from (queries and later adds too):
# on the fashion-products multi-view set (first 2,000 products) same-product R@1 went 0.495 -> 0.499 (the backbone's
# own features centred on the catalog), the training-set mean alone leaving a common component.
VISUAL_CENTRE = "visual.centre.npy"
VISUAL_TARGETS = ("image", "product")  # a photo's visual vector searches photos, or products by their photos
FLAT_MAX = 50_000  # exact search of 50k 512-d vectors is ~2 ms per query on 2 cores: fast enough, no tuning
HNSW_M = 32  # graph degree: FAISS's usual choice for 0.95+ recall on 512-d embeddings
HNSW_EF_CONSTRUCTION = 40  # recall@10 0.999 at efSearch 32 on 50k clustered 512-d vectors (TOOLCHAIN.md)
RERANK = 4  # ivf: candidates re-scored exactly per hit wanted...
RERANK_MIN = 32  # ...and at least this many: 8-bit codes reorder near-duplicates (same product, other photo)
TARGET_RECALL = 0.95  # recall@10 vs exact that tuning must reach, as a lower bound (_tune)
TUNE_QUERIES = 500  # queries in the tuning sample
# A hit counts toward recall when its exact score is within this of the k-th true neighbour's: ann-benchmarks'
# k-NN recall (ann_benchmarks/plotting/metrics.py, epsilon 1e-3). Counting ids instead makes ties a miss, and
# the universal space ties a lot: products of one class share a point (fashion-products' photos score 1.0000
# against their 200 nearest), so which of the tied products comes back is arbitrary, and by ids IVF "reached"
# recall 0.02 at nprobe = nlist, an exhaustive scan.
RECALL_EPSILON = 1e-3
# Exact top-k scores queries in (step, n) blocks of at most this many bytes: 64 queries a block up to 250,000
# vectors, fewer above (at 2 million products 64 a block took 2 GB beside the vectors).
EXACT_BLOCK_BYTES = 256 << 20
# ...and reads the vectors this many rows at a time (128 MB at 512-d), as the build adds them to FAISS: a memory-
# mapped array of millions of products is never copied whole.
EXACT_ROWS = 65_536
# An IVF index trains on 256 vectors a list, at most this many unless 40 a list need more (FAISS asks 39): at 10
# million products 256 a list would be 4 million vectors, 8 GB that FAISS's training copies twice, and hours of
# k-means. Below 524,288 products nothing changes.
IVF_TRAIN_MAX = 1 << 19
# Peak memory of `build` (anonymous: the vectors are in files): about BUILD_BYTES_BASE (the runtime, the IVF
# training sample, exact top-k blocks) + BUILD_BYTES_PER_PRODUCT a product (one modality's 8-bit codes and ids,
# the item bookkeeping). Measured (benchmarks/index_memory.py; README "Retrieval"): 1.96 GiB at 1,000,000 and 2.39
# GiB at 2,000,000 products, ~460 bytes a product between them; rounded up. A catalog that clearly will not fit is
# said so before the embedding starts.
BUILD_BYTES_BASE = 3 << 29
BUILD_BYTES_PER_PRODUCT = 700
# IVF lists read memory-mapped are scanned ~4x slower than from RAM (nprobe 64 over 200,000 products:
# 1.38 vs 0.33 ms per query; flat and HNSW do not care), and the index budget counts them in RAM anyway.
# Above this size a fresh process would spend over a second reading them, so they stay on disk.
IVF_MMAP_ABOVE = 2 << 30
EXACT_FALLBACK = 4096  # a filter that leaves at most this many rows is searched exactly over them
EMBED_CHUNK = 256
SIGN_HINT = "huse index build BUNDLE --data CATALOG --out INDEX --sign KEY"


def _faiss():
    from huse.runtime._lazy import lazy_import

    return lazy_import("faiss", "index")


# -- choosing an index ------------------------------------------------------------------
def parse_memory(value: str | int | float) -> int:
    """'4G', '512M', '1.5GiB' or a byte count -> bytes."""
    s = str(value).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        size = int(float(s[:-1]) * scale[s[-1]]) if s and s[-1] in scale else int(float(s))
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise HuseError(f"memory budget {value!r} is not a size; use e.g. 512M, 4G or a byte count")
    return size


def _nlist(n: int) -> int:
    # autofaiss: about 4 * sqrt(n) lists (a power of two), each trained on >= 39 points
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, 65536, n // 39 or 1)))


def memory_estimate(kind: str, n: int, dim: int) -> int:
    """Bytes of RAM one modality's index of `n` vectors needs (ids included)."""
    if kind == "flat":
        return n * (dim * 4 + 8)
    if kind == "hnsw":
        return n * (dim * 4 + 8 + HNSW_M * 2 * 4 + 16)  # vectors + ~2M level-0 links + level bookkeeping
    if kind == "ivf":
        return n * (dim + 8) + _nlist(n) * dim * 4  # 8-bit codes + ids + centroids (floats re-ranked from disk)
    raise HuseError(f"index kind {kind!r} is not one of {list(KINDS)}")


def choose_kind(n: int, dim: int, max_memory: str | int = "4G", modalities: int = 2, visual_dim: int = 0) -> str:
    """The index kind for `n` vectors per modality within a memory budget for the whole index
    (`modalities` indexes of width `dim`, plus the visual index of width `visual_dim` when not 0).

    Exact below FLAT_MAX vectors; above, an inverted file with 8-bit codes and exact re-ranking. Not a
    graph (HNSW), as autofaiss would pick while it fits: half of huse's queries are cross-modal (a
    title searching photos), which land where no indexed vector is, and HNSW needed efSearch 1024 for
    recall@10 0.95 on them (p50 1.5 ms, 10.6x exact) where IVF-SQ8 needed nprobe 96 (0.61 ms, 26x) on
    200,000 products (benchmarks/results/cpu-2core/retrieval). `--kind hnsw` is still there.
    A budget nothing fits is an error that says what would.
    """
    budget = parse_memory(max_memory)
    widths = [dim] * modalities + ([visual_dim] if visual_dim else [])
    need = {k: sum(memory_estimate(k, n, w) for w in widths) for k in ("flat", "ivf")}
    if n < FLAT_MAX and need["flat"] <= budget:
        return "flat"
    if need["ivf"] <= budget:
        return "ivf"
    visual = f" and the visual index (dim {visual_dim})" if visual_dim else ""
    raise HuseError(f"{n} vectors of dim {dim} in {modalities} modalities{visual} need at least "
                    f"{need['ivf'] / 2**20:.0f} MiB "
                    f"(ivf, 8-bit codes); the budget is {budget / 2**20:.0f} MiB. Raise --max-memory")


def _factory(kind: str, n: int) -> str:
    return {"flat": "IDMap2,Flat", "hnsw": f"IDMap2,HNSW{HNSW_M}", "ivf": f"IVF{_nlist(n)},SQ8"}[kind]


# -- results -------------------------------------------------------------------------------
@dataclass
class Hit:
    """One search result. `item` is the position in the index's item table; `row` the catalog row."""

    item: int
    row: int | None
    product_id: str | None
    name: str | None
    image: str | None
    classes: str | None
    score: float
    modality: str  # the index it came from (image, text, or visual: a photo found in the visual space)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Searched:
    """What `Index.search_batch` returns: per query its hits, best first; a query without a usable
    vector (a missing photo, an empty title) has no hits and its reason in `errors` (position ->
    "no usable image or text (why)")."""

    hits: list[list[Hit]]
    errors: dict[int, str] = field(default_factory=dict)


def _progress(done: int, total: int, what: str) -> None:
    end = "\n" if done >= total else ""
    print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centre_visual(visual: np.ndarray, centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Visual vectors as the visual index holds them: minus `centre` (None: the mean of the finite rows,
    i.e. the catalog being indexed), L2-normalised; NaN rows stay NaN. Returns (vectors, centre)."""
    if centre is None:
        ok = np.isfinite(visual).all(1)
        centre = visual[ok].mean(0) if ok.any() else np.zeros(visual.shape[1], np.float32)
    return _normalise(visual - centre).astype(np.float32), np.asarray(centre, np.float32)


def _failures(ok: np.ndarray, errors: dict[int, str], what: str) -> dict[int, str]:
    """Each query without a usable vector -> why: "no usable {what} (reason)"."""
    return {int(i): f"no usable {what} ({errors.get(int(i), 'nothing given')})" for i in np.flatnonzero(~ok)}


def _exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over the rows `ids` of `vectors` (an item-addressed array, in
    memory or memory-mapped); -1 / -inf pad when fewer. Reads EXACT_ROWS rows at a time, so that a memory-mapped
    array of millions of products is never copied whole."""
    k_eff = min(k, len(ids))
    scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids_out = np.full((len(queries), k), -1, dtype=np.int64)
    if k_eff == 0:
        return scores_out, ids_out
    for r in range(0, len(ids), EXACT_ROWS):
        block_ids = ids[r:r + EXACT_ROWS]
        block = np.asarray(vectors[block_ids], np.float32)
        step = max(1, min(64, EXACT_BLOCK_BYTES // (16 * len(block))))  # 16 bytes a score with argpartition's copies
        kb = min(k_eff, len(block))
        for s in range(0, len(queries), step):
            sc = queries[s:s + step] @ block.T
            part = np.argpartition(-sc, kb - 1, axis=1)[:, :kb]
            # this block's best and the best so far, merged (the earlier block first among equal scores)
            both_s = np.concatenate([scores_out[s:s + step, :k_eff], np.take_along_axis(sc, part, 1)], 1)
            both_i = np.concatenate([ids_out[s:s + step, :k_eff], block_ids[part]], 1)
            order = np.argsort(-both_s, axis=1, kind="stable")[:, :k_eff]
            scores_out[s:s + step, :k_eff] = np.take_along_axis(both_s, order, 1)
            ids_out[s:s + step, :k_eff] = np.take_along_axis(both_i, order, 1)
    return scores_out, ids_out


def _usable(vectors: np.ndarray) -> np.ndarray:
    """Which rows of an (N, D) array are finite, read EXACT_ROWS rows at a time."""
    return np.concatenate([np.isfinite(vectors[r:r + EXACT_ROWS]).all(1) for r in range(0, len(vectors), EXACT_ROWS)]
                          or [np.zeros(0, bool)])


# -- the FAISS side: build, tune, search one modality --------------------------------------
def _build_faiss(kind: str, vectors: np.ndarray, ids: np.ndarray, dim: int, seed: int = 0):
    """The FAISS index of the rows `ids` of the item-addressed `vectors`, trained (IVF) on a sample of at most
    IVF_TRAIN_MAX of them and filled EXACT_ROWS rows at a time."""
    faiss = _faiss()
    factory = _factory(kind, len(ids))
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if kind == "ivf":
        rng = np.random.default_rng(seed)
        nlist = _nlist(len(ids))
        sample = rng.choice(len(ids), min(len(ids), 256 * nlist, max(IVF_TRAIN_MAX, 40 * nlist)), replace=False)
        index.train(np.ascontiguousarray(vectors[ids[sample]], np.float32))
    for r in range(0, len(ids), EXACT_ROWS):
        index.add_with_ids(np.ascontiguousarray(vectors[ids[r:r + EXACT_ROWS]], np.float32), ids[r:r + EXACT_ROWS])
    return index, factory


def _search_params(kind: str, params: dict, selector=None):
    faiss = _faiss()
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(params["efSearch"]))
    if kind == "ivf":
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(params["nprobe"]))
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def _ann(index, kind: str, params: dict, queries: np.ndarray, k: int, vectors: np.ndarray | None, selector=None):
    """FAISS search; ivf re-scores RERANK * k candidates exactly from the float vectors."""
    kk = max(k * RERANK, RERANK_MIN) if kind == "ivf" else k
    if kind == "hnsw":  # efSearch must be >= k for k results
        params = {**params, "efSearch": max(int(params["efSearch"]), kk)}
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), kk,
                               params=_search_params(kind, params, selector))
    if kind == "ivf" and vectors is not None:
        safe = np.where(ids >= 0, ids, 0)
        exact = np.einsum("qd,qkd->qk", queries, np.asarray(vectors[safe.ravel()]).reshape(*ids.shape, -1))
        exact = np.where(ids >= 0, exact, -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)
        ids = np.where(np.isfinite(scores), ids, -1)
    return scores, ids


def _tuning_queries(vectors: np.ndarray, ids: np.ndarray, cross: Sequence[tuple[np.ndarray, np.ndarray]] = (),
                    seed: int = 0, crowd: int = 10) -> np.ndarray:
    """TUNE_QUERIES stand-ins for real queries: centres of the nearest neighbours of indexed vectors (the rows
    `ids` of `vectors`), and
    (half of them, when given) embeddings of the other modalities (`cross`: their (N, D) arrays, each with the
    positions of its usable rows; sampled where they lie, never copied whole: at a million products a copy is GBs).

    A query in its own modality sits in a crowd of near ties; a slightly perturbed copy of an indexed
    vector finds itself first and makes any setting look good. A cross-modal query (a title searching
    photos) lands where no indexed vector is, which a graph index finds hardest: tuned on same-modality
    copies alone, HNSW's recall@10 measured 0.62-0.65 on a 200,000-product catalog with half of the
    queries cross-modal.
    """
    if not len(ids):
        return np.zeros((0, vectors.shape[1]), np.float32)
    rng = np.random.default_rng(seed)
    finite = [f for _, f in cross]
    starts = np.cumsum([0] + [len(f) for f in finite])
    n_cross = min(int(starts[-1]), TUNE_QUERIES // 2)
    src = np.asarray(vectors[ids[rng.choice(len(ids), min(TUNE_QUERIES - n_cross, len(ids)), replace=False)]])
    nn = _exact_topk(src, vectors, ids, min(crowd, len(ids)))[1]
    own = _normalise(np.asarray(vectors[nn.ravel()]).reshape(*nn.shape, -1).mean(axis=1))
    picked = rng.choice(int(starts[-1]), n_cross, replace=False)  # positions among all usable rows, in order
    part = np.searchsorted(starts, picked, side="right") - 1
    others = [cross[a][0][finite[a][p - starts[a]]] for a, p in zip(part, picked)]
    return np.concatenate([own, np.asarray(others, np.float32).reshape(-1, vectors.shape[1])]).astype(np.float32)


def _tune(index, kind: str, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray,
          k: int = 10) -> tuple[dict, float | None]:
    """The cheapest efSearch/nprobe whose recall@k vs exact (RECALL_EPSILON) reaches TARGET_RECALL on `queries`,
    with a margin, over the rows `ids` of the item-addressed `vectors`.

    The tuning sample is one draw of queries: a setting that just reaches 0.95 on it measured 0.948 on
    the benchmark's queries. So the bar is the sample's lower bound, mean - 2 standard errors of the
    per-query recall (about 0.96 on 500 queries). Returns the setting and its mean recall.
    """
    if kind == "flat" or not len(ids):
        return {}, 1.0 if len(ids) else None
    k = min(k, len(ids))
    kth = _exact_topk(queries, vectors, ids, k)[0][:, k - 1]  # the k-th true neighbour's score

    def recall(params: dict) -> np.ndarray:
        return _recall(*_ann(index, kind, params, queries, k, vectors), kth)

    # Powers of two and the steps halfway between: each step costs at most 1.5x the one before.
    steps = sorted({int(m * 2 ** i) for i in range(17) for m in (1, 1.5)})
    if kind == "hnsw":
        grid = [{"efSearch": ef} for ef in steps if 16 <= ef <= 2048]
    else:
        grid = [{"nprobe": p} for p in sorted({min(p, index.nlist) for p in steps})]
    for params in grid:
        r = recall(params)
        if r.mean() - 2 * r.std() / math.sqrt(len(r)) >= TARGET_RECALL:
            break
    return params, float(r.mean())


def _recall(scores: np.ndarray, got: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per query, the share of its (Q, k) hits whose exact score is within RECALL_EPSILON of `kth`, the k-th
    true neighbour's score (ann-benchmarks' k-NN recall)."""
    return ((got >= 0) & (scores >= kth[:, None] - RECALL_EPSILON)).sum(1) / got.shape[1]


# -- the index --------------------------------------------------------------------------------
def _check_target(kind: str, out: str | Path, overwrite: bool) -> Path:
    """The checks a build makes before any work: a known kind, and no index overwritten by accident."""
    if kind not in KINDS:
        raise HuseError(f"index kind {kind!r} is not one of {list(KINDS)}")
    out = Path(out)
    if out.is_file():
        raise HuseError(f"--out {out} is a file; an index is a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise HuseError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        check_replaceable(out, FORMAT, "huse index", "--overwrite")
    return out


class Index:
    """A retrieval index over a catalog's universal embeddings; use `Index.build` or `Index.open`.

    An open Index follows adds and removes (made here or by another process), and threads may share it: its
    searches, `records` and `photo` run one at a time, each on one version of the index (FAISS uses every
    core within a search).

    Args (of `open`):
        folder: the index directory.
        bundle: the bundle to embed queries with (default: the path recorded at build); its
            fingerprint must match the one the index was built with.
        verify: check each file's sha256 before it is first used (lazily: a search on the image
            index never reads or hashes the text index).
        threads: FAISS OpenMP threads (None: FAISS's default, all cores).
        trusted_keys: Ed25519 public key files (PEM): refuse the index unless its manifest is
            signed by one, verify every file it uses (`verify` is forced on) and open the bundle
            with the same keys. None: unsigned indexes open.
    """

    def __init__(self, folder: Path, manifest: dict, bundle: Path | None, verify: bool, threads: int | None,
                 trusted_keys: Sequence[str | Path] | None = None):
        self.folder = folder
        self.manifest = manifest
        self.bundle = bundle
        self.trusted_keys = list(trusted_keys) if trusted_keys else None
        self.verify = verify or bool(self.trusted_keys)
        self.kind: str = manifest["kind"]
        self.dim: int = int(manifest["dim"])
        self.visual_dim: int | None = int(manifest["visual_dim"]) if "visual_dim" in manifest else None
        self.fusion_weight = float(manifest["fusion_image_weight"])
        self.classes: list[str] = manifest["classes"]
        self._image_base = os.path.abspath(folder) if manifest.get("image_paths") == IMAGE_PATHS else None
        self._verified: set[str] = set()
        self._faiss: dict[str, Any] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._classifier = None
        self._stamp = _stamp(folder)  # of the manifest read (by `open`, just before)
        # Held by each read (search, records, photo) and by `_reload`: a thread's read sees one version of the
        # index, never a manifest another thread has just read again beside arrays cached from the last one.
        self._lock = threading.RLock()
        if threads:
            _faiss().omp_set_num_threads(int(threads))

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, bundle: str | Path | None = None, verify: bool = True,
             threads: int | None = None, trusted_keys: Sequence[str | Path] | None = None) -> "Index":
        """Open an index directory (see the class docstring)."""
        folder = Path(folder)
        _recover(folder)
        manifest = _load_index_manifest(folder, trusted_keys)
        recorded = manifest["bundle"]
        if bundle is None:
            bundle = Path(recorded["path"]) if recorded.get("path") else None
            if bundle is not None and not (bundle / MANIFEST).is_file():
                bundle = None  # moved: texts/images queries will ask for it; vector queries still work
        if bundle is not None:
            bundle = Path(bundle)
            found = _bundle_fingerprint(bundle)
            if found != recorded["fingerprint"]:
                raise HuseError(f"bundle {bundle} (fingerprint {found[:16]}) is not the bundle index {folder} was built "
                                f"with (fingerprint {recorded['fingerprint'][:16]}, from {recorded.get('path')}); "
                                "query with that bundle or rebuild the index with `huse index build`")
        return cls(folder, manifest, bundle, verify, threads, trusted_keys)

    def _file(self, name: str, use_stamps: bool = True) -> Path:
        """FOLDER/NAME, its sha256 checked against the manifest the first time it is used.

        A fresh process checks through runtime/stamps.py: each file version is hashed once and
        stamped in a user cache, later opens only stat it. At 200,000 products hashing the ~0.5 GB
        index of each target searched was most of a fresh `huse search`'s 1 s; a changed file
        (new inode, size, mtime or ctime) is always hashed again.
        """
        path = self.folder / name
        if name not in self.manifest["files"]:
            raise HuseError(f"index {self.folder}: {name} is not listed in its manifest; rebuild the index")
        if self.verify and name not in self._verified:
            if not path.is_file():
                raise HuseError(f"index {self.folder}: file {name} listed in the manifest is missing; rebuild the index")
            if not sha256_matches(path, self.manifest["files"][name], use_stamps=use_stamps):
                raise HuseError(f"index {self.folder}: file {name} does not match its sha256 in the manifest "
                                "(changed or corrupted); refusing to use it. Rebuild the index or restore the file")
            self._verified.add(name)
        return path

    def _centred(self, visual: np.ndarray) -> np.ndarray:
        """Visual vectors as the visual index holds them: minus the indexed catalog's mean, L2-normalised."""
        return centre_visual(visual, self._array(VISUAL_CENTRE))[0]

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self._file(name), allow_pickle=False)
        return self._arrays[name]

    def _index(self, mod: str):
        if mod not in self._faiss:
            faiss = _faiss()
            path = str(self._file(f"{mod}.faiss"))
            # Read-only memory maps: flat/HNSW codes stay on disk until touched; IVF lists only when large.
            if self.kind == "ivf":
                flag = faiss.IO_FLAG_MMAP if os.path.getsize(path) > IVF_MMAP_ABOVE else 0
            else:
                flag = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            try:
                self._faiss[mod] = faiss.read_index(path, flag)
            except RuntimeError:
                self._faiss[mod] = faiss.read_index(path)
        return self._faiss[mod]

    def _vectors_of(self, mod: str) -> np.ndarray:
        if mod not in self._vectors:
            self._vectors[mod] = np.load(self._file(f"{mod}.vectors.npy"), mmap_mode="r", allow_pickle=False)
        return self._vectors[mod]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["items"])

    def __repr__(self) -> str:
        return (f"Index({str(self.folder)!r}, kind={self.kind!r}, items={len(self)}, dim={self.dim}, "
                f"modalities={self._indexes()})")

    @property
    def has_visual(self) -> bool:
        """Whether the index holds visual-similarity vectors (built with a bundle that has them)."""
        return "visual" in self.manifest["modalities"]

    def _indexes(self) -> list[str]:
        """The FAISS indexes this index holds: image and text, and visual when it has one."""
        return list(self.manifest["modalities"])

    def _width(self, name: str) -> int:
        return self.visual_dim if name == "visual" else self.dim

    def _check_space(self, space: str, target: str | None = None, texts: Sequence[Any] | None = None) -> None:
        """Refuse what the visual space cannot answer, saying what is allowed."""
        if space not in SPACES:
            raise HuseError(f"space {space!r} is not one of {list(SPACES)}")
        if space == "universal":
            return
        if texts is not None and any(t is not None for t in texts):
            raise HuseError("space='visual' searches by photo only (images=...): a title, or a photo with a title (a "
                            "fused query), has no visual vector. Search those in space='universal'")
        if target is not None and target not in VISUAL_TARGETS:
            raise HuseError(f"space='visual' searches product photos (target 'image') or products by their photos "
                            f"(target 'product'), not target {target!r}: titles have no visual vectors. "
                            "Use space='universal' for target 'text'")
        if not self.has_visual:
            raise HuseError(f"index {self.folder} has no visual vectors: it was built with a bundle exported before "
                            "them (or from embeddings without them). Re-export the bundle with this huse-edge version "
                            "(`huse-export RUN --out BUNDLE`) and rebuild the index (`huse index build BUNDLE --data "
                            "CATALOG --out INDEX`) to search space='visual'; space='universal' works as it is")

    # -- searching --------------------------------------------------------------------------
    def embed_queries(self, texts: Sequence[str | None] | None = None, images: Sequence[Any] | None = None,
                      space: str = "universal") -> np.ndarray:
        """Query vectors: (Q, D) universal ones, image, text, or the fused normalise(w * image + (1 - w) * text)
        where a query has both; or with space="visual" (Q, visual_dim) visual vectors of photos. HuseError
        names the first query without a usable vector."""
        q, failed = self._query_vectors(texts, images, space)
        if failed:
            i, why = next(iter(failed.items()))
            raise HuseError(f"query {i} has {why}; {len(failed)} of {len(q)} queries failed"
                            + ("" if len(q) == 1 else " (search_batch answers the others and gives each failure)"))
        return q

    def _query_vectors(self, texts: Sequence[str | None] | None, images: Sequence[Any] | None,
                       space: str) -> tuple[np.ndarray, dict[int, str]]:
        """`embed_queries`' vectors, with a NaN row for each query that has no usable vector, and why
        (query position -> message, in position order)."""
        if texts is None and images is None:
            raise HuseError("search needs texts, images or both")
        texts, images = _per_item(texts, "texts"), _per_item(images, "images")  # not a lone title, char by char
        self._check_space(space, texts=texts)
        if texts is not None and images is not None and len(texts) != len(images):
            raise HuseError(f"got {len(images)} images but {len(texts)} texts; pass one of each per query (None for missing)")
        clf = self._embedder()
        n = len(texts if texts is not None else images)
        if space == "visual":
            vis = np.full((n, self.visual_dim), np.nan, np.float32)
            idx = [i for i, x in enumerate(images) if x is not None]
            e = clf.embed_visual([images[i] for i in idx])
            vis[idx] = e.vectors
            return self._centred(vis), _failures(np.isfinite(vis).all(1),
                                                 {idx[j]: f"image: {msg}" for j, msg in e.errors.items()}, "image")
        img = np.full((n, self.dim), np.nan, np.float32)
        txt = np.full((n, self.dim), np.nan, np.float32)
        errors: dict[int, str] = {}
        if images is not None:
            idx = [i for i, x in enumerate(images) if x is not None]
            e = clf.embed_image([images[i] for i in idx])
            img[idx] = e.vectors
            errors.update({idx[j]: f"image: {msg}" for j, msg in e.errors.items()})
        if texts is not None:
            idx = [i for i, x in enumerate(texts) if x is not None]
            e = clf.embed_text([texts[i] for i in idx])
            txt[idx] = e.vectors
            for j, msg in e.errors.items():
                errors[idx[j]] = errors.get(idx[j], "") + ("; " if idx[j] in errors else "") + f"title: {msg}"
        ok_i, ok_t = np.isfinite(img).all(1), np.isfinite(txt).all(1)
        w = self.fusion_weight
        q = np.where((ok_i & ok_t)[:, None], w * np.nan_to_num(img) + (1 - w) * np.nan_to_num(txt),
                     np.where(ok_i[:, None], np.nan_to_num(img), np.nan_to_num(txt)))
        q[~(ok_i | ok_t)] = np.nan
        return _normalise(q.astype(np.float32)), _failures(ok_i | ok_t, errors, "image or text")

    def _embedder(self):
        if self._classifier is None:
            if self.bundle is None:
                raise HuseError(f"index {self.folder} was built with bundle {self.manifest['bundle'].get('path')}, which is "
                                "not there any more; pass the bundle (`--bundle` / Index.open(..., bundle=...))")
            from huse.runtime.classifier import Classifier

            self._classifier = Classifier(self.bundle, precision=self.manifest["precision"], verify=self.verify,
                                          trusted_keys=self.trusted_keys)
        return self._classifier

    def search(self, texts: Sequence[str | None] | None = None, images: Sequence[Any] | None = None, k: int = 10,
               target: str = "image", filter: str | None = None, space: str = "universal") -> list[list[Hit]]:
        """Search by title, photo or both (fused), one query per position.

        Args:
            texts: query titles (None entries where a query has only a photo).
            images: query photos (paths, bytes, PIL images, arrays; None where a query has only a title).
            k: hits per query (fewer when the index, or the filter, holds fewer).
            target: "image" (product photos), "text" (product titles, each product's once) or "product" (one hit per
                product_id, the best of its photos and title).
            filter: a hierarchy prefix, e.g. "clothing<tops": only products of that subtree.
            space: "universal" (the default): products of this kind, class level, any query modality against
                any target. "visual": this same product or its duplicates, from a photo: photo-only queries
                against target "image" or "product", in the visual-similarity index (an index built with a
                bundle that has visual vectors). Anything else raises HuseError saying what is allowed.
        Returns:
            Per query, its hits best first.
        Raises:
            HuseError: a query without a usable photo or title (named); `search_batch` answers the rest instead.
        """
        self._check_space(space, target, texts)
        return self.search_vectors(self.embed_queries(texts=texts, images=images, space=space), k=k, target=target,
                                   filter=filter, space=space)

    def search_batch(self, texts: Sequence[str | None] | None = None, images: Sequence[Any] | None = None,
                     k: int = 10, target: str = "image", filter: str | None = None,
                     space: str = "universal") -> Searched:
        """`search` for a batch of queries from a file or a client, where a bad query (a missing or broken
        photo, an empty title) fails alone: it gets no hits and its reason in `Searched.errors`, and the
        others are answered. Arguments as for `search`; a bad argument (k, target, filter, space) still
        raises HuseError."""
        self._check_space(space, target, texts)
        q, failed = self._query_vectors(texts, images, space)
        ok = [i for i in range(len(q)) if i not in failed]
        found = self.search_vectors(q[ok], k=k, target=target, filter=filter, space=space)  # checks the arguments
        hits: list[list[Hit]] = [[] for _ in range(len(q))]
        for i, h in zip(ok, found):
            hits[i] = h
        return Searched(hits, failed)

    def search_vectors(self, queries: np.ndarray, k: int = 10, target: str = "image",
                       filter: str | None = None, space: str = "universal") -> list[list[Hit]]:
        """`search` for query vectors already computed, as `embed_queries` returns them: (Q, D) universal
        ones, L2-normalised, or with space="visual" (Q, visual_dim) visual ones centred on the indexed
        catalog (`centre_visual`; target "image" or "product")."""
        if target not in TARGETS:
            raise HuseError(f"target {target!r} is not one of {list(TARGETS)}")
        self._check_space(space, target)
        k = _positive_int(k, "k")
        with self._lock:
            self._follow()
            return self._search_now(queries, k, target, filter, space)

    def _search_now(self, queries: np.ndarray, k: int, target: str, filter: str | None,
                    space: str) -> list[list[Hit]]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        name = "visual" if space == "visual" else target
        if queries.shape[1] != self._width(name):
            raise HuseError(f"query vectors have dim {queries.shape[1]}; the index holds dim {self._width(name)} "
                            f"in space {space!r}")
        allowed = self._allowed(filter)
        if target == "text":
            return self._search_titles(queries, k, allowed)
        if target != "product":
            scores, ids = self._search_mod(name, queries, k, allowed)
            return [self._hits(s, i, name) for s, i in zip(scores, ids)]
        return self._search_products(queries, k, allowed, ["visual"] if space == "visual" else list(MODALITIES))

    def _allowed(self, filter: str | None) -> np.ndarray | None:
        """Mask of items a search may return (alive and under the filter), None when all may."""
        alive = self._array("items.alive.npy").astype(bool)
        mask = None if alive.all() else alive
        if filter:
            prefix = canonical(filter)
            # a class code is a product's whole set of paths: it matches if any of its paths does
            codes = [i for i, c in enumerate(self.classes) if matches_prefix(c, prefix)]
            if not codes:
                paths = {p for c in self.classes for p in c.split(PATH_SEPARATOR)}
                roots = sorted({p.split(SEPARATOR)[0] for p in paths})
                nodes = {SEPARATOR.join(p.split(SEPARATOR)[:n]) for p in paths for n in range(1, p.count(SEPARATOR) + 2)}
                # a misspelling, another case, or the start of a longer name ('health' for 'health & wellness')
                close = difflib.get_close_matches(prefix, nodes, n=1, cutoff=0.8) or [
                    n for n in sorted(nodes, key=len) if n.lower().startswith(prefix.lower())]
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise HuseError(f"filter {filter!r} matches no class in index {self.folder}; {hint}"
                                f"top-level classes: {roots}")
            under = np.isin(self._array("items.class.npy"), codes)
            mask = under if mask is None else mask & under
        return mask

    def _search_mod(self, mod: str, queries: np.ndarray, k: int, allowed: np.ndarray | None):
        info = self.manifest["modalities"][mod]
        if info["count"] == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        cand = None
        if allowed is not None:
            cand = np.flatnonzero(allowed & self._rows_of(mod))
            if len(cand) <= EXACT_FALLBACK:
                return _exact_topk(queries, self._vectors_of(mod), cand, k)
        selector, keep = None, None
        if allowed is not None:
            keep = np.packbits(allowed, bitorder="little")
            selector = _faiss().IDSelectorBitmap(len(allowed), _faiss().swig_ptr(keep))
        vecs = self._vectors_of(mod) if self.kind == "ivf" else None
        scores, ids = _ann(self._index(mod), self.kind, info["search_params"], queries, k, vecs, selector)
        del keep
        # A graph search under a selective filter can come back short: answer those queries exactly.
        n_possible = min(k, info["count"] - self._removed_in(mod) if cand is None else len(cand))
        short = np.flatnonzero((ids >= 0).sum(1) < n_possible)
        if len(short):
            if cand is None:
                cand = np.flatnonzero(self._array("items.alive.npy").astype(bool) & self._rows_of(mod))
            s2, i2 = _exact_topk(queries[short], self._vectors_of(mod), cand, k)
            scores[short], ids[short] = s2, i2
        return scores, ids

    def _rows_of(self, mod: str) -> np.ndarray:
        """Mask of the items that have a vector in index `mod` (a photo for image and visual, a title for text)."""
        return (self._array("items.mods.npy") & MOD_BIT[ROWS_OF[mod]]) > 0

    def _removed_in(self, mod: str) -> int:
        return int(self.manifest["modalities"][mod].get("tombstones", 0))

    def _search_products(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
                         indexes: list[str]) -> list[list[Hit]]:
        product = self._array("items.product.npy")
        mods = [m for m in indexes if self.manifest["modalities"][m]["count"]]
        total = sum(self.manifest["modalities"][m]["count"] for m in mods)
        out = []
        for q in queries:
            kk = min(4 * k, total) or 1
            while True:
                best: dict[int, tuple[float, int, str]] = {}
                for m in mods:
                    scores, ids = self._search_mod(m, q[None], kk, allowed)
                    for s, i in zip(scores[0], ids[0]):
                        if i >= 0 and (product[i] not in best or s > best[product[i]][0]):
                            best[product[i]] = (float(s), int(i), m)
                if len(best) >= k or kk >= total:
                    break
                kk = min(2 * kk, total)
            ranked = sorted(best.values(), key=lambda t: -t[0])[:k]
            items = self._items([i for _, i, _ in ranked])
            out.append([Hit(item=i, score=s, modality=m, **items[i]) for s, i, m in ranked])
        return out

    def _search_titles(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> list[list[Hit]]:
        """target "text": each product's title once. A product's photos are rows that usually share its title,
        so the text index holds that title once per photo: k hits of one product's six rows would be one answer
        six times. A hit is the best-scoring row of its (product_id, title), rows without a product_id sharing one
        (a title is the answer here); more candidates are read until k are distinct or the index has no more."""
        if allowed is None:
            n = self.manifest["modalities"]["text"]["count"] - self._removed_in("text")
        else:  # the rows a filtered search can return: no candidate list longer than them
            n = int((allowed & self._rows_of("text")).sum())
        if n == 0:
            return [[] for _ in queries]
        out: list[list[Hit] | None] = [None] * len(queries)
        todo, kk = np.arange(len(queries)), min(4 * k, n)
        while len(todo):
            scores, ids = self._search_mod("text", queries[todo], kk, allowed)
            items = self._items(sorted({int(i) for i in ids.ravel() if i >= 0}))
            short = []
            for q, row_scores, row_ids in zip(todo.tolist(), scores, ids):
                hits, seen = [], set()
                for s, i in zip(row_scores.tolist(), row_ids.tolist()):
                    key = (items[i]["product_id"], items[i]["name"]) if i >= 0 else None
                    if key is not None and key not in seen:
                        seen.add(key)
                        hits.append(Hit(item=i, score=s, modality="text", **items[i]))
                if len(hits) < k and kk < n:
                    short.append(q)
                out[q] = hits[:k]
            todo, kk = np.asarray(short, dtype=np.int64), min(2 * kk, n)
        return out

    def _hits(self, scores: np.ndarray, ids: np.ndarray, mod: str) -> list[Hit]:
        keep = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
        items = self._items([i for _, i in keep])
        return [Hit(item=i, score=s, modality=mod, **items[i]) for s, i in keep]

    def _items(self, positions: list[int]) -> dict[int, dict]:
        """Item records of the given positions, read by seeking (the table is never loaded whole)."""
        out = {}
        for p, rec in self._stored(positions).items():
            out[p] = {key: rec.get(key) for key in ("row", "product_id", "name", "image", "classes")}
            out[p]["image"] = self._image_path(out[p]["image"])
        return out

    def _stored(self, positions: list[int]) -> dict[int, dict]:
        """The item table's lines of the given positions, as stored."""
        offsets = self._array("items.offsets.npy")
        with open(self._file("items.jsonl"), "rb") as f:
            out = {}
            for p in sorted(set(positions)):
                f.seek(int(offsets[p]))
                out[p] = json.loads(f.read(int(offsets[p + 1] - offsets[p])))
            return out

    @property
    def holds_photos(self) -> bool:
        """Whether the index keeps photos its catalogs held as bytes (photos.N.bin; see `photo`)."""
        return any(_is_photos_file(name) for name in self.manifest["files"])

    def photo(self, item: int) -> bytes | None:
        """The photo the index keeps for `item`: the encoded bytes its catalog held (a Parquet image column).

        Args:
            item: an item position (a hit's `item`).
        Returns:
            The bytes as the catalog held them; None when the item has none kept (a photo given as a path,
            which `records` names, or no photo).
        """
        with self._lock:
            self._follow()
            self._check_positions([item])
            span = self._stored([int(item)])[int(item)].get("photo")
            if span is None:
                return None
            name, offset, size = span
            if not _is_photos_file(name):
                raise HuseError(f"index {self.folder}: item {item} names {name!r} as its photo file; rebuild the index")
            with open(self._file(name), "rb") as f:
                f.seek(int(offset))
                data = f.read(int(size))
        if len(data) != int(size):
            raise HuseError(f"index {self.folder}: {name} ends before item {item}'s photo; rebuild the index")
        return data

    def _image_path(self, stored: str | None) -> str | None:
        """An item's photo as the API returns it: absolute where the index keeps it relative to its folder."""
        if stored is None or self._image_base is None or os.path.isabs(stored):
            return stored
        return os.path.normpath(os.path.join(self._image_base, stored))

    def records(self, positions: Sequence[int]) -> dict[int, dict]:
        """Item records {row, product_id, name, image, classes} of the given positions, read by seeking.

        Args:
            positions: item positions, 0 <= p < len(self).
        Returns:
            position -> its record.
        """
        with self._lock:
            self._follow()
            self._check_positions(positions)
            return self._items([int(p) for p in positions])

    def _check_positions(self, positions: Sequence[int]) -> None:
        bad = [p for p in positions if not 0 <= int(p) < len(self)]
        if bad:
            raise HuseError(f"item {bad[0]} is not in the index (it holds {len(self)} items)")

    def items(self) -> list[dict]:
        """Every item record in position order (the whole table; for tools and tests)."""
        return [dict(it, image=self._image_path(it.get("image"))) for it in self._stored_items()]

    def _stored_items(self):
        """The item table as stored, an item at a time (a catalog of millions is never held as dicts)."""
        return (json.loads(line) for line in self._item_lines())

    def _item_lines(self) -> Iterator[bytes]:
        """items.jsonl's lines, one per item in position order."""
        with open(self._file("items.jsonl"), "rb") as f:
            yield from (line for line in f if line.strip())

    def _refuse_rows_held(self, by_photo: dict[tuple[str, str | None], int], alive: np.ndarray) -> None:
        """Refuse an add whose rows without a product_id are already in the index: an item without one, with the
        same photo file and title. Such a row has no other identity, so a catalog added twice (a photo folder's,
        say, written again after new photos came) would otherwise hold every earlier photo twice."""
        held = []
        for i, it in self._items_without_id():
            if alive[i] and isinstance(it.get("image"), str):
                row = by_photo.get((_same_file(self._image_path(it["image"])), it.get("name")))
                if row is not None:
                    held.append((row, it["image"]))
        if held:
            held.sort()
            shown = ", ".join(f"row {row} ({image})" for row, image in held[:3]) + (", ..." if len(held) > 3 else "")
            raise HuseError(f"{len(held)} row(s) of this catalog have no product_id and are already in the index (the "
                            f"same photo file and title): {shown}; adding them again would return each one twice. "
                            "Leave them out of the catalog, or give every row a product_id (a catalog with product ids "
                            "can update its products with --replace)")

    def _items_without_id(self) -> Iterator[tuple[int, dict]]:
        """(position, item) of each item without a product_id; the others are passed over by the start of their
        line (`_line_product_id`: most of a catalog of millions has ids)."""
        for i, line in enumerate(self._item_lines()):
            if _line_product_id(line) is None:
                yield i, json.loads(line)

    def _product_ids(self) -> Iterator[str | None]:
        """Each item's product_id in position order, read off the start of its line (an add or remove looks up a
        few products among millions of items: 3x faster than parsing each line)."""
        return map(_line_product_id, self._item_lines())

    def excluded(self) -> Iterator[dict]:
        """Rows left out of a modality's index, a line of excluded.jsonl at a time (a catalog of millions can leave
        out millions of photos): {"item", "row", "product_id", "modality", "error"}."""
        with open(self._file("excluded.jsonl"), encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())

    # -- building and changing -----------------------------------------------------------------
    @classmethod
    def build(cls, bundle: str | Path, data: str | Path | Sequence[Any], out: str | Path, images: str | Path | None = None,
              kind: str = "auto", max_memory: str | int = "4G", precision: str = "fp32", batch_size: int = 64,
              threads: int | None = None, progress: bool = True, overwrite: bool = False,
              sign_key: str | Path | None = None, confine_images: bool = False, keep_photos: bool = True) -> "Index":
        """Embed every product of a catalog and write an index directory (with the visual index when the
        bundle has visual vectors: see the module docstring).

        Args:
            bundle: the bundle (from `huse-export`) whose embeddings are indexed and queried.
            data: a catalog file (CSV/JSONL/Parquet, as `huse classify` reads), or a list of products: dicts
                with the catalog's columns (image, name, classes, product_id), read by the same rules, or
                catalog Records.
            out: the index directory to write (must not exist unless `overwrite`).
            images: folder that relative image paths resolve against.
            kind: "auto", "flat", "hnsw" or "ivf" (see the module docstring).
            max_memory: RAM budget for the whole index (every FAISS index: image, text, visual), e.g. "4G".
            precision: the bundle precision used to embed ("fp32", "fp16", "int8-cpu", ...).
            batch_size, threads: passed to the Classifier (and threads to FAISS).
            progress: print a progress line to stderr.
            overwrite: replace an existing directory.
            sign_key: an Ed25519 private key file (PEM): sign the index's manifest (see the module docstring).
            confine_images: refuse image paths that could leave `images` (absolute, `..`, a link out);
                such a row is left out and listed in excluded.jsonl. For catalogs from third parties.
            keep_photos: keep a copy of the photos the catalog holds as bytes (photos.N.bin: the module
                docstring), so that `photo(item)` and the page can show them; False: embed them, keep none.
        Returns:
            The opened Index.
        """
        from huse.runtime.classifier import Classifier

        out = _check_target(kind, out, overwrite)
        _check_sign_key(sign_key)  # a bad key fails now, not after minutes of embedding
        if threads:
            _faiss().omp_set_num_threads(int(threads))
        else:
            _faiss()  # fail on a missing extra before minutes of embedding
        records, n = _catalog(data, images, confine_images, progress)
        if not n:
            raise HuseError(f"catalog {data} has no rows to index")
        _warn_memory(n)
        with _scratch(out) as tmp:
            with Classifier(bundle, precision=precision, batch_size=batch_size, threads=threads) as clf:
                vecs = _vector_files(tmp, vector_widths(clf.manifest, has_visual(clf.manifest)), n)
                items, excluded = _Items(tmp, relative_to=out, keep_photos=keep_photos), _Exclusions(tmp)
                _embed(clf, records, vecs, 0, n, progress, excluded, keep=items.add)
            return cls._write(tmp, out, bundle, items, vecs, excluded, kind=kind, max_memory=max_memory,
                              precision=precision, threads=threads, progress=progress, sign_key=sign_key)

    @classmethod
    def from_embeddings(cls, bundle: str | Path, records: Sequence[Any], vectors: dict[str, np.ndarray], out: str | Path,
                        kind: str = "auto", max_memory: str | int = "4G", precision: str = "fp32",
                        excluded: list[dict] | None = None, threads: int | None = None, progress: bool = True,
                        overwrite: bool = False, sign_key: str | Path | None = None) -> "Index":
        """Write an index directory from embeddings already computed with `bundle` (the second half of `build`).

        Args:
            records: one catalog Record, or an object or dict with row, product_id, name, image and classes
                (the metadata `huse embed` writes, `bulk.read_embeddings`), per row.
            vectors: {"image": (N, D), "text": (N, D)} float32, L2-normalised; NaN rows are left out
                of that modality (list why in `excluded`, else "embedding is not finite" is recorded).
                With "visual": (N, visual_dim) too (the bundle must have visual vectors), the visual index
                is written; a photo whose image or visual row is NaN is left out of both. The arrays may be
                memory-mapped (`np.load(..., mmap_mode="r")`): they are read a block at a time, never changed.
            Others: as for `build`.
        Returns:
            The opened Index.
        """
        from huse.runtime.bundle import load_manifest, require_visual

        out = _check_target(kind, out, overwrite)
        records = [_described(r, i) for i, r in enumerate(records)]
        bm = load_manifest(bundle, verify=False)
        if "visual" in vectors:
            require_visual(bm, bundle)
        width = vector_widths(bm, "visual" in vectors)
        if set(vectors) - set(width) or any(np.shape(vectors[m]) != (len(records), w) for m, w in width.items()):
            raise HuseError(f"embeddings must be ({len(records)}, D) per modality with D = {width}; got "
                            f"{ {m: np.shape(v) for m, v in vectors.items()} }")
        with _scratch(out) as tmp:
            vecs = _vector_files(tmp, width, len(records))
            for m, v in vecs.items():  # copied, a block at a time: the caller's arrays stay as they are
                _copy_rows(v, vectors[m])
            _pair_visual(vecs)
            given, excluded = list(excluded or []), _Exclusions(tmp)
            listed = {(e["item"], e["modality"]) for e in given}
            excluded.add(given)
            for m in MODALITIES:
                excluded.add({"item": int(i), "row": records[i].row, "product_id": records[i].product_id,
                              "modality": m, "error": "embedding is not finite"}
                             for i in np.flatnonzero(~_usable(vecs[m])) if (int(i), m) not in listed)
            items = _Items(tmp, relative_to=out)
            items.add(records)
            return cls._write(tmp, out, bundle, items, vecs, excluded, kind=kind, max_memory=max_memory,
                              precision=precision, threads=threads, progress=progress, sign_key=sign_key)

    @classmethod
    def from_embed_output(cls, bundle: str | Path, embeddings: str | Path, out: str | Path, kind: str = "auto",
                          max_memory: str | int = "4G", threads: int | None = None, progress: bool = True,
                          overwrite: bool = False, sign_key: str | Path | None = None) -> "Index":
        """Write an index directory from the output of `huse embed --mode index` (run on a Ray cluster, or resumed
        after a crash), read a shard at a time: the index `build` would write from the same catalog, with the
        precision the vectors were made at. Photos a Parquet catalog held as bytes are not kept (`--no-photos`).

        Raises:
            HuseError: not a complete `--mode index` output, made with another bundle, or a file that changed.
        """
        from huse.runtime.bundle import load_manifest

        out = _check_target(kind, out, overwrite)
        _check_sign_key(sign_key)
        if threads:
            _faiss().omp_set_num_threads(int(threads))
        else:
            _faiss()  # fail on a missing extra before reading gigabytes
        embeddings = Path(embeddings)
        st, n = _embed_output(embeddings, _bundle_fingerprint(bundle), bundle)
        bm = load_manifest(bundle, verify=False)
        with _scratch(out) as tmp:
            vecs = _vector_files(tmp, vector_widths(bm, has_visual(bm)), n)
            items, excluded = _Items(tmp, relative_to=out), _Exclusions(tmp)
            for s, records, got, why in _embedded(embeddings, n, vecs):
                for m, v in got.items():
                    vecs[m][s:s + len(records)] = v
                items.add(records)
                excluded.add(why)
                if progress:
                    _progress(s + len(records), n, "reading embeddings")
            return cls._write(tmp, out, bundle, items, vecs, excluded, kind=kind, max_memory=max_memory,
                              precision=st["precision"], threads=threads, progress=progress, sign_key=sign_key)

    @classmethod
    def _write(cls, tmp: Path, out: Path, bundle: str | Path, items: "_Items", vecs: dict[str, np.ndarray],
               excluded: "_Exclusions", kind: str, max_memory: str | int, precision: str, threads: int | None,
               progress: bool, sign_key: str | Path | None) -> "Index":
        """The index folder `out` from its vectors (memory-mapped files in `tmp`, paired, NaN where left out) and
        item table: the visual vectors centred, one FAISS index per modality, the manifest; then `tmp` becomes `out`."""
        from huse.runtime.bundle import load_manifest

        bm = load_manifest(bundle, verify=False)
        dim, w = int(bm["embedding_dim"]), float(bm["fusion"]["image_weight"])
        usable = {m: _usable(v) for m, v in vecs.items()}  # one pass over each file; centring keeps them usable
        if "visual" in vecs:  # centred on this catalog: the centre is kept for queries and later adds
            centre = _mean_rows(vecs["visual"], usable["visual"])
            _centre_in_place(vecs["visual"], centre)
            _save_npy(tmp / VISUAL_CENTRE, centre)
        if kind == "auto":
            kind = choose_kind(max(int(u.sum()) for u in usable.values()), dim, max_memory,
                               visual_dim=vecs["visual"].shape[1] if "visual" in vecs else 0)
        classes = items.close(_mod_bits(usable))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "bundle": {"path": str(Path(bundle).resolve()), "fingerprint": _bundle_fingerprint(bundle)},
                    "precision": precision, "dim": dim, "fusion_image_weight": w, "kind": kind,
                    "max_memory": parse_memory(max_memory), "classes": classes,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions("huse-edge", "faiss-cpu", "numpy"),
                    "removal": _REMOVAL[kind], "modalities": {}}
        if "visual" in vecs:
            manifest["visual_dim"] = vecs["visual"].shape[1]
        manifest["image_paths"] = IMAGE_PATHS
        excluded.close()
        ids = {m: np.flatnonzero(u) for m, u in usable.items()}
        for mod, v in vecs.items():  # the visual space has no cross-modal queries to tune for
            others = [(vecs[m], ids[m]) for m in MODALITIES if m != mod] if mod in MODALITIES else []
            manifest["modalities"][mod] = _write_modality(tmp, mod, kind, v, ids[mod], progress, others)
            v.flush()
        _finish(tmp, manifest, sign_key)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return cls.open(out, bundle=bundle, threads=threads)  # trusted keys are the opener's choice

    def add(self, data: str | Path | Sequence[Any], images: str | Path | None = None, progress: bool = True,
            sign_key: str | Path | None = None, confine_images: bool = False, replace: bool = False,
            keep_photos: bool = True) -> dict:
        """Embed and add products from another catalog (a file or a list, as `build` takes); the index keeps its
        kind and tuned parameters.

        A catalog that holds products already in the index is refused before anything is embedded (adding
        them again would return each one twice); with `replace` their items in the index are removed and
        the catalog's rows added in their place: an update. A row without a product_id has no identity but its
        photo: one whose photo file and title an item without a product_id already has is refused too (never with
        `replace`, which needs product ids). With `sign_key` the updated manifest is
        re-signed; without it a signature is dropped. `confine_images` and `keep_photos` as for `build`.

        Returns:
            {"added": items, "image": vectors added, "text": vectors added, ["visual": vectors added,]
            "excluded": rows left out, "replaced": items removed because their product was in the catalog}.
        """
        _check_sign_key(sign_key)
        return self._add(_source(data, images, confine_images), progress, sign_key, replace, keep_photos)

    def add_embed_output(self, embeddings: str | Path, progress: bool = True, sign_key: str | Path | None = None,
                         replace: bool = False) -> dict:
        """`add` from the output of `huse embed --mode index` (as `from_embed_output` reads it), made with this
        index's bundle at its precision: what `add` of that catalog does, without embedding here. Returns and
        raises as `add` and `from_embed_output`."""
        _check_sign_key(sign_key)
        embeddings = Path(embeddings)
        st, n = _embed_output(embeddings, self.manifest["bundle"]["fingerprint"], self.manifest["bundle"]["path"])
        if st["precision"] != self.manifest["precision"]:
            raise HuseError(f"--embeddings {embeddings} were made at precision {st['precision']} and index "
                            f"{self.folder} holds {self.manifest['precision']} vectors: embed with --precision "
                            f"{self.manifest['precision']}")
        from huse.runtime.bulk import iter_predictions

        widths = {m: self._width(m) for m in self._indexes()}
        rows = lambda: (_described(r, i) for i, r in enumerate(iter_predictions(embeddings)))  # noqa: E731 (ids)
        return self._add(rows, progress, sign_key, replace, keep_photos=False,
                         embedded=lambda: _embedded(embeddings, n, widths))

    def _add(self, catalog: Callable[[], Any], progress: bool, sign_key: str | Path | None, replace: bool,
             keep_photos: bool = True, embedded: Callable[[], Any] | None = None) -> dict:
        """`add` of the Records `catalog()` yields (called twice: its product ids, then the rows themselves, so a
        file is streamed), embedded here or read from `embedded()` (`_embedded`'s shards). The new rows' vectors go
        straight into the grown vector files, as `build` writes them."""
        n, ids, no_id = 0, set(), []
        by_photo: dict[tuple[str, str | None], int] = {}  # rows without a product_id, by photo file and title: their row
        for r in catalog():
            n += 1
            if r.product_id:
                ids.add(r.product_id)
            else:
                no_id.append(r.row)
                if isinstance(r.image, str):
                    by_photo.setdefault((_same_file(r.image), r.name), r.row)
        if not n:
            raise HuseError("the catalog to add has no rows")
        widths = {m: self._width(m) for m in self._indexes()}
        with self._writing(lambda name: not _is_photos_file(name), n * sum(widths.values()) * 4):
            alive, product = self._array("items.alive.npy"), self._array("items.product.npy")
            codes: dict[str, int] = {}  # the product code of each of the catalog's products the index has held
            known = set()
            for i, pid in enumerate(self._product_ids()):
                if pid in ids:
                    codes[pid] = int(product[i])
                    if alive[i]:
                        known.add(pid)
            known = sorted(known)
            if replace and no_id:  # a product is found by its id: nothing to update
                raise HuseError(f"--replace (replace=True) updates products by product_id, and {len(no_id)} row(s) of "
                                f"this catalog have none (row {no_id[0]}{', ...' if len(no_id) > 1 else ''}): give "
                                "each row its product_id, or add them as new products without --replace")
            if known and not replace:
                shown = ", ".join(known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
                raise HuseError(f"{len(known)} product(s) of this catalog are already in the index ({shown}); "
                                "to update them, pass --replace (Python: replace=True), which removes their items "
                                "and adds this catalog's; or leave them out of the catalog")
            if by_photo and not replace:
                self._refuse_rows_held(by_photo, alive)
            # On the next version of the folder: a failure anywhere below leaves the index as it was
            replaced = self._remove(known, sign_key)["removed"] if known else 0
            n0 = len(self)
            excluded = _Exclusions(self.folder, previous=self._file("excluded.jsonl"))
            items = _Items(self.folder, relative_to=self._image_base, keep_photos=keep_photos, previous=self,
                           product_codes=codes)
            grown = {mod: _grown(self._file(f"{mod}.vectors.npy"), n) for mod in widths}
            new = {mod: v[n0:] for mod, v in grown.items()}
            if embedded is None:
                _embed(self._embedder(), catalog(), new, n0, n, progress, excluded, keep=items.add)
            else:
                for s, recs, got, why in embedded():
                    for mod, v in got.items():
                        new[mod][s:s + len(recs)] = v
                    items.add(recs)
                    excluded.add({**e, "item": n0 + e["item"]} for e in why)
            if "visual" in new:  # centred on the catalog the index was built from
                _centre_in_place(new["visual"], self._array(VISUAL_CENTRE))
            usable = {mod: _usable(v) for mod, v in new.items()}
            classes = items.close(_mod_bits(usable))
            excluded.close()
            m, added = self.manifest, {}
            for mod, v in grown.items():
                v.flush()
                os.replace(self.folder / f"{mod}.vectors.npy.tmp", self.folder / f"{mod}.vectors.npy")
                index = _read_writable(self._file(f"{mod}.faiss"))
                ids_new = np.flatnonzero(usable[mod]).astype(np.int64) + n0
                if len(ids_new) and self.kind == "ivf" and not index.is_trained:
                    index, _ = _build_faiss("ivf", v, ids_new, self._width(mod))
                else:
                    for r in range(0, len(ids_new), EXACT_ROWS):
                        block = ids_new[r:r + EXACT_ROWS]
                        index.add_with_ids(np.ascontiguousarray(v[block]), block)
                _write_index(index, self.folder / f"{mod}.faiss")
                m["modalities"][mod]["count"] += len(ids_new)
                added[mod] = len(ids_new)
            m["classes"] = classes
            _finish(self.folder, m, sign_key)
            self._reload()
            return {"added": n, **added, "excluded": excluded.count, "replaced": replaced}

    def remove(self, product_ids: Sequence[str], sign_key: str | Path | None = None) -> dict:
        """Remove every item of the given product_ids (see the module docstring for what each kind does).

        With `sign_key` the updated manifest is re-signed; without it a signature is dropped.

        Returns:
            {"removed": items removed, "unknown": product_ids not in the index (or already removed)}.
        """
        _check_sign_key(sign_key)
        with self._writing(lambda name: name.endswith(".faiss") or name.startswith("items.")):
            return self._remove(product_ids, sign_key)

    @contextlib.contextmanager
    def _writing(self, rewrites: Callable[[str], bool], extra: int = 0):
        """One add or remove: under the folder's lock, on a copy of the folder made of hard links (a writer only
        ever replaces a file, never changes one in place, so the index as it was stays whole), which takes the
        folder's place in one rename once its manifest is written. A kill at any instant leaves the index as it
        was or as it is after (it replaced a dozen files one by one, and a kill between two left a mix that its
        manifest refused); the next writer deletes what a killed one left. This object's reads wait meanwhile (it
        works in the copy); other Index objects, and other processes, read the index as it was."""
        real, work = self.folder, _next_folder(self.folder)
        with _one_writer(real), self._lock:
            if work.exists():
                shutil.rmtree(work)
            # Until the swap both versions of each file it rewrites are on the disk (a full one kills a writer to
            # a memory map: the index stays whole then, but the work is lost)
            need = extra + sum(p.stat().st_size for p in real.iterdir() if p.is_file() and rewrites(p.name))
            free = shutil.disk_usage(real).free
            if need > free:
                raise HuseError(f"changing index {real} writes new versions of its files, {need / 2**30:.1f} GiB, "
                                f"beside the old ones until it is done; its disk has {free / 2**30:.1f} GiB free: "
                                "free some space first")
            work.mkdir()
            for p in real.iterdir():  # the lock file too: its lock stays held in the folder that takes real's place
                if p.is_file():
                    _link(p, work / p.name)
            self.folder = work
            try:
                self._reload()  # what the last writer left, not what this object read when it was opened
                yield
            except BaseException:
                self.folder = real
                shutil.rmtree(work, ignore_errors=True)
                raise
            self.folder = real
            _swap(real, work)
            shutil.rmtree(work, ignore_errors=True)  # the index as it was
            self._reload()

    def _remove(self, product_ids: Sequence[str], sign_key: str | Path | None) -> dict:
        wanted = {str(p) for p in product_ids}
        alive = self._array("items.alive.npy").copy()
        positions, found = [], set()
        for i, pid in enumerate(self._product_ids()):
            if pid in wanted and alive[i]:
                positions.append(i)
                found.add(pid)
        positions = np.asarray(positions, np.int64)
        if len(positions):
            alive[positions] = 0
            _save_npy(self.folder / "items.alive.npy", alive)
            mods = self._array("items.mods.npy")
            for mod in self._indexes():
                in_mod = positions[(mods[positions] & MOD_BIT[ROWS_OF[mod]]) > 0]
                info = self.manifest["modalities"][mod]
                if not len(in_mod):
                    continue
                if self.kind == "hnsw":  # FAISS's HNSW cannot delete: a tombstone, filtered at search time
                    info["tombstones"] = info.get("tombstones", 0) + len(in_mod)
                else:
                    index = _read_writable(self._file(f"{mod}.faiss"))
                    index.remove_ids(_faiss().IDSelectorBatch(in_mod))
                    _write_index(index, self.folder / f"{mod}.faiss")
                    info["count"] -= len(in_mod)
            _finish(self.folder, self.manifest, sign_key)
            self._reload()
        return {"removed": int(len(positions)), "unknown": sorted(wanted - found)}

    def _follow(self) -> None:
        """Read the index again when an add or remove (in this process or another) has changed it since it was
        read: a long-lived Index, such as `huse serve --index`'s, answers from the index as it is now, never
        from a mix of the old manifest and new files. One stat a search."""
        if _stamp(self.folder) != self._stamp:
            self._reload(self.trusted_keys)

    def _reload(self, trusted_keys: Sequence[str | Path] | None = None) -> None:
        """The manifest as it is on disk (its signature checked against `trusted_keys`: none when this process
        wrote it), and every cache of files it lists dropped."""
        with self._lock:
            self._stamp = _stamp(self.folder)
            self.manifest = _load_index_manifest(self.folder, trusted_keys)
            self.classes = self.manifest["classes"]
            self._verified.clear()
            self._faiss.clear()
            self._vectors.clear()
            self._arrays.clear()

    def info(self) -> dict[str, Any]:
        """A summary of the manifest (counts, kind, per-modality factory, parameters, recall; the bytes of the
        photos it keeps)."""
        m = self.manifest
        photos = sum((self.folder / n).stat().st_size for n in m["files"] if _is_photos_file(n))
        return {"folder": str(self.folder), "kind": self.kind, "dim": self.dim, "visual_dim": self.visual_dim,
                "precision": m["precision"], "photo_bytes": photos,
                "bundle": m["bundle"], "counts": m["counts"], "removal": m["removal"],
                "modalities": {k: {f: v.get(f) for f in ("count", "factory", "search_params", "recall_at_10", "tombstones")}
                               for k, v in m["modalities"].items()}}

    def verify_all(self) -> int:
        """Hash every file now (stamps are not trusted for this explicit check); returns how many files."""
        self._verified.clear()
        verify, self.verify = self.verify, True
        try:
            for name in self.manifest["files"]:
                self._file(name, use_stamps=False)
        finally:
            self.verify = verify
        return len(self.manifest["files"])

    def close(self) -> None:
        if self._classifier is not None:
            self._classifier.close()
            self._classifier = None
        self._faiss.clear()
        self._vectors.clear()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REMOVAL = {
    "flat": "remove_ids: vectors are deleted from the FAISS index",
    "ivf": "remove_ids: vectors are deleted from the inverted lists",
    "hnsw": "tombstones: FAISS's HNSW cannot delete; removed items are filtered out at search time (rebuild to reclaim)",
}


# -- files ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _scratch(out: Path):
    """A new folder beside `out` to write an index in; removed unless it became `out`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _bundle_fingerprint(bundle: str | Path) -> str:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise HuseError(f"{bundle} is not a huse bundle: {MANIFEST} is missing")
    return sha256_file(path)


@contextlib.contextmanager
def _one_writer(folder: Path):
    """One `add` or `remove` at a time on an index (an exclusive lock on FOLDER/.lock); another writer is
    refused at once: two writers would each rewrite the item table and the FAISS files from what they read."""
    with one_writer(folder / LOCK, f"index {folder} is being changed by another process (huse index add or "
                                   "remove); run this again when it has finished"):
        yield


def _check_sign_key(sign_key: str | Path | None) -> None:
    if sign_key is not None:
        from huse.runtime.signing import check_signing_key

        check_signing_key(sign_key)


def _load_index_manifest(folder: Path, trusted_keys: Sequence[str | Path] | None = None) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise HuseError(f"{folder} is not a huse index: {MANIFEST} is missing; create one with `huse index build`")
    data = path.read_bytes()
    if trusted_keys:  # the exact bytes parsed below, as bundles do
        from huse.runtime.signing import verify_signature

        verify_signature(folder, data, trusted_keys, what=f"index {MANIFEST}", sign_hint=SIGN_HINT)
    try:
        m = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HuseError(f"{path} is not a valid manifest ({e}); rebuild the index") from None
    if isinstance(m, dict) and m.get("format") == BUNDLE_FORMAT:
        raise HuseError(f"{folder} is a huse bundle, not an index; build an index with it: "
                        f"`huse index build {folder} --data CATALOG --out INDEX`")
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise HuseError(f"{path} is not a {FORMAT!r} v{FORMAT_VERSION} manifest; rebuild the index with `huse index build`")
    return m


def _finish(folder: Path, manifest: dict, sign_key: str | Path | None = None) -> None:
    """Counts and the sha256 of every file, then manifest.json (written last, atomically; signed with
    `sign_key`, else any older signature is dropped: runtime/signing.py's `write_signed_manifest`)."""
    from huse.runtime.signing import SIGNATURE, write_signed_manifest

    alive = np.load(folder / "items.alive.npy", allow_pickle=False)
    manifest["counts"] = {"items": int(len(alive)), "removed": int((alive == 0).sum()),
                          **{m: int(manifest["modalities"][m]["count"] - manifest["modalities"][m].get("tombstones", 0))
                             for m in manifest["modalities"]}}
    # A photos file is written once and never changed: an add keeps the digest it was listed with (a file of
    # many GB is not hashed again, and a copy changed on disk since stays refused rather than re-listed).
    listed = manifest.get("files", {})
    manifest["files"] = {p.name: listed[p.name] if _is_photos_file(p.name) and p.name in listed else sha256_file(p)
                         for p in sorted(folder.iterdir())
                         if p.is_file() and p.name not in (MANIFEST, SIGNATURE, LOCK) and not p.name.endswith(".tmp")}
    write_signed_manifest(folder, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"), sign_key)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)  # an old memory map of the file stays valid


def _grown(path: Path, n: int) -> np.ndarray:
    """PATH.tmp: the .npy at `path` with room for `n` more rows after its own (copied a block at a time: the old
    rows are never all in memory), memory-mapped for writing; the caller fills the new rows, then replaces `path`
    with it."""
    old = np.load(path, mmap_mode="r", allow_pickle=False)
    grown = np.lib.format.open_memmap(path.with_name(path.name + ".tmp"), mode="w+", dtype=np.float32,
                                      shape=(len(old) + n, old.shape[1]))
    _copy_rows(grown, old)
    return grown


def _copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:len(src)] = src, EXACT_ROWS rows at a time: a memory-mapped array is never read whole."""
    for r in range(0, len(src), EXACT_ROWS):
        part = src[r:r + EXACT_ROWS]
        dst[r:r + len(part)] = part


def _write_index(index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _faiss().write_index(index, str(tmp))
    os.replace(tmp, path)


def _embed_output(embeddings: Path, fingerprint: str, bundle: str | Path) -> tuple[dict, int]:
    """The settings and row count of a complete `huse embed --mode index` output made with the bundle whose
    manifest has the sha256 `fingerprint` (at `bundle`, for messages)."""
    from huse.runtime.bulk import MANIFEST as BULK_MANIFEST, SUCCESS

    unfinished = embeddings if embeddings.name.endswith(".partial") else embeddings.with_name(embeddings.name + ".partial")
    if not (embeddings / SUCCESS).is_file() and unfinished.is_dir():
        raise HuseError(f"--embeddings {embeddings}: huse embed has not finished ({unfinished} holds the shards "
                        "done so far); run the same huse embed command with --resume, then use its --out")
    try:
        em = json.loads((embeddings / BULK_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise HuseError(f"--embeddings {embeddings} is not the output of huse embed ({e})") from None
    st = em.get("settings", {})
    if st.get("task") != "embed" or st.get("mode") != "index":
        raise HuseError(f"--embeddings {embeddings} holds {st.get('task')} --mode {st.get('mode')} output, one "
                        "vector per product; an index needs each product's image and title vectors: run huse "
                        "embed --mode index")
    if st.get("bundle_sha256") != fingerprint:
        raise HuseError(f"--embeddings {embeddings} was made with another bundle than {bundle}: queries would be "
                        "embedded by another model than the products; give the bundle huse embed used")
    n = int(em.get("totals", {}).get("rows", 0))
    if not n:
        raise HuseError(f"--embeddings {embeddings} has no rows to index (or is not complete)")
    return st, n


def _embedded(embeddings: Path, n: int, widths: dict[str, Any]):
    """Per shard of an embed output `_embed_output` checked: (its first row's offset, its Records, {space: vectors},
    its exclusions numbered from item 0 of the output), one shard in memory at a time."""
    from huse.runtime.bulk import iter_embeddings

    s = 0
    for rows, got in iter_embeddings(embeddings):
        if set(got) != set(widths) or s + len(rows) > n:
            raise HuseError(f"--embeddings {embeddings} does not match its manifest and bundle (vectors {sorted(got)}, "
                            f"want {sorted(widths)}); run huse embed --mode index again")
        why = [{"item": s + i, "row": r["row"], "product_id": r.get("product_id"), "modality": m,
                "error": r[f"{m}_error"]} for i, r in enumerate(rows) for m in MODALITIES if r.get(f"{m}_error")]
        yield s, [_described(r, s + i) for i, r in enumerate(rows)], got, why
        s += len(rows)
    if s != n:
        raise HuseError(f"--embeddings {embeddings} lists {n:,} rows and holds {s:,}; run huse embed again")


def _stamp(folder: Path) -> tuple[int, int, int] | None:
    """What changes when the index's manifest is replaced: its inode, size and mtime (None: no manifest)."""
    try:
        st = os.stat(folder / MANIFEST)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _next_folder(folder: Path) -> Path:
    """Where an add or remove writes the index's next version: beside it, on the same file system."""
    return folder.with_name(f".{folder.name}.next")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy, as safe and slower
        shutil.copy2(src, dst)


def _swap(real: Path, work: Path) -> None:
    """Exchange the folders `real` and `work` in one step (Linux renameat2 RENAME_EXCHANGE). Elsewhere two renames,
    and `Index.open` finishes them if a kill falls between (`_recover`)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    if exchange is not None and exchange(-100, os.fsencode(real), -100, os.fsencode(work), 2) == 0:  # AT_FDCWD
        return
    old = real.with_name(f".{real.name}.old")
    if old.exists():
        shutil.rmtree(old)
    os.rename(real, old)
    os.rename(work, real)  # a kill before this: no folder at `real`, its next version complete at `work`
    os.rename(old, work)


def _recover(folder: Path) -> None:
    """Finish a swap that a kill interrupted between its two renames (`_swap` without renameat2)."""
    work, old = _next_folder(folder), folder.with_name(f".{folder.name}.old")
    if not folder.exists() and (work / MANIFEST).is_file() and old.is_dir():
        os.rename(work, folder)
        shutil.rmtree(old, ignore_errors=True)


def _read_writable(path: Path):
    return _faiss().read_index(str(path))


def _described(r: Any, i: int) -> Any:
    """A row already embedded, as `from_embeddings` takes it: a dict (the metadata `huse embed` writes) read by
    its keys, anything else by its attributes."""
    if not isinstance(r, dict):
        return r
    from huse.runtime.catalog import Record

    return Record(row=int(r.get("row") or i + 1), image=r.get("image"), name=r.get("name"), classes=r.get("classes"),
                  product_id=r.get("product_id"))


def _source(data, images, confine: bool = False) -> Callable[[], Any]:
    """A function that gives the catalog's Records at each call: a file read afresh (streamed), or a list of rows
    (dicts with the catalog's columns, or Records) made Records once. A bad row (malformed value, or an image path
    refused by `confine`) keeps its `error` and is left out of both modalities (listed in excluded.jsonl), never a
    failed build."""
    from huse.runtime.catalog import iter_catalog, records_from_rows

    if isinstance(data, (str, Path)):
        return lambda: iter_catalog(data, images, confine=confine)
    records = records_from_rows(data, images, confine=confine)
    return lambda: records


def _catalog(data, images, confine: bool = False, progress: bool = False) -> tuple[Any, int]:
    """(records, how many) of `_source`: a file counted in a first pass (the vectors are written to files of that
    size), then streamed."""
    read = _source(data, images, confine)
    if not isinstance(data, (str, Path)):
        return read(), len(read())
    n = 0
    for n, _ in enumerate(read(), 1):
        if progress and n % 100_000 == 0:
            print(f"\rcounting products: {n}", end="", file=sys.stderr, flush=True)
    if progress and n >= 100_000:
        print(file=sys.stderr)
    return read(), n


def _vector_files(folder: Path, widths: dict[str, int], n: int) -> dict[str, np.ndarray]:
    """FOLDER/{modality}.vectors.npy, (n, width) float32, memory-mapped for writing: a build holds no vectors in
    memory, the page cache does (the files are the index's own). A disk without room for them is an error now: a
    write to a memory map on a full disk kills the process (SIGBUS), hours into the embedding."""
    need, free = n * sum(widths.values()) * 4, shutil.disk_usage(folder).free
    if need > free:
        raise HuseError(f"the index's vectors of {n:,} products need {need / 2**30:.1f} GiB on the disk of "
                        f"{folder.parent}, which has {free / 2**30:.1f} GiB free; free some space or choose an --out "
                        "on another disk")
    return {m: np.lib.format.open_memmap(folder / f"{m}.vectors.npy", mode="w+", dtype=np.float32, shape=(n, w))
            for m, w in widths.items()}


def _chunks(records, size: int):
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _embed(clf, records, vecs: dict[str, np.ndarray], start: int, total: int, progress: bool,
           excluded: "_Exclusions", keep=None) -> None:
    """Embed `records` (an iterable) EMBED_CHUNK at a time into rows 0, 1, ... of `vecs` (image, text and, when
    present, visual from the same run of the image graph; NaN rows where missing or failed), calling `keep(chunk)`
    after each chunk (the item table), and writing the rows left out to `excluded`, numbered from item `start`."""
    s = 0
    for chunk in _chunks(records, EMBED_CHUNK):
        if s + len(chunk) > total:
            raise _changed(total)
        got, why = embed_products(clf, chunk)
        for m, v in vecs.items():  # the index's modalities (one built without the bundle's visual vectors has none)
            v[s:s + len(chunk)] = got[m]
        excluded.add({"item": start + s + i, "row": chunk[i].row, "product_id": chunk[i].product_id, "modality": mod,
                      "error": err} for i in range(len(chunk)) for mod in MODALITIES
                     if (err := why[mod].get(i)) is not None)
        if keep is not None:
            keep(chunk)
        s += len(chunk)
        if progress:
            _progress(s, total, "embedding products")
    if s != total:
        raise _changed(total)


def _changed(total: int) -> HuseError:
    return HuseError(f"the catalog had {total:,} rows when it was counted and another number when it was read: it "
                     "changed during the build. Build from a copy that does not change (nothing was written)")


def _pair_visual(vecs: dict[str, np.ndarray]) -> None:
    """A photo is in the image and visual indexes or in neither (both come from one run of the image graph,
    and the visual index shares the image rows' modality bit): NaN both rows where either is NaN, in place."""
    if "visual" not in vecs:
        return
    for r in range(0, len(vecs["image"]), EXACT_ROWS):
        image, visual = vecs["image"][r:r + EXACT_ROWS], vecs["visual"][r:r + EXACT_ROWS]
        drop = ~(np.isfinite(image).all(1) & np.isfinite(visual).all(1))
        image[drop], visual[drop] = np.nan, np.nan


def _mean_rows(visual: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The mean of the rows `ok` of `visual`, summed a block at a time in float64: the catalog's visual centre."""
    total = np.zeros(visual.shape[1], np.float64)
    for r in range(0, len(visual), EXACT_ROWS):
        total += visual[r:r + EXACT_ROWS][ok[r:r + EXACT_ROWS]].sum(0, dtype=np.float64)
    return (total / max(int(ok.sum()), 1)).astype(np.float32)


def _centre_in_place(visual: np.ndarray, centre: np.ndarray) -> None:
    """`centre_visual` of the visual vectors with `centre`, in place, a block at a time."""
    for r in range(0, len(visual), EXACT_ROWS):
        visual[r:r + EXACT_ROWS] = centre_visual(visual[r:r + EXACT_ROWS], centre)[0]


def _mod_bits(usable: dict[str, np.ndarray]) -> np.ndarray:
    """Each item's modality bits (items.mods.npy) from which of its image and text rows are usable."""
    return sum(np.where(usable[m], MOD_BIT[m], 0) for m in MODALITIES).astype(np.uint8)


def _same_file(path: str) -> str:
    """A photo path in one form, whichever way a catalog or the item table wrote it (relative or absolute)."""
    return os.path.normpath(os.path.abspath(path))


def _item_image(image: str | bytes | None, base: str | None) -> str | None:
    """An item's photo path as the item table keeps it: relative to the index folder where both are
    relative; None for a photo the catalog holds as bytes (it is embedded, but hits have no file to name)."""
    if not isinstance(image, str):
        return None
    return os.path.relpath(os.path.abspath(image), base) if base is not None and not os.path.isabs(image) else image


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _build_bytes(n: int) -> int:
    """About the most memory a build of `n` products takes (BUILD_BYTES_BASE, BUILD_BYTES_PER_PRODUCT)."""
    return BUILD_BYTES_BASE + n * BUILD_BYTES_PER_PRODUCT


def _warn_memory(n: int) -> None:
    """Say so on stderr, before minutes of embedding, when `n` products will not fit in memory while building."""
    need, have = _build_bytes(n), _available_memory()
    if have is not None and need > have:
        print(f"warning: building an index of {n:,} products needs about {need / 2**30:.1f} GiB of memory (one "
              f"modality's FAISS index at a time; the vectors go to files), and this machine has "
              f"{have / 2**30:.1f} GiB available: the build may be killed for memory; build it on a machine with "
              "more.", file=sys.stderr)


# The start of an item's line as _Items writes it (json.dumps of row, product_id, ...): its product_id, a JSON string
# or null, read without parsing the rest.
_PRODUCT_ID = re.compile(rb'\{"row": [^,]*, "product_id": ("(?:[^"\\]|\\.)*"|null)[,}]')


def _line_product_id(line: bytes) -> str | None:
    """The product_id of an items.jsonl line, read off its start as `_Items` writes it (else the whole line)."""
    m = _PRODUCT_ID.match(line)
    if m is None:  # not as _Items writes a line: read it whole
        return json.loads(line).get("product_id")
    pid = m.group(1)
    return None if pid == b"null" else json.loads(pid) if b"\\" in pid else pid[1:-1].decode("utf-8")


def _is_photos_file(name: str) -> bool:
    """A file of photos the index keeps (photos.N.bin)."""
    first, _, rest = name.partition(".")
    return first == "photos" and rest.endswith(".bin") and rest[:-4].isdigit()


def _classes(cell: str | None) -> str | None:
    """An item's classes as the index keeps them: its canonical paths joined with '|' (runtime/labels.py); None for
    a cell that does not parse (the catalog made its row an error, which excluded.jsonl lists)."""
    try:
        return join_paths(parse_paths(cell)) if cell else None
    except HuseError:
        return None


class _Items:
    """The item table, written a chunk of records at a time: items.jsonl and its byte offsets, the photos a catalog
    holds as bytes in photos.N.bin (N: the first new item; none with `keep_photos=False`), and at `close` the
    per-item code arrays. An image path relative to the catalog is kept relative to the folder `relative_to` (None:
    as read). An add starts from the items of the Index `previous`, copied as they are (their lines, offsets and
    codes), with `product_codes` the codes its items give the products the add's catalog holds."""

    def __init__(self, folder: Path, relative_to: str | Path | None, keep_photos: bool = True,
                 previous: "Index | None" = None, product_codes: dict[str, int] | None = None):
        self.folder, self.keep_photos, self.previous = folder, keep_photos, previous
        self.base = os.path.abspath(relative_to) if relative_to is not None else None
        self.lines = open(folder / "items.jsonl.tmp", "wb")
        self.offsets, self.class_of, self.product = array.array("q", [0]), array.array("i"), array.array("i")
        self.classes: dict[str, int] = {}  # class -> code by first appearance (sorted at close)
        self.products: dict[str, int] = dict(product_codes or {})
        self.n_products = 0
        self.photos = None
        if previous is not None:  # codes stay as they are: the old classes keep their sorted order until `close`
            with open(previous._file("items.jsonl"), "rb") as old:
                shutil.copyfileobj(old, self.lines)
            self.offsets = array.array("q", previous._array("items.offsets.npy").astype(np.int64).tobytes())
            self.class_of = array.array("i", previous._array("items.class.npy").astype(np.int32).tobytes())
            product = previous._array("items.product.npy").astype(np.int32)
            self.product = array.array("i", product.tobytes())
            self.classes = {c: i for i, c in enumerate(previous.classes)}
            self.n_products = int(product.max()) + 1 if len(product) else 0
            if self.lines.tell() != self.offsets[-1]:
                raise HuseError(f"index {previous.folder}: items.jsonl does not end where items.offsets.npy says; "
                                "rebuild the index")
        self.first = len(self.product)

    def add(self, records: Sequence[Any]) -> None:
        for r in records:
            it = {"row": r.row, "product_id": r.product_id, "name": r.name, "image": _item_image(r.image, self.base),
                  "classes": _classes(r.classes)}
            if isinstance(r.image, bytes) and self.keep_photos:
                it["photo"] = self._photo(r.image)
            self._write(it)

    def _photo(self, data: bytes) -> list:
        name = f"photos.{self.first}.bin"
        if self.photos is None:
            self.photos = open(self.folder / f"{name}.tmp", "wb")
        span = [name, self.photos.tell(), len(data)]
        self.photos.write(data)
        return span

    def _write(self, it: dict) -> None:
        line = (json.dumps(it, ensure_ascii=False) + "\n").encode("utf-8")
        self.lines.write(line)
        self.offsets.append(self.offsets[-1] + len(line))
        # Codes by first appearance (stable for old items); an item without product_id is a product of its own.
        pid = it.get("product_id")
        code = self.products.setdefault(pid, self.n_products) if pid else self.n_products
        self.n_products += code == self.n_products
        self.product.append(code)
        c = it.get("classes")
        self.class_of.append(self.classes.setdefault(c, len(self.classes)) if c else -1)

    def close(self, mods: np.ndarray) -> list[str]:
        """Write the item files, with `mods` (the new items' modality bits); returns the sorted classes."""
        self.lines.close()
        os.replace(self.folder / "items.jsonl.tmp", self.folder / "items.jsonl")
        if self.photos is not None:
            self.photos.close()
            name = f"photos.{self.first}.bin"
            os.replace(self.folder / f"{name}.tmp", self.folder / name)
        classes = sorted(self.classes)
        code = {c: i for i, c in enumerate(classes)}
        remap = np.asarray([code[c] for c in self.classes] + [-1], np.int32)  # provisional code -1 stays -1
        if self.previous is None:
            old_alive, old_mods = np.zeros(0, np.uint8), np.zeros(0, np.uint8)
        else:
            old_alive, old_mods = self.previous._array("items.alive.npy"), self.previous._array("items.mods.npy")
        _save_npy(self.folder / "items.offsets.npy", np.frombuffer(self.offsets, np.int64))
        _save_npy(self.folder / "items.class.npy", remap[np.frombuffer(self.class_of, np.int32)])
        _save_npy(self.folder / "items.product.npy", np.frombuffer(self.product, np.int32))
        _save_npy(self.folder / "items.mods.npy", np.concatenate([old_mods, mods]))
        _save_npy(self.folder / "items.alive.npy", np.concatenate([old_alive, np.ones(len(mods), np.uint8)]))
        return classes


class _Exclusions:
    """excluded.jsonl, written as rows are left out (a catalog of millions can leave out millions of photos; held as
    dicts they took ~390 bytes each): first the lines of `previous` (an add's index), then the new ones; `count`
    of those."""

    def __init__(self, folder: Path, previous: Path | None = None):
        self.folder, self.count = folder, 0
        self.file = open(folder / "excluded.jsonl.tmp", "wb")
        if previous is not None:
            with open(previous, "rb") as old:
                shutil.copyfileobj(old, self.file)

    def add(self, entries) -> None:
        for e in entries:
            self.file.write((json.dumps(e, ensure_ascii=False) + "\n").encode("utf-8"))
            self.count += 1

    def close(self) -> None:
        self.file.close()
        os.replace(self.folder / "excluded.jsonl.tmp", self.folder / "excluded.jsonl")


def _write_modality(folder: Path, mod: str, kind: str, vectors: np.ndarray, ids: np.ndarray, progress: bool,
                    cross: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> dict:
    """FOLDER/{mod}.faiss over the rows `ids` of `vectors` (FOLDER/{mod}.vectors.npy itself), tuned; its manifest entry."""
    ids = np.asarray(ids, np.int64)
    t = time.perf_counter()
    index, factory = _build_faiss(kind, vectors, ids, vectors.shape[1])
    build_s = time.perf_counter() - t
    queries = _tuning_queries(vectors, ids, cross)
    params, recall = _tune(index, kind, vectors, ids, queries)
    if progress:
        print(f"{mod}: {len(ids)} vectors, {factory}, {params or 'exact'}, recall@10 vs exact "
              f"{'n/a' if recall is None else f'{recall:.3f}'}", file=sys.stderr)
    _write_index(index, folder / f"{mod}.faiss")
    return {"count": int(len(ids)), "factory": factory, "search_params": params, "recall_at_10": recall,
            "tuned_on": int(len(queries)), "build_seconds": round(build_s, 3), "tombstones": 0,
            "index_bytes": (folder / f"{mod}.faiss").stat().st_size}
