"""k-fold cross-validation by product for small catalogs (issue 19, item 3): the settings come from
the folds, products never straddle them, the spread is recorded and the shipped model sees train + val."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from huse.runtime.hierarchy import Hierarchy
from tests.models.make_data import write_rows


@pytest.fixture(scope="module")
def grouped_catalog(tiny_catalog, tmp_path_factory):
    """The tiny catalog with three rows per product (its own catalog gives every row its product), so a fold
    that split a product would show."""
    rows = list(csv.DictReader(open(tiny_catalog, newline="")))
    for k, r in enumerate(rows):
        r["product_id"] = f"g{k // 3}"  # rows of one class are consecutive: a product keeps one class
        r["image"] = str(tiny_catalog.parent / r["image"])
    path = tmp_path_factory.mktemp("grouped") / "catalog.csv"
    write_rows(path, rows)
    return path


def _trainer(catalog, out, **tc):
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    ds = load_catalog_dataset(catalog)
    return ds, Trainer(ds, out, HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32,
                                           max_len=8), TrainConfig(batch_size=32, lr=3e-3, **tc))


@pytest.fixture(scope="module")
def cv_run(grouped_catalog, tmp_path_factory):
    """An auto-mode run (cv_folds=None) on the grouped tiny catalog, below KFOLD_MAX_ROWS, with every fold
    trainer's splits recorded as the real training loop sees them."""
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    seen = []
    train = Trainer._train

    def recording(self, progress=True, desc="training"):
        seen.append({s: self.split[s].numpy().copy() for s in ("train", "val", "test")} | {"out": self.out})
        return train(self, progress, desc)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "_train", recording)
    out = tmp_path_factory.mktemp("kfold") / "run"
    ds = load_catalog_dataset(grouped_catalog)
    try:
        m = Trainer(ds, out, HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32, max_len=8),
                    TrainConfig(batch_size=32, lr=3e-3, epochs=4, patience=0, cv_folds=None)).fit(progress=False)
    finally:
        mp.undo()
    return ds, out, m, seen


def test_below_the_threshold_the_settings_come_from_folds_that_keep_products_whole(cv_run):
    from huse.train.trainer import KFOLD_MAX_ROWS

    ds, out, m, seen = cv_run
    sizes = ds.split_sizes()
    assert sizes["train"] + sizes["val"] < KFOLD_MAX_ROWS
    cv = m["cv"]
    assert cv["folds"] == 5 and cv["reason"].startswith("auto") and len(seen) == 1 + 5  # the run's own model, then 5 folds
    products = np.asarray(ds.product_ids)
    train_val = np.concatenate([ds.indices("train"), ds.indices("val")])
    held = []
    for k, s in enumerate(seen[1:], 1):
        assert s["out"] == out / "cv" / f"fold-{k}"
        assert not set(products[s["train"]]) & set(products[s["val"]])  # no product on both sides of a fold
        assert sorted(np.concatenate([s["train"], s["val"]]).tolist()) == sorted(train_val.tolist())
        np.testing.assert_array_equal(s["test"], ds.indices("test"))  # test stays out of every fold
        held.append(s["val"])
    # Every train + val row is held out exactly once: the pooled predictions cover them all.
    assert sorted(np.concatenate(held).tolist()) == sorted(train_val.tolist())
    assert cv["rows"] == len(train_val) and cv["products"] == len(set(products[train_val]))


def test_the_spread_across_folds_is_recorded_and_printed(cv_run):
    from huse.train.baselines import WEIGHT_GRID
    from huse.train.cli import format_metrics

    _, _, m, seen = cv_run
    cv = m["cv"]
    assert [f["fold"] for f in cv["per_fold"]] == [1, 2, 3, 4, 5]
    for f, s in zip(cv["per_fold"], seen[1:]):
        assert f["items"] == len(s["val"]) and 1 <= f["best_epoch"] <= f["epochs_run"] == 4
        assert set(f["val_top1"]) == {"image", "text", "fused"} and all(0 <= v <= 1 for v in f["val_top1"].values())
        assert f["image_weight"] in WEIGHT_GRID
    assert cv["epochs"] == int(round(float(np.median([f["best_epoch"] for f in cv["per_fold"]]))))
    assert m["fusion_image_weight"] == cv["image_weight"]  # chosen on the pooled folds, not on val
    report = format_metrics(m)
    text = [f["val_top1"]["text"] for f in cv["per_fold"]]
    assert "5-fold cross-validation by product" in report and f"text {min(text):.2f}-{max(text):.2f}" in report
    assert "fusion image weight (chosen by 5-fold CV)" in report
    from huse.benchmarks.quality import summarise

    assert summarise("tiny", m)["cv"] == cv  # the quality benchmark's JSON keeps the folds' figures


def test_the_shipped_model_trains_on_train_and_val_with_the_folds_settings(cv_run):
    import torch
    from safetensors.torch import load_file

    from huse.train.trainer import load_run

    ds, out, m, _ = cv_run
    sizes = ds.split_sizes()
    ff = m["final_fit"]
    assert (ff["splits"], ff["items"], ff["epochs"]) == (["train", "val"], sizes["train"] + sizes["val"], m["cv"]["epochs"])
    assert set(ff["test"]) == {"image", "text", "fused"}  # test stays held out and is reported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["final_fit"] == "train+val" and cfg["fusion"]["image_weight"] == m["cv"]["image_weight"]
    # The temperatures the bundle ships are the ones fitted on the pooled out-of-fold predictions.
    assert m["calibration"]["fitted_on"] == "out-of-fold predictions"
    assert cfg["calibration"]["temperature"] == m["calibration"]["temperature"]
    shipped = load_file(str(out / "model.safetensors"))
    feats = load_file(str(next((out / "cache").glob("image-features-*"))))["features"]
    rows = np.concatenate([ds.indices("train"), ds.indices("val")])
    torch.testing.assert_close(shipped["feature_norm.mean"], feats[rows].mean(0))
    # The folds reused the run's feature cache rather than extracting their own.
    assert len(list((out / "cache").glob("image-features-*"))) == 1 and not list((out / "cv").glob("*/cache"))
    load_run(out)


def test_above_the_threshold_no_folds_run(grouped_catalog, tmp_path, monkeypatch):
    import huse.train.trainer as T

    monkeypatch.setattr(T, "KFOLD_MAX_ROWS", 50)
    ds, trainer = _trainer(grouped_catalog, tmp_path / "run", epochs=2, patience=0, cv_folds=None)
    assert trainer.cv["folds"] == 0 and ">= 50" in trainer.cv["reason"]
    m = trainer.fit(progress=False)
    assert not (tmp_path / "run" / "cv").exists() and m["final_fit"]["splits"] == ["train"]
    assert "fitted_on" not in m["calibration"] and m["cv"]["folds"] == 0
    from huse.train.cli import format_metrics

    assert "k-fold cross-validation not used (auto: " in format_metrics(m)


def test_by_default_a_small_catalog_takes_its_settings_from_folds_and_ships_a_refit(grouped_catalog, tmp_path,
                                                                                   monkeypatch):
    from huse.train.baselines import CV_FOLDS
    from huse.train.cli import main
    from huse.train.trainer import KFOLD_MAX_ROWS, TrainConfig, Trainer

    ds, trainer = _trainer(grouped_catalog, tmp_path / "run", epochs=1)  # no cv_folds: TrainConfig's default
    assert trainer.cv == {"folds": CV_FOLDS, "reason": f"auto: {len(ds.indices('train')) + len(ds.indices('val'))} "
                                                      f"train + val rows < {KFOLD_MAX_ROWS}"}
    assert trainer.tc.final_fit == "train+val"  # the folds' settings are for a model trained on train + val
    seen = []
    init = Trainer.__init__

    def recording(self, ds, out, model_cfg, train_cfg, *args, **kwargs):
        seen.append(train_cfg)
        init(self, ds, out, model_cfg, train_cfg, *args, **kwargs)
        raise SystemExit(0)  # what the CLI asked for is all this test reads

    monkeypatch.setattr(Trainer, "__init__", recording)
    CliRunner().invoke(main, ["--data", str(grouped_catalog), "--out", str(tmp_path / "cli"), "--backbone", "tiny"])
    monkeypatch.undo()
    assert seen and seen[0].cv_folds is None and TrainConfig().cv_folds is None


def test_cv_folds_0_leaves_the_run_as_before(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert "cv" not in m and not (tiny_run / "cv").exists() and "fitted_on" not in m["calibration"]


def test_by_default_a_small_multi_label_catalog_takes_its_settings_from_folds_too(tiny_multi_catalog, tmp_path):
    from huse.train.baselines import CV_FOLDS

    _, trainer = _trainer(tiny_multi_catalog, tmp_path / "auto", epochs=1)  # TrainConfig's default: auto
    assert trainer.cv["folds"] == CV_FOLDS and trainer.tc.final_fit == "train+val"


def test_multi_label_takes_its_weight_and_thresholds_from_folds_and_ships_a_refit(tiny_multi_catalog, tmp_path):
    from huse.train import multilabel
    from huse.train.cli import format_metrics

    ds, trainer = _trainer(tiny_multi_catalog, tmp_path / "run", epochs=3, patience=0, cv_folds=3)
    assert trainer.cv["folds"] == 3 and trainer.tc.final_fit == "train+val"
    m = trainer.fit(progress=False)
    cv, ff = m["cv"], m["final_fit"]
    assert m["task"] == "multi-label" and len(cv["per_fold"]) == 3 and m["fusion_image_weight"] == cv["image_weight"]
    assert all(set(f["val_map"]) == {"image", "text", "fused"} and 1 <= f["best_epoch"] <= 3 for f in cv["per_fold"])
    assert sum(f["items"] for f in cv["per_fold"]) == cv["rows"] == len(ds.indices("train")) + len(ds.indices("val"))
    # The shipped thresholds are tuned on the pooled out-of-fold predictions, not on val: the held-out model's
    # val-tuned ones are kept beside them, and config.json (what the bundle ships) holds the shipped ones.
    assert m["thresholds_from"] == "out-of-fold predictions" and set(m["held_out_thresholds"]) == set(m["thresholds"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["thresholds"] == m["thresholds"] and cfg["fusion"]["image_weight"] == cv["image_weight"]
    assert cfg["final_fit"]["splits"] == ff["splits"] == ["train", "val"] and ff["epochs"] == cv["epochs"]
    # The refit is reported on test at the shipped thresholds, beside the one-vs-rest LR fitted on the same rows.
    test = trainer.predict("test")
    w = cv["image_weight"]
    fused = multilabel.multilabel_report(w * test["image"] + (1 - w) * test["text"], test["y"],
                                         np.asarray(m["thresholds"]["fused"]), trainer.hierarchy)
    assert ff["test"]["fused"]["micro_f1"] == pytest.approx(fused["micro_f1"]) and ff["test"]["fused"]["map"] == pytest.approx(fused["map"])
    assert set(ff["baseline_test"]) == {"image", "text", "fused"} and ff["baseline_info"]["folds"] == 3
    report = format_metrics(m)
    assert "3-fold cross-validation by product" in report and "out-of-fold mAP" in report
    assert "thresholds from out-of-fold predictions" in report and "shipped model: refitted on train + val" in report


def test_multi_label_refit_without_folds_keeps_vals_weight_and_thresholds(tiny_multi_catalog, tmp_path):
    _, trainer = _trainer(tiny_multi_catalog, tmp_path / "run", epochs=2, patience=0, cv_folds=0, final_fit="train+val")
    m = trainer.fit(progress=False)
    assert m["thresholds_from"] == "val" and "held_out_thresholds" not in m and "cv" not in m
    assert m["final_fit"]["splits"] == ["train", "val"] and m["final_fit"]["epochs"] == m["best_epoch"]
    assert set(m["final_fit"]["test"]) == set(m["final_fit"]["baseline_test"]) == {"image", "text", "fused"}


def test_the_final_one_vs_rest_lr_reads_its_weight_and_thresholds_off_the_folds():
    from huse.train import multilabel

    rng = np.random.default_rng(0)
    n, groups = 120, np.repeat(np.arange(60), 2)
    y = (rng.random((60, 4)) < 0.4).astype(np.float32)[groups]
    image = y @ rng.normal(size=(4, 6)) + rng.normal(scale=3.0, size=(n, 6))  # weak
    text = y @ rng.normal(size=(4, 6)) + rng.normal(scale=1.0, size=(n, 6))  # strong
    rows, test = np.arange(80), np.arange(80, n)
    folds = [(np.flatnonzero(groups[rows] % 4 != k), np.flatnonzero(groups[rows] % 4 == k)) for k in range(4)]
    probs, info = multilabel.ovr_final(image, text, y, groups, rows, folds, test)
    assert info["folds"] == 4 and info["fusion_image_weight"] < 0.5  # the text carries the labels
    assert set(probs) == {"image", "text", "fused"} and probs["fused"].shape == (len(test), 4)
    f1 = {m: multilabel.multilabel_report(probs[m], y[test], info["thresholds"][m], Hierarchy(list("abcd")))["micro_f1"]
          for m in probs}
    assert f1["fused"] > 0.7 and f1["fused"] > f1["image"] + 0.1


def test_a_catalog_whose_classes_all_have_under_five_rows_trains_and_says_why_no_folds_ran(tiny_catalog, tmp_path):
    # A first try of a dozen photos (`huse data catalog`): scikit-learn refused 5 stratified folds after training.
    rows = [r for r in csv.DictReader(open(tiny_catalog, newline=""))]
    small = []
    for label in sorted({r["classes"] for r in rows})[:3]:
        small += [dict(r, image=str(tiny_catalog.parent / r["image"])) for r in rows if r["classes"] == label][:4]
    for r in small:
        r.pop("split", None)
    path = tmp_path / "catalog.csv"
    write_rows(path, small)
    ds, trainer = _trainer(path, tmp_path / "run", epochs=1)
    assert trainer.cv["folds"] == 0 and "allow" in trainer.cv["reason"]
    metrics = trainer.fit(progress=False)
    assert metrics["baseline_settings"]["folds"] < 5 and metrics["cv"]["folds"] == 0


def test_bad_fold_counts_say_what_to_do(grouped_catalog, tmp_path):
    from huse.runtime.errors import HuseError
    from huse.train.cli import main
    from huse.train.trainer import TrainConfig

    with pytest.raises(HuseError, match="not a number of folds"):
        TrainConfig(cv_folds=1)
    with pytest.raises(HuseError, match=r"--cv-folds 500: train \+ val \(\d+ products, at most \d+ rows a class\) allow "
                                        r"only \d+ folds by product; pass fewer folds"):
        _trainer(grouped_catalog, tmp_path / "many", epochs=1, cv_folds=500)
    r = CliRunner().invoke(main, ["--data", str(grouped_catalog), "--out", str(tmp_path / "x"), "--cv-folds", "five"])
    assert r.exit_code == 1 and r.output.strip() == ("error: --cv-folds 'five' is not a number of folds; pass 0 (never), "
                                                     "2 or more, or auto")
