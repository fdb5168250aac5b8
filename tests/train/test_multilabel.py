"""Multi-label training: the set distance, thresholds, metrics, the one-vs-rest baseline, and a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import Hierarchy
from huse.train import multilabel
from huse.train.data import load_catalog_dataset
from huse.train.losses import huse_loss

LABELS = ["a<b", "a<c", "z<y"]


def test_set_distance_is_the_class_distance_for_one_path_each():
    a = torch.from_numpy(Hierarchy(LABELS).distance_matrix())
    labels = torch.tensor([0, 1, 2, 0])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(multilabel.set_distance(one_hot, a), a[labels][:, labels])


def test_set_distance_is_graded_by_overlap_and_hierarchy():
    a = torch.from_numpy(Hierarchy(LABELS).distance_matrix())
    sets = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    d = multilabel.set_distance(sets, a)
    assert torch.allclose(d, d.t()) and d.diag().abs().max() == 0 and d[0, 1] == 0  # equal sets
    # sharing one of two paths is closer than a sibling alone, which is closer than nothing in common
    assert 0 < d[0, 2] < d[2, 3] < d[3, 4] == 1


def test_huse_loss_takes_multi_hot_targets():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.float32)
    a = torch.from_numpy(Hierarchy(LABELS).distance_matrix())
    loss, parts = huse_loss(emb, emb, logits, logits, y, a, alpha=1, beta=1, gamma=0.2, margin=0.7, label_loss="bce")
    expected = 2 * 3 * torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert parts["cls"] == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert logits.grad is not None
    _, parts = huse_loss(emb, emb, logits, logits, y, a, alpha=1, beta=1, gamma=0.2, margin=0.7)  # default: asl
    assert parts["cls"] == pytest.approx(2 * float(multilabel.asymmetric_loss(logits, y).detach()), rel=1e-5)


def test_asymmetric_loss_ignores_easy_negatives_and_keeps_positives():
    y = torch.tensor([[1.0, 0.0, 0.0]])
    logits = torch.tensor([[-1.0, -4.0, 2.0]], requires_grad=True)  # a missed positive, an easy and a hard negative
    # without focusing and shifting it is binary cross-entropy, summed over classes
    plain = multilabel.asymmetric_loss(logits, y, gamma_neg=0, gamma_pos=0, clip=0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    assert float(plain.detach()) == pytest.approx(float(bce.detach()), rel=1e-6)
    multilabel.asymmetric_loss(logits, y).backward()
    g = logits.grad[0]
    # the positive keeps its cross-entropy gradient; the easy negative (p = 0.018 < clip) gives none;
    # the hard negative (p = 0.88) still pushes down
    assert float(g[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0)) - 1), rel=1e-6)
    assert float(g[1]) == 0.0 and float(g[2]) > 0.1


def _global_threshold(p, y):
    from huse.runtime.labels import predict_sets

    f1 = [multilabel.set_metrics(predict_sets(p, np.full(p.shape[1], g)), y)["micro_f1"] for g in multilabel.THRESHOLD_GRID]
    return multilabel.THRESHOLD_GRID[int(np.argmax(f1))]


def test_thresholds_are_one_global_micro_f1_best_one_unless_a_class_has_enough_products():
    rng = np.random.default_rng(0)
    n = 4 * multilabel.MIN_VAL_PRODUCTS
    y = np.zeros((n, 3), np.float32)
    y[: n // 2, 0] = 1
    y[n // 2:, 1] = 1
    y[:3, 2] = 1
    # class 0: positives in [0.35, 0.65], negatives below 0.3; class 1 all 0.4 higher (negatives up to 0.7)
    p = np.clip(y * 0.35 + rng.uniform(0, 0.3, y.shape), 0, 1).astype(np.float32)
    p[:, 1] += 0.4
    one_item_per_product = np.arange(n)
    t = multilabel.tune_thresholds(p, y, one_item_per_product)
    # classes 0 and 1 have 2 x MIN_VAL_PRODUCTS positive products: their own F1-best thresholds
    assert 0.3 <= t[0] <= 0.35 and 0.6 <= t[1] <= 0.75
    assert t[2] == pytest.approx(_global_threshold(p, y))  # 3 products: the global one
    # the same items as photos of few products (10 each): no class has enough products, one threshold for all
    ten_items_per_product = np.arange(n) // 10
    assert np.allclose(multilabel.tune_thresholds(p, y, ten_items_per_product), _global_threshold(p, y))


def test_one_vs_rest_baseline_weighs_modalities_on_val():
    rng = np.random.default_rng(3)
    n, c = 300, 3
    y = np.zeros((n, c), np.float32)
    y[np.arange(n), rng.integers(0, c, n)] = 1
    y[rng.random(n) < 0.3, 0] = 1
    text = (y @ rng.normal(size=(c, 8)) + rng.normal(size=(n, 8))).astype(np.float32)  # informative, not perfectly
    image = rng.normal(size=(n, 8)).astype(np.float32)  # noise
    groups = np.arange(n)
    splits = {"val": np.arange(200, 250), "test": np.arange(250, n)}
    probs, info = multilabel.ovr_baselines(image, text, y, groups, np.arange(200), splits)
    w = info["fusion_image_weight"]
    assert w <= 0.25  # the noise modality is (nearly) left out, not averaged in at 1/2
    for s, idx in splits.items():
        assert np.allclose(probs[s]["fused"], w * probs[s]["image"] + (1 - w) * probs[s]["text"])


def test_one_vs_rest_fit_is_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 5))
    y = np.stack([(x[:, 0] + rng.normal(size=80) > 0), (x[:, 1] - x[:, 2] > 0.5)], 1).astype(np.float64)
    theta = multilabel._fit_ovr(x, y, 0.3)
    for j in range(2):
        ref = LogisticRegression(C=0.3, tol=1e-8, max_iter=5000).fit(x, y[:, j])
        assert np.allclose(theta[:-1, j], ref.coef_[0], atol=1e-3) and abs(theta[-1, j] - ref.intercept_[0]) < 1e-3


def test_average_precision_matches_scikit_learn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    y = rng.random((50, 4)) < 0.3
    p = rng.random((50, 4))
    for j in range(4):
        assert multilabel.average_precision(p[:, j], y[:, j]) == pytest.approx(average_precision_score(y[:, j], p[:, j]))


def test_set_metrics():
    y = np.array([[1, 0, 1], [0, 1, 0]], bool)
    pred = np.array([[1, 0, 0], [0, 1, 0]], bool)
    m = multilabel.set_metrics(pred, y)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert m["subset_accuracy"] == 0.5 and m["jaccard"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((1 + 1 + 0) / 3)


def test_bad_path_names_row_and_column(tiny_multi_catalog, tmp_path):
    import shutil

    folder = tmp_path / "cat"
    shutil.copytree(tiny_multi_catalog.parent, folder)
    path = folder / "catalog.csv"
    with open(path, "a") as f:
        f.write("images/img_0_0.png,Acme tee,clothing<tops<t-shirts||sale<clearance,x1\n")
    n = sum(1 for _ in open(path)) - 1
    with pytest.raises(HuseError) as e:
        load_catalog_dataset(path)
    assert f"row {n}, column classes:" in str(e.value) and "empty path" in str(e.value)


def test_multi_label_run_reports_against_the_one_vs_rest_baseline(tiny_multi_run):
    m = json.loads((tiny_multi_run / "metrics.json").read_text())
    cfg = json.loads((tiny_multi_run / "config.json").read_text())
    assert m["task"] == cfg["task"] == "multi-label" and cfg["model"]["multi_label"] is True
    assert cfg["model"]["label_loss"] == "asl"  # the default loss, recorded with the run
    assert cfg["labels"] == sorted(cfg["labels"]) and "sale<clearance" in cfg["labels"] and len(cfg["labels"]) == 6
    for split in ("val", "test"):
        for mode in ("image", "text", "fused"):
            for r in (m[split][mode], m["baseline"][split][mode]):
                assert {"micro_f1", "macro_f1", "map", "subset_accuracy", "jaccard", "levels"} <= set(r)
                assert 0 <= r["micro_f1"] <= 1 and set(r["levels"]) == {"1", "2", "3"}
    # thresholds per mode and class, in [0, 1]; the baseline's C per class, chosen by grouped CV
    assert set(cfg["thresholds"]) == {"image", "text", "fused"}
    assert all(len(t) == 6 and all(0 < x < 1 for x in t) for t in cfg["thresholds"].values())
    assert m["baseline_info"]["grouped_by"] == "product" and m["baseline_info"]["C"]["image"] in multilabel.C_GRID
    assert m["verdict"]["metric"] == "micro_f1"
    # the run learnt: fused beats chance (predicting every class) by a wide margin
    assert m["test"]["fused"]["micro_f1"] > 0.7 and m["test"]["fused"]["map"] > 0.75


def test_printed_table_is_multi_label(tiny_multi_run):
    from huse.train.cli import format_metrics

    m = json.loads((tiny_multi_run / "metrics.json").read_text())
    text = format_metrics(m)
    assert "micro-F1" in text and "mAP" in text and "one-vs-rest" in text and "top1" not in text
    m["verdict"]["worse_modes"] = {}  # the verdict's line when no mode is below the baseline on val
    for mode in ("image", "text", "fused"):
        m["val"][mode]["micro_f1"] = m["baseline"]["val"][mode]["micro_f1"] + 0.01
    assert format_metrics(m).splitlines()[-1].startswith(
        "HUSE's micro-F1 beats the one-vs-rest logistic-regression baseline's on val in every mode.")


def test_single_label_run_is_unchanged(tiny_run):
    """A single-label catalog: softmax head, top-1 metrics, no multi-label keys anywhere."""
    m = json.loads((tiny_run / "metrics.json").read_text())
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert "task" not in m and "task" not in cfg and "thresholds" not in cfg and "multi_label" not in cfg["model"]
    assert "label_loss" not in cfg["model"] and "label_head" not in cfg["model"]
    assert "top1" in m["test"]["fused"] and "calibration" in m and "micro_f1" not in m["test"]["fused"]
