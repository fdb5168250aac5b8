"""Multi-label bundles end to end: manifest, gates, Classifier labels, bulk shards, search filters."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from huse.export.precision import accuracy_gate
from huse.runtime.bulk import BulkJob, read_predictions, run_bulk
from huse.runtime.catalog import read_catalog
from huse.runtime.classifier import Classifier
from huse.runtime.labels import parse_paths
from tests.models.make_data import GIFT, SALE


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_manifest_describes_the_task_and_gates_use_label_sets(tiny_multi_bundle):
    m = _manifest(tiny_multi_bundle)
    assert m["task"] == "multi-label" and "sigmoid" in m["fusion"]["rule"]
    assert set(m["multilabel"]["thresholds"]) == {"image", "text", "fused"}
    assert all(len(t) == len(m["labels"]) for t in m["multilabel"]["thresholds"].values())
    for precision in ("fp16", "int8-cpu"):
        gate = m["accuracy"][precision]
        assert gate["passed"] and set(gate["modes"]) == {"image", "text", "fused"}
        assert gate["modes"]["fused"]["agreement"] >= 99.0  # mean Jaccard of predicted sets, %


def test_gate_failure_names_the_bar_and_the_margin():
    labels = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], np.float32)
    ref = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.7], [0.7, 0.2]], np.float32)
    cand = ref.copy()
    cand[2, 1] = 0.2  # one label of one item lost
    gate = accuracy_gate(ref, cand, labels, precision="int8", thresholds=np.array([0.5, 0.5], np.float32))
    assert not gate["passed"] and gate["metric"] == "micro-F1"
    assert gate["agreement"] == pytest.approx(100 * (3 + 0.5) / 4)
    assert any("label-set agreement (mean Jaccard) 87.50% < 99.0% by 11.50 points" in f for f in gate["failures"])
    assert any(f.startswith("micro-F1 drop") for f in gate["failures"])


def test_classify_returns_every_label_above_its_threshold(tiny_multi_bundle, tiny_multi_catalog):
    recs = read_catalog(tiny_multi_catalog)
    m = _manifest(tiny_multi_bundle)
    with Classifier(tiny_multi_bundle, threads=1) as clf:
        results = clf.classify(images=[r.image for r in recs], titles=[r.name for r in recs], top_k=3)
        probs = clf.predict_proba(images=[r.image for r in recs], titles=[r.name for r in recs])
    t = np.asarray(m["multilabel"]["thresholds"]["fused"])
    hits = total = 0
    for r, res, p in zip(recs, results, probs):
        assert res["mode"] == "fused" and len(res["top_k"]) == 3 and res["labels"]
        chosen = [x["label"] for x in res["labels"]]
        above = [m["labels"][j] for j in np.flatnonzero(p >= t)]
        assert sorted(chosen) == sorted(above) or (not above and chosen == [res["top_k"][0]["label"]])
        assert [x["score"] for x in res["labels"]] == sorted((x["score"] for x in res["labels"]), reverse=True)
        for x in res["labels"]:  # each label's top-down path ends at the label itself
            assert x["path"][-1]["label"] == x["label"] and x["path"][0]["level"] == 1
        truth = set(parse_paths(r.classes))
        hits += len(truth & set(chosen))
        total += len(truth)
    assert hits / total > 0.7  # the labels are right, not just well-formed
    assert any(len(res["labels"]) > 1 for res in results)


def test_single_label_bundle_has_no_labels_field(tiny_bundle, tiny_catalog):
    recs = read_catalog(tiny_catalog)[:4]
    assert "task" not in _manifest(tiny_bundle)
    with Classifier(tiny_bundle, threads=1) as clf:
        results = clf.classify(images=[r.image for r in recs], titles=[r.name for r in recs])
    assert all("labels" not in r and "top_k" in r for r in results)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bulk_shards_carry_labels_reviewed_per_label(tiny_multi_bundle, tiny_multi_catalog, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    # 0.8: between the tiny model's label scores (its global threshold is about 0.65, its best labels score
    # above 0.9), so some labels are reviewed and some are not
    result = run_bulk(BulkJob(bundle=str(tiny_multi_bundle), data=str(tiny_multi_catalog), out=str(out), format=fmt,
                              min_confidence=0.8, shard_rows=50, threads=1, progress=False))
    rows = read_predictions(out)
    assert len(rows) == 120 and all(r["labels"] for r in rows)
    for r in rows:
        assert all(x["needs_review"] == (x["score"] < 0.8) for x in r["labels"])
        assert r["needs_review"] == any(x["needs_review"] for x in r["labels"])
    assert 0 < result.needs_review == sum(r["needs_review"] for r in rows) < 120
    assert result.known == 120  # rows with several paths are valid rows with classes
    # the summary's label-set counts (micro-F1 of `huse classify`), recounted from the rows
    sets = [({x["label"] for x in r["labels"]}, set(parse_paths(r["classes"]))) for r in rows]
    assert (result.labels_right, result.labels_predicted, result.labels_given) == (
        sum(len(p & t) for p, t in sets), sum(len(p) for p, _ in sets), sum(len(t) for _, t in sets))
    assert 0 < result.labels_right < result.labels_given and any(len(t) > 1 for _, t in sets)


def test_a_csv_output_lists_every_label_in_one_cell(tiny_multi_bundle, tiny_multi_catalog, tmp_path):
    out = tmp_path / "preds.csv"
    run_bulk(BulkJob(bundle=str(tiny_multi_bundle), data=str(tiny_multi_catalog), out=str(out), threads=1,
                     progress=False))
    run_bulk(BulkJob(bundle=str(tiny_multi_bundle), data=str(tiny_multi_catalog), out=str(tmp_path / "p.jsonl"),
                     threads=1, progress=False))
    cells = list(csv.DictReader(open(out, encoding="utf-8-sig", newline="")))
    rows = read_predictions(tmp_path / "p.jsonl")
    assert len(cells) == 120 and "labels" in cells[0] and "label_scores" in cells[0]
    for c, r in zip(cells, rows):
        assert c["labels"].split("|") == [x["label"] for x in r["labels"]]
        assert [float(x) for x in c["label_scores"].split("|")] == [x["score"] for x in r["labels"]]
    assert any("|" in c["labels"] for c in cells)  # some products get several paths


def test_search_filter_matches_any_path(tiny_multi_bundle, tiny_multi_catalog, tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed; pip install 'huse-edge[index]'")
    from huse.runtime import Index

    Index.build(tiny_multi_bundle, tiny_multi_catalog, tmp_path / "idx", kind="flat", progress=False)
    idx = Index.open(tmp_path / "idx")
    recs = read_catalog(tiny_multi_catalog)
    for prefix, want in (("sale", SALE), ("gifts<for her", GIFT)):
        hits = idx.search(texts=["Acme sale tee"], k=500, target="image", filter=prefix)[0]
        n = sum(want in parse_paths(r.classes) for r in recs)
        assert len(hits) == n and all(want in h.classes.split("|") for h in hits)
    # a product under clothing AND on sale is found by either filter
    both = [r for r in recs if SALE in r.classes and r.classes.startswith("clothing")]
    hits = idx.search(texts=["Acme sale tee"], k=500, target="image", filter="clothing")[0]
    assert {r.row for r in both} <= {h.row for h in hits}


def test_top1_accuracy_benchmark_refuses_a_multi_label_bundle(tiny_multi_bundle):
    from huse.benchmarks.accuracy import evaluate
    from huse.runtime.errors import HuseError

    with pytest.raises(HuseError, match="multi-label bundle.*huse.benchmarks.multilabel"):
        evaluate(tiny_multi_bundle)
