"""Retrieval metrics on hand-made rankings (exact expected values) and the benchmark at a tiny scale."""

from __future__ import annotations

import numpy as np
import pytest

from huse.benchmarks.retrieval import (Items, evaluate, hierarchical_precision_at_k, instance_bar, map_at_k,
                                       multiview_items, rank, recall_at_k, relevant_classes)

LABELS = ["a<x<1", "a<x<2", "a<y<3", "b<z<4"]


def test_recall_and_map_on_a_hand_made_ranking():
    rel = np.array([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    assert recall_at_k(rel, 1) == pytest.approx(1 / 3)
    assert recall_at_k(rel, 2) == pytest.approx(2 / 3)
    # AP@5: query 0 has R=2 relevant: (1/2 + 2/4) / 2 = 0.5; query 1 R=3: 0; query 2 R=1: 1.0
    assert map_at_k(rel, np.array([2, 3, 1]), 5) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # a query with no relevant item in the database is skipped, not counted as 0
    assert np.isnan(map_at_k(rel[:1], np.array([0]), 5))


def test_hierarchical_precision_grows_the_relevant_set_level_by_level():
    assert relevant_classes("a<x<1", LABELS, 1) == {"a<x<1"}
    assert relevant_classes("a<x<1", LABELS, 2) == {"a<x<1", "a<x<2"}  # its parent a<x holds 2 classes
    assert relevant_classes("a<x<1", LABELS, 3) == {"a<x<1", "a<x<2", "a<y<3"}  # grandparent a
    assert relevant_classes("b<z<4", LABELS, 2) == set(LABELS)  # b holds 1: the whole hierarchy
    ranked = [["a<x<1", "a<x<2", "b<z<4"]]
    assert hierarchical_precision_at_k(ranked, ["a<x<1"], LABELS, 1) == 1.0
    assert hierarchical_precision_at_k(ranked, ["a<x<1"], LABELS, 2) == 1.0
    assert hierarchical_precision_at_k(ranked, ["a<x<1"], LABELS, 3) == pytest.approx(2 / 3)
    assert hierarchical_precision_at_k([["a<x<2"]], ["a<x<1"], LABELS, 1) == 0.0


def test_rank_excludes_the_query_and_failed_rows():
    db = np.eye(4, dtype=np.float32)
    db[2] = np.nan
    q = np.array([[1, 0.5, 0.9, 0]], np.float32)
    assert rank(q, db, 4).tolist() == [[0, 1, 3, -1]]
    assert rank(q, db, 4, exclude=np.array([0])).tolist() == [[1, 3, -1, -1]]


def test_evaluate_on_hand_made_embeddings():
    # Two products per class, image and title vectors on the class axis, so everything is exact.
    classes = ["a<x<1", "a<x<1", "a<x<2", "a<x<2"]
    v = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    items = Items([None] * 4, ["t"] * 4, classes, ["p0", "p1", "p2", "p3"])
    r = evaluate({"image": v, "text": v}, items)
    for pair in ("I->I", "I->T", "T->I", "T->T"):
        assert r[pair]["R@1"] == 1.0 and r[pair]["mAP@10"] == 1.0, (pair, r[pair])
    # I->T against the own title: it ties with the other product of its class, so within the top 2
    assert r["instance"]["I->T R@5"] == 1.0 and r["instance"]["T->I R@5"] == 1.0
    assert "I->I R@1" not in r["instance"]  # one photo per product: no multi-view instance metric


def test_multiview_keeps_products_and_changes_pixels():
    img = (np.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).astype(np.uint8)
    mv = multiview_items(Items([img], ["t"], ["a<x<1"], ["p"]), views=3, seed=0)
    assert mv.product_ids == ["p"] * 3 and mv.titles == ["t"] * 3
    assert np.array_equal(mv.images[0], img) and not np.array_equal(mv.images[1], img)
    assert all(x.shape == img.shape and x.dtype == np.uint8 for x in mv.images)
    again = multiview_items(Items([img], ["t"], ["a<x<1"], ["p"]), views=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(mv.images, again.images))  # seeded


def test_instance_bar_takes_huse_s_best_space_for_photo_to_photo():
    mv = {"huse b": {"instance": {"I->I R@1": 0.31}}, "huse b (visual space)": {"instance": {"I->I R@1": 0.52}},
          "frozen backbone": {"instance": {"I->I R@1": 0.50}}}
    bar = instance_bar(mv, "b")
    assert bar["huse_best_space"] == "visual" and bar["met"] and bar["huse"] == {"universal": 0.31, "visual": 0.52}
    mv["huse b (visual space)"]["instance"]["I->I R@1"] = 0.49
    assert not instance_bar(mv, "b")["met"]
    assert instance_bar({"huse b": mv["huse b"]}, "b") is None  # no backbone row: no bar


def test_benchmark_runs_at_a_tiny_scale(tiny_bundle, tiny_catalog, tmp_path):
    pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")
    from huse.benchmarks.retrieval import run

    r = run(tiny_bundle, tiny_catalog, baselines=(), views=2, scale=300, threads=1, backbone=False,
            out=tmp_path, cold_start=False)
    q = r["quality"][f"huse {tiny_bundle}"]
    assert q["I->I"]["R@1"] > r["quality"]["random"]["I->I"]["R@1"]
    visual = r["multiview"][f"huse {tiny_bundle} (visual space)"]  # the lean runtime's visual vectors, photo->photo
    assert set(visual) == {"I->I", "instance", "n"}
    assert visual["instance"]["I->I R@1"] > r["multiview"]["random"]["instance"]["I->I R@1"]
    rows = r["speed"]["300"]
    assert [x["kind"] for x in rows] == ["flat", "hnsw", "ivf"]
    assert all(x["recall_at_10_vs_exact"] >= 0.9 for x in rows), rows
    # The visual space is indexed and searched too, as `huse index build` writes it for this bundle.
    assert all(x["visual_recall_at_10_vs_exact"] >= 0.9 and x["visual_single_p50_ms"] > 0 for x in rows), rows
    assert rows[0]["visual_recall_at_10_vs_exact"] == 1.0  # flat: exact
    assert "visual space" in (tmp_path / "retrieval.md").read_text()
    assert (tmp_path / "retrieval.json").is_file() and (tmp_path / "retrieval.md").is_file()


def test_benchmark_measures_each_precision_asked(tiny_bundle, tiny_catalog, tmp_path):
    """--precisions fp32,fp16: what an index built at each finds, side by side (int8-cpu's visual vectors move)."""
    pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")
    import shutil

    from huse.benchmarks.retrieval import run
    from huse.export.api import ExportOptions, export

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    export(bundle, None, ExportOptions(fp16=True, engine="skip", accuracy_gate=False, say=lambda s: None))
    r = run(bundle, tiny_catalog, views=2, scale=0, threads=1, backbone=False, out=tmp_path / "out", cold_start=False,
            precisions=("fp32", "fp16"))
    fp32, fp16 = r["quality"][f"huse {bundle}"], r["quality"][f"huse {bundle} (fp16)"]
    assert fp16.keys() == fp32.keys() and abs(fp16["I->I"]["R@1"] - fp32["I->I"]["R@1"]) < 0.1
    assert f"huse {bundle} (fp16) (visual space)" in r["multiview"] and "speed" not in r
    assert "(fp16)" in (tmp_path / "out" / "retrieval.md").read_text()
