"""Several class paths per product: parsing (CSV, JSONL lists, Parquet lists), predicted sets, filters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from huse.runtime.catalog import read_catalog
from huse.runtime.errors import HuseError
from huse.runtime.labels import join_paths, label_path, matches_prefix, parse_paths, predict_sets


def test_parse_paths_canonical_sorted_unique():
    assert parse_paths("kitchen < appliances|gifts<for the home | kitchen<appliances") == (
        "gifts<for the home", "kitchen<appliances")
    assert parse_paths("clothing<tops<t-shirts") == ("clothing<tops<t-shirts",)
    assert join_paths(parse_paths("b<x|a<y")) == "a<y|b<x"


@pytest.mark.parametrize("cell,expected", [("", "empty class"), ("a<b||c<d", "empty path"), ("a<b|", "empty path"),
                                           ("a<b|c<<d", "empty level")])
def test_parse_paths_refuses_empty_parts(cell, expected):
    with pytest.raises(HuseError, match=expected):
        parse_paths(cell)


def test_jsonl_list_and_csv_pipes_read_the_same(tmp_path):
    (tmp_path / "c.csv").write_text('image,name,classes\na.png,Kettle,"kitchen<appliances|gifts<for the home"\n')
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "name": "Kettle",
                                                  "classes": ["kitchen<appliances", "gifts<for the home"]}) + "\n")
    csv_rec, jsonl_rec = read_catalog(tmp_path / "c.csv")[0], read_catalog(tmp_path / "c.jsonl")[0]
    assert parse_paths(csv_rec.classes) == parse_paths(jsonl_rec.classes) == ("gifts<for the home", "kitchen<appliances")


def test_jsonl_list_with_a_non_text_entry_names_row_and_column(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "name": "x", "classes": ["a<b"]}) + "\n"
                                      + json.dumps({"image": "a.png", "name": "x", "classes": ["a<b", 3]}) + "\n")
    with pytest.raises(HuseError, match=r"row 2, column classes: expected text"):
        read_catalog(tmp_path / "c.jsonl")


def test_parquet_list_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"image": ["a.png", "b.png"], "name": ["Kettle", "Bag"],
                      "classes": [["kitchen<appliances", "gifts<for the home"], ["bags<handbags"]]})
    pq.write_table(table, tmp_path / "c.parquet")
    recs = read_catalog(tmp_path / "c.parquet")
    assert [parse_paths(r.classes) for r in recs] == [("gifts<for the home", "kitchen<appliances"), ("bags<handbags",)]


def test_predict_sets_thresholds_and_at_least_one():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.3, 0.25], [0.5, 0.5, 0.5]], np.float32)
    pred = predict_sets(probs, np.array([0.5, 0.7, 0.5], np.float32))
    # row 0: only class 0 reaches its threshold (0.6 < 0.7); row 1: none does -> its best class alone
    assert pred.tolist() == [[True, False, False], [False, True, False], [True, False, True]]


def test_label_path_scores_a_node_by_its_best_leaf():
    labels = ["a<b", "a<c", "z<y"]
    path = label_path("a<c", np.array([0.3, 0.8, 0.9]), labels)
    assert path == [{"level": 1, "label": "a", "score": pytest.approx(0.8)},
                    {"level": 2, "label": "a<c", "score": pytest.approx(0.8)}]


def test_matches_prefix_any_path():
    assert matches_prefix("gifts<for her|kitchen<appliances", "kitchen")
    assert matches_prefix("gifts<for her|kitchen<appliances", "gifts<for her")
    assert not matches_prefix("gifts<for her|kitchen<appliances", "kitch")
    assert not matches_prefix(None, "kitchen")
