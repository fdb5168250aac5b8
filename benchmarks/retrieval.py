"""Retrieval quality (the HUSE paper's metrics) and index speed/size, baselines side by side.

    huse-bench retrieval BUNDLE [--data test.csv --images DIR] [--baseline B2 ...] [--views 4] [--scale 200000]
    python -m huse.benchmarks.retrieval BUNDLE ...

Quality. Each test item's photo and title are queries against the other test items (the query
item itself is excluded), exact inner-product ranking, for I->I, I->T, T->I and T->T:
- R@K (class level): share of queries with at least one item of the query's leaf class in the top K.
- mAP@10: mean over queries of AP@10 = (1 / min(10, R)) * sum_{i<=10} P@i * rel_i, R the number
  of items of the query's class in the database (query excluded); queries with R = 0 are skipped.
- HP@K, hierarchical precision (DeViSE, Frome et al. 2013; used by HUSE, Table 4): for a query of
  leaf class y, the relevant class set starts as {y} and grows one hierarchy level at a time (all
  leaves under y's parent, then under its grandparent, ...) until it holds at least K classes
  (or is every class); HP@K = share of the top K retrieved items whose class is in that set. With
  few classes this saturates: on fashion-products (10 leaves) HP@10's set is every class, so HP@10 = 1.
- Instance level: I->T and T->I against the item's own title / photo (R@1/5/10; the own item is
  not excluded), and I->I across different photos of the same product_id (the query photo
  excluded) on a multi-view catalog: `multiview_items` augments each test product's photo into
  several seeded views (crop, flip, shift, contrast).
Rows: each bundle (through the lean runtime), random ranking, and the frozen backbone's own pooled
features for I->I (`huse.train.backbones`, which imports torch: a baseline, not the runtime). On the
multi-view catalog a bundle with visual vectors gets a second row, "(visual space)": I->I with
`Classifier.embed_visual` centred on the catalog (`centre_visual`), what `huse search --space visual`
ranks by. The instance bar compares
HUSE's best space for photo->photo with the frozen backbone (`instance_bar` in the results).

Speed and size (`--scale N`, synthetic: the real embeddings duplicated with Gaussian perturbation
and re-normalised, so the neighbourhood geometry is realistic): for flat, hnsw and ivf built by
`Index.from_embeddings`: build seconds, bytes per product, batched queries/s, single-query
p50/p99 ms, recall@10 vs exact, and a fresh-process `huse search` (index load included).
FAISS threads are set with faiss.omp_set_num_threads (`--threads`).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from huse.runtime.cli import run_cli
from huse.runtime.hierarchy import SEPARATOR, canonical

__all__ = ["rank", "recall_at_k", "map_at_k", "relevant_classes", "hierarchical_precision_at_k", "evaluate",
           "multiview_items", "synthetic_vectors", "speed", "Items", "run", "instance_bar"]

PAIRS = (("image", "image"), ("image", "text"), ("text", "image"), ("text", "text"))
KS = (1, 5, 10)
SHORT = {"image": "I", "text": "T"}


@dataclass
class Items:
    """A test catalog in memory: photos (paths or uint8 arrays), titles, leaf classes, product ids."""

    images: list[Any]
    titles: list[str | None]
    classes: list[str]
    product_ids: list[str]


# -- metrics (exact definitions in the module docstring) ------------------------------------------
def rank(queries: np.ndarray, database: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Top-k database rows per query by inner product; `exclude[q]` (a row, or -1) is never returned.

    NaN rows in the database are never returned; -1 pads when fewer than k remain.
    """
    db_ok = np.isfinite(database).all(1)
    db = np.nan_to_num(database)
    out = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(queries), 256):
        sc = np.nan_to_num(queries[s:s + 256]) @ db.T
        sc[:, ~db_ok] = -np.inf
        if exclude is not None:
            ex = exclude[s:s + 256]
            rows = np.flatnonzero(ex >= 0)
            sc[rows, ex[rows]] = -np.inf
        kk = min(k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, 1)
        top[~np.isfinite(np.take_along_axis(sc, top, 1))] = -1
        out[s:s + 256, :kk] = top
    return out


def recall_at_k(relevant: np.ndarray, k: int) -> float:
    """relevant: (Q, >=k) bool, per query whether each ranked item is a hit. Share with a hit in the top k."""
    return float(relevant[:, :k].any(1).mean()) if len(relevant) else float("nan")


def map_at_k(relevant: np.ndarray, n_relevant: np.ndarray, k: int = 10) -> float:
    """Mean AP@k = (1 / min(k, R)) * sum_{i<=k} P@i * rel_i over queries with R > 0."""
    rel = relevant[:, :k].astype(np.float64)
    prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
    ok = n_relevant > 0
    if not ok.any():
        return float("nan")
    ap = (prec * rel).sum(1)[ok] / np.minimum(k, n_relevant[ok])
    return float(ap.mean())


def relevant_classes(label: str, labels: list[str], k: int) -> set[str]:
    """DeViSE's growing set: {label}, then every leaf under its parent, grandparent, ... until >= k classes."""
    path = label.split(SEPARATOR)
    for depth in range(len(path), 0, -1):
        prefix = SEPARATOR.join(path[:depth])
        found = {c for c in labels if c == prefix or c.startswith(prefix + SEPARATOR)}
        if len(found) >= k:
            return found
    return set(labels)


def hierarchical_precision_at_k(ranked_classes: list[list[str]], query_classes: list[str], labels: list[str],
                                k: int) -> float:
    """Mean over queries of (top-k items whose class is in relevant_classes(query class, k)) / k."""
    scores = []
    for got, y in zip(ranked_classes, query_classes):
        rel = relevant_classes(y, labels, k)
        scores.append(sum(c in rel for c in got[:k]) / k)
    return float(np.mean(scores)) if scores else float("nan")


def _class_metrics(ranked: np.ndarray, q_cls: np.ndarray, db_cls: np.ndarray, q_rows: np.ndarray, db_ok: np.ndarray,
                   labels: list[str]) -> dict[str, float]:
    hit = np.where(ranked >= 0, db_cls[np.maximum(ranked, 0)] == q_cls[:, None], False)
    counts = np.bincount(db_cls[db_ok], minlength=len(labels))
    n_rel = counts[q_cls] - (db_ok[q_rows] & True).astype(int)  # the query item itself is excluded
    out = {f"R@{k}": recall_at_k(hit, k) for k in KS}
    out["mAP@10"] = map_at_k(hit, n_rel, 10)
    names = [[labels[db_cls[j]] for j in row if j >= 0] for row in ranked]
    for k in KS:
        out[f"HP@{k}"] = hierarchical_precision_at_k(names, [labels[c] for c in q_cls], labels, k)
    return out


def evaluate(emb: dict[str, np.ndarray], items: Items, pairs=PAIRS) -> dict[str, dict[str, float]]:
    """Class-level metrics for each (query, target) modality pair, and instance-level ones.

    Args:
        emb: {"image": (N, D), "text": (N, D)} L2-normalised (NaN rows: failed, left out); a
            modality may be missing (e.g. a backbone baseline has images only).
        items: the test catalog the rows belong to.
    Returns:
        {"I->I": {"R@1": ..., "mAP@10": ..., "HP@1": ...}, ..., "instance": {"I->T R@1": ...}}.
    """
    labels = sorted(set(items.classes))
    cls = np.asarray([labels.index(c) for c in items.classes])
    pid = np.asarray(items.product_ids)
    n = len(cls)
    out: dict[str, dict[str, float]] = {}
    for qm, tm in pairs:
        if qm not in emb or tm not in emb:
            continue
        q_ok = np.flatnonzero(np.isfinite(emb[qm]).all(1))
        ranked = rank(emb[qm][q_ok], emb[tm], max(KS), exclude=q_ok)
        out[f"{SHORT[qm]}->{SHORT[tm]}"] = _class_metrics(ranked, cls[q_ok], cls, q_ok, np.isfinite(emb[tm]).all(1), labels)
    inst: dict[str, float] = {}
    if "image" in emb and "text" in emb:
        for qm, tm in (("image", "text"), ("text", "image")):
            q_ok = np.flatnonzero(np.isfinite(emb[qm]).all(1))
            ranked = rank(emb[qm][q_ok], emb[tm], max(KS))
            hit = np.where(ranked >= 0, pid[np.maximum(ranked, 0)] == pid[q_ok][:, None], False)
            for k in KS:
                inst[f"{SHORT[qm]}->{SHORT[tm]} R@{k}"] = recall_at_k(hit, k)
    if "image" in emb:
        _, counts = np.unique(pid, return_counts=True)
        if counts.max() > 1:  # several photos per product: I->I across different photos
            per = dict(zip(*np.unique(pid, return_counts=True)))
            q_ok = np.flatnonzero(np.isfinite(emb["image"]).all(1) & (np.asarray([per[p] for p in pid]) > 1))
            ranked = rank(emb["image"][q_ok], emb["image"], max(KS), exclude=q_ok)
            hit = np.where(ranked >= 0, pid[np.maximum(ranked, 0)] == pid[q_ok][:, None], False)
            for k in KS:
                inst[f"I->I R@{k}"] = recall_at_k(hit, k)
    if inst:
        out["instance"] = inst
    out["n"] = {"items": n}
    return out


# -- catalogs and embeddings ------------------------------------------------------------------------------
def load_items(bundle: str | Path, data: str | Path | None = None, images: str | Path | None = None,
               limit: int | None = None) -> Items:
    """The test catalog: a catalog file, or the bundle's own test split (training data recorded in its manifest)."""
    if data is not None:
        from huse.runtime.catalog import read_catalog

        recs = [r for r in read_catalog(data, images, require=("classes",))]
        items = Items([r.image for r in recs], [r.name for r in recs], [canonical(r.classes) for r in recs],
                      [r.product_id or f"row{r.row}" for r in recs])
    else:
        from huse.runtime.bundle import load_manifest
        from huse.train.data import load_source

        ds = load_source(load_manifest(bundle, verify=False)["data"])
        idx = ds.indices("test")
        items = Items([ds.images[i] for i in idx], [ds.titles[i] for i in idx], [ds.classes[i] for i in idx],
                      [ds.product_ids[i] for i in idx])
    if limit:
        items = Items(*(x[:limit] for x in (items.images, items.titles, items.classes, items.product_ids)))
    return items


def multiview_items(items: Items, views: int = 4, seed: int = 0) -> Items:
    """Each product's photo as `views` seeded augmented photos (crop, flip, shift, contrast); same title and id."""
    from huse.runtime.preprocess import decode_image

    rng = np.random.default_rng(seed)
    out = Items([], [], [], [])
    for img, title, c, p in zip(items.images, items.titles, items.classes, items.product_ids):
        base = np.asarray(decode_image(img) if not isinstance(img, np.ndarray) else img)
        if base.ndim == 2:
            base = np.repeat(base[..., None], 3, axis=2)
        h, w = base.shape[:2]
        for v in range(views):
            x = base.astype(np.float32)
            if v:  # view 0 is the original photo
                ch, cw = int(h * rng.uniform(0.8, 1.0)), int(w * rng.uniform(0.8, 1.0))
                y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = x[y0:y0 + ch, x0:x0 + cw]
                yy = (np.arange(h) * ch / h).astype(int)
                xx = (np.arange(w) * cw / w).astype(int)
                x = crop[yy][:, xx]  # back to the original size (nearest)
                if rng.random() < 0.5:
                    x = x[:, ::-1]
                x = np.roll(x, (int(rng.integers(-h // 10, h // 10 + 1)), int(rng.integers(-w // 10, w // 10 + 1))), (0, 1))
                x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean() + rng.uniform(-20, 20)
            out.images.append(np.clip(x, 0, 255).astype(np.uint8))
            out.titles.append(title)
            out.classes.append(c)
            out.product_ids.append(p)
    return out


def embed_bundle(bundle: str | Path, items: Items, precision: str = "fp32", threads: int | None = None) -> dict[str, np.ndarray]:
    """Universal image and text embeddings through the lean runtime (NaN rows where an item failed), and
    "visual": the photos' visual-similarity vectors (`Classifier.embed_visual`, from the same run of the
    image graph) when the bundle has them."""
    from huse.runtime.bundle import has_visual
    from huse.runtime.classifier import Classifier
    from huse.runtime.index import centre_visual

    with Classifier(bundle, backend="onnxruntime", precision=precision, batch_size=128, threads=threads) as clf:
        out = {"text": clf.embed_text(items.titles).vectors}
        if has_visual(clf.manifest):
            image, visual = clf.embed_image_visual(items.images)
            out.update(image=image.vectors, visual=centre_visual(visual.vectors)[0])  # as the visual index holds them
        else:
            out["image"] = clf.embed_image(items.images).vectors
        return out


def instance_bar(multiview: dict[str, Any], bundle: str | Path) -> dict[str, Any] | None:
    """The instance bar: HUSE's best space for photo->photo (I->I instance R@1) >= the frozen backbone's."""
    spaces = {"universal": multiview.get(f"huse {bundle}"), "visual": multiview.get(f"huse {bundle} (visual space)")}
    got = {k: r["instance"]["I->I R@1"] for k, r in spaces.items() if r and "I->I R@1" in r.get("instance", {})}
    base = multiview.get("frozen backbone", {}).get("instance", {}).get("I->I R@1")
    if not got or base is None:
        return None
    best = max(got, key=got.get)
    return {"metric": "I->I instance R@1", "huse": got, "huse_best_space": best, "frozen_backbone": base,
            "met": bool(got[best] >= base)}


def backbone_embeddings(bundle: str | Path, items: Items, batch: int = 128) -> dict[str, np.ndarray]:
    """The frozen backbone's pooled features (centred, L2-normalised): what a user gets without HUSE."""
    import torch

    from huse.runtime.bundle import load_manifest
    from huse.runtime.preprocess import ImageSpec, load_image
    from huse.train.backbones import create_backbone

    m = load_manifest(bundle, verify=False)
    spec = ImageSpec.from_dict(m["preprocessing"])
    net = create_backbone(m["model"]["backbone"])
    feats = []
    with torch.inference_mode():
        for s in range(0, len(items.images), batch):
            x = np.stack([load_image(i, spec) for i in items.images[s:s + batch]])
            feats.append(net(torch.from_numpy(x)).float().numpy())
    f = np.concatenate(feats)
    f = f - f.mean(0)
    return {"image": (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)}


def random_embeddings(n: int, dim: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Random unit vectors: a random ranking for every pair."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in ("image", "text"):
        v = rng.normal(size=(n, dim)).astype(np.float32)
        out[m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


# -- speed and size ---------------------------------------------------------------------------------------
def synthetic_vectors(real: np.ndarray, n: int, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """`n` unit vectors: real embeddings repeated, each plus Gaussian noise of norm ~`noise`, re-normalised."""
    real = real[np.isfinite(real).all(1)]
    rng = np.random.default_rng(seed)
    base = real[np.arange(n) % len(real)]
    v = base + rng.normal(0, noise / np.sqrt(real.shape[1]), base.shape).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class _Rec:
    row: int
    product_id: str
    name: str | None
    image: str | None
    classes: str | None


def speed(bundle: str | Path, emb: dict[str, np.ndarray], items: Items, n: int, out_dir: Path,
          kinds=("flat", "hnsw", "ivf"), n_queries: int = 1000, n_single: int = 200, threads: int | None = None,
          cold_start: bool = True) -> list[dict[str, Any]]:
    """Build each index kind over a synthetic catalog of `n` products and measure it (see the module docstring).
    With visual vectors in `emb` the index holds the visual space too, as `huse index build` writes it, and
    photo queries in that space are measured beside the universal ones (`visual_*` fields)."""
    from huse.runtime.index import VISUAL_CENTRE, Index, _faiss, centre_visual

    if threads:
        _faiss().omp_set_num_threads(threads)
    vecs = {m: synthetic_vectors(emb[m], n, seed=s) for s, m in enumerate(("image", "text", "visual")) if m in emb}
    recs = [_Rec(i + 1, f"{items.product_ids[i % len(items.product_ids)]}#{i}", items.titles[i % len(items.titles)],
                 None, items.classes[i % len(items.classes)]) for i in range(n)]
    # Queries: fresh perturbations of real photos and titles (cross-modal queries included).
    queries = np.concatenate([synthetic_vectors(emb["image"], n_queries // 2, seed=10),
                              synthetic_vectors(emb["text"], n_queries - n_queries // 2, seed=11)])
    truth = rank(queries, vecs["image"], 10)
    visual_queries = synthetic_vectors(emb["visual"], n_queries // 2, seed=12) if "visual" in vecs else None
    rows = []
    for kind in kinds:
        folder = out_dir / f"index-{kind}-{n}"
        t = time.perf_counter()
        Index.from_embeddings(bundle, recs, vecs, folder, kind=kind, max_memory="64G", progress=False, overwrite=True)
        build_s = time.perf_counter() - t
        idx = Index.open(folder, threads=threads)
        info = idx.manifest["modalities"]["image"]
        qps, lat, recall = timed_search(idx, queries, truth, n_single)
        size = sum(p.stat().st_size for p in folder.iterdir())
        row = {"kind": kind, "n": n, "factory": info["factory"], "search_params": info["search_params"],
               "build_s": round(build_s, 2), "faiss_build_s": info["build_seconds"],
               "index_bytes_per_product": (folder / "image.faiss").stat().st_size / n,
               "dir_bytes_per_product": size / n, "batched_qps": round(qps, 1),
               "single_p50_ms": float(np.percentile(lat, 50)), "single_p99_ms": float(np.percentile(lat, 99)),
               "recall_at_10_vs_exact": recall, "tuned_recall_at_10": info["recall_at_10"]}
        if visual_queries is not None:
            row.update(visual_speed(idx, folder, centre_visual(visual_queries, np.load(folder / VISUAL_CENTRE))[0],
                                    n_single))
        if cold_start:
            row["fresh_process"] = fresh_process_search(folder, items.titles[0] or "black boots", threads)
        rows.append(row)
        click.echo(f"  {kind}: {json.dumps(row)}", err=True)
    exact = next((r for r in rows if r["kind"] == "flat"), None)
    for r in rows:
        if exact is not None:
            r["single_qps_vs_exact"] = exact["single_p50_ms"] / r["single_p50_ms"]
    return rows


def timed_search(idx, queries: np.ndarray, truth: np.ndarray, n_single: int,
                 space: str = "universal") -> tuple[float, list[float], float]:
    """Top-10 searches of `queries`: batched queries/s, single-query latencies (ms) of the first `n_single`,
    and recall@10 against `truth` (exact search's items)."""
    idx.search_vectors(queries[:10], k=10, space=space)  # page in what a warm server holds
    t = time.perf_counter()
    batched = idx.search_vectors(queries, k=10, space=space)
    qps = len(queries) / (time.perf_counter() - t)
    lat = []
    for q in queries[:n_single]:
        t = time.perf_counter()
        idx.search_vectors(q[None], k=10, space=space)
        lat.append(1e3 * (time.perf_counter() - t))
    got = np.asarray([[h.item for h in hits] + [-1] * (10 - len(hits)) for hits in batched])
    return qps, lat, float(np.mean([len(set(g) & set(tr)) / 10 for g, tr in zip(got, truth)]))


def visual_speed(idx, folder: Path, queries: np.ndarray, n_single: int) -> dict[str, Any]:
    """Photo queries in the visual space (already centred on the index's catalog): single-query p50 and
    recall@10 against exact search over the stored visual vectors."""
    truth = rank(queries, np.load(folder / "visual.vectors.npy"), 10)
    _, lat, recall = timed_search(idx, queries, truth, n_single, space="visual")
    info = idx.manifest["modalities"]["visual"]
    return {"visual_search_params": info["search_params"], "visual_single_p50_ms": float(np.percentile(lat, 50)),
            "visual_recall_at_10_vs_exact": recall,
            "visual_index_bytes_per_product": info["index_bytes"] / max(info["count"], 1)}


def fresh_process_search(folder: Path, text: str, threads: int | None = None) -> dict[str, Any]:
    """`huse search INDEX --text ...` in a new process: wall seconds (index load included) and torch imported?"""
    args = ["search", str(folder), "--text", text, "-k", "10"] + (["--threads", str(threads)] if threads else [])
    code = ("import sys, time\nt = time.perf_counter()\nfrom huse.runtime.cli import main\n"
            f"try:\n    main({args!r}, standalone_mode=False)\n"
            "finally:\n    print('TIME', time.perf_counter() - t, 'torch' in sys.modules, file=sys.stderr)\n")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t
    line = next((l for l in p.stderr.splitlines() if l.startswith("TIME")), None)
    if p.returncode or line is None:
        return {"error": (p.stderr or p.stdout)[-500:]}
    _, secs, torch = line.split()
    return {"wall_s": round(wall, 3), "in_process_s": round(float(secs), 3), "torch_imported": torch == "True"}


# -- the run ----------------------------------------------------------------------------------------------
def run(bundle: str | Path, data=None, images=None, baselines=(), views: int = 4, scale: int = 200_000,
        limit: int | None = None, threads: int | None = None, backbone: bool = True, out: str | Path = "bench-results/retrieval",
        cold_start: bool = True, precisions: tuple[str, ...] = ("fp32",)) -> dict[str, Any]:
    """Quality rows for the bundle (at each of `precisions`: what an index built at that precision finds) and the
    baselines (fp32), on the test catalog and its multi-view form, then speed (fp32)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(bundle, data, images, limit)
    mv = multiview_items(items, views) if views > 1 else None
    result: dict[str, Any] = {"bundle": str(bundle), "n_test": len(items.classes), "views": views,
                              "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                                          "threads": threads}, "quality": {}, "multiview": {}}
    emb = {}
    runs = [(bundle, p) for p in precisions] + [(b, "fp32") for b in baselines]
    for b, precision in runs:
        name = f"huse {b}" + ("" if precision == "fp32" else f" ({precision})")
        click.echo(f"embedding {len(items.classes)} test items with {b} at {precision}", err=True)
        embedded = embed_bundle(b, items, precision=precision, threads=threads)
        if precision == "fp32":
            emb[str(b)] = embedded
        result["quality"][name] = evaluate(embedded, items)
        if mv is not None:
            mv_emb = embed_bundle(b, mv, precision=precision, threads=threads)
            result["multiview"][name] = evaluate(mv_emb, mv)
            if "visual" in mv_emb:  # photo->photo in the visual space, through the lean runtime
                result["multiview"][f"{name} (visual space)"] = evaluate({"image": mv_emb["visual"]}, mv,
                                                                         pairs=(("image", "image"),))
    result["quality"]["random"] = evaluate(random_embeddings(len(items.classes)), items)
    if mv is not None:
        result["multiview"]["random"] = evaluate(random_embeddings(len(mv.classes)), mv)
    if backbone:
        result["quality"]["frozen backbone"] = evaluate(backbone_embeddings(bundle, items), items, pairs=(("image", "image"),))
        if mv is not None:
            result["multiview"]["frozen backbone"] = evaluate(backbone_embeddings(bundle, mv), mv, pairs=(("image", "image"),))
            result["instance_bar"] = instance_bar(result["multiview"], bundle)
    if scale and str(bundle) in emb:
        result["speed"] = {}
        base = emb[str(bundle)]
        n_real = int(np.isfinite(base["image"]).all(1).sum())
        for n in sorted({min(n_real, scale), scale}):
            click.echo(f"speed at {n} products", err=True)
            result["speed"][str(n)] = speed(bundle, base, items, n, out, threads=threads, cold_start=cold_start,
                                            n_queries=min(1000, 2 * n), n_single=min(200, n))
    path = out / "retrieval.json"
    path.write_text(json.dumps(result, indent=2))
    (out / "retrieval.md").write_text(to_markdown(result))
    result["files"] = [str(path), str(out / "retrieval.md")]
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Retrieval: {result['bundle']} ({result['n_test']} test items)", ""]
    for title, block in (("Class level (test catalog)", result["quality"]),
                         (f"Multi-view test catalog ({result['views']} views per product)", result["multiview"])):
        if not block:
            continue
        lines += [f"## {title}", "", "| model | pair | R@1 | R@5 | R@10 | mAP@10 | HP@1 | HP@5 | HP@10 |", "|---|---|---|---|---|---|---|---|---|"]
        for model, r in block.items():
            for pair, m in r.items():
                if pair in ("instance", "n"):
                    continue
                lines.append(f"| {model} | {pair} | " + " | ".join(f"{m[c]:.3f}" for c in
                             ("R@1", "R@5", "R@10", "mAP@10", "HP@1", "HP@5", "HP@10")) + " |")
        lines += ["", "| model | instance metric | value |", "|---|---|---|"]
        for model, r in block.items():
            for name, v in r.get("instance", {}).items():
                lines.append(f"| {model} | {name} | {v:.3f} |")
        lines.append("")
    bar = result.get("instance_bar")
    if bar:
        lines += [f"Instance bar ({bar['metric']}, HUSE's best space >= frozen backbone): "
                  f"{bar['huse'][bar['huse_best_space']]:.3f} ({bar['huse_best_space']} space) vs "
                  f"{bar['frozen_backbone']:.3f}: {'met' if bar['met'] else 'NOT met'}", ""]
    for n, rows in result.get("speed", {}).items():
        lines += [f"## Speed and size at {n} products", "",
                  "| kind | factory | params | build s | index B/product | batched q/s | p50 ms | p99 ms | recall@10 | x exact (single) | fresh `huse search` s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            fresh = r.get("fresh_process", {})
            lines.append(f"| {r['kind']} | {r['factory']} | {r['search_params'] or 'exact'} | {r['build_s']:.1f} | "
                         f"{r['index_bytes_per_product']:.0f} | {r['batched_qps']:.0f} | {r['single_p50_ms']:.3f} | "
                         f"{r['single_p99_ms']:.3f} | {r['recall_at_10_vs_exact']:.3f} | {r.get('single_qps_vs_exact', float('nan')):.1f} | "
                         f"{fresh.get('wall_s', 'n/a')} |")
        visual = [r for r in rows if "visual_single_p50_ms" in r]
        if visual:
            lines += ["", "| kind | visual space: params | index B/product | p50 ms | recall@10 |", "|---|---|---|---|---|"]
            lines += [f"| {r['kind']} | {r['visual_search_params'] or 'exact'} | "
                      f"{r['visual_index_bytes_per_product']:.0f} | {r['visual_single_p50_ms']:.3f} | "
                      f"{r['visual_recall_at_10_vs_exact']:.3f} |" for r in visual]
        lines.append("")
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test catalog with classes and product_id (default: the bundle's test split).")
@click.option("--images", type=click.Path(file_okay=False), help="Folder image paths resolve against.")
@click.option("--baseline", "baselines", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Other bundles as rows side by side (e.g. one trained with --beta 0 --gamma 0).")
@click.option("--views", default=4, help="Photos per product in the multi-view catalog (1: skip it).")
@click.option("--scale", default=200_000, help="Synthetic catalog size for speed (0: skip speed).")
@click.option("--limit", type=int, help="Use only the first N test items (a quick check).")
@click.option("--threads", type=int, help="onnxruntime and FAISS threads.")
@click.option("--precisions", default="fp32", help="The bundle's precisions to embed with, comma-separated (e.g. "
              "fp32,int8-cpu): the quality an index built at each finds; speed uses fp32.")
@click.option("--no-backbone", is_flag=True, help="Skip the frozen-backbone baseline (it needs torch).")
@click.option("--no-cold-start", is_flag=True, help="Skip the fresh-process `huse search` timings.")
@click.option("--out", default="bench-results/retrieval", type=click.Path(file_okay=False))
def main(bundle, data, images, baselines, views, scale, limit, threads, precisions, no_backbone, no_cold_start, out) -> None:
    """Retrieval quality (R@K, mAP@10, HP@K, instance recall) and index speed/size for BUNDLE."""
    def body():
        r = run(bundle, data, images, baselines, views, scale, limit, threads, not no_backbone, out, not no_cold_start,
                precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()))
        click.echo(to_markdown(r))
        click.echo(f"wrote {', '.join(r['files'])}")
    run_cli(body)


if __name__ == "__main__":
    main()
