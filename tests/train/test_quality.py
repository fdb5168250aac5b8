"""Every run checks itself: baselines, calibration, early stopping, the adaptive defaults, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from huse.train.baselines import (C_GRID, expected_calibration_error, fit_temperature, logistic_baselines,
                                  selective_accuracy)
from huse.runtime.classifier import temperature_scale


def test_logistic_baselines_fit_separable_features_tuned_and_with_defaults():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    img = rng.normal(size=(120, 8)) + 4 * np.eye(3, 8)[y]  # class signal in the first 3 dims
    txt = [f"item {['red', 'green', 'blue'][c]} {i}" for i, c in enumerate(y)]
    train, test = np.arange(0, 120, 2), np.arange(1, 120, 2)
    b = logistic_baselines(img, txt, y, 4, train, {"test": test}, groups=np.arange(120) // 2, folds=3)  # 4 classes, 1 unseen
    for kind in ("tuned", "defaults"):
        p = b[kind]["test"]
        for mode in ("image", "text", "fused"):
            assert (p[mode].argmax(1) == y[test]).mean() > 0.95
            assert p[mode].shape == (60, 4) and np.allclose(p[mode][:, 3], 0) and np.allclose(p[mode].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(b["defaults"]["test"]["fused"], 0.5 * (b["defaults"]["test"]["image"] + b["defaults"]["test"]["text"]))
    st = b["settings"]
    for mode in ("image", "text"):
        acc = st[mode]["cv_top1"]
        assert set(acc) == {str(c) for c in C_GRID} and acc[str(st[mode]["C"])] == max(acc.values())
    for mode in ("image", "text", "fused"):  # the spread across folds: the chosen setting's top-1 on each of the 3
        folds = st[mode]["fold_top1"]
        chosen = st[mode]["cv_top1"] if mode == "fused" else st[mode]["cv_top1"][str(st[mode]["C"])]
        assert len(folds) == 3 and min(folds) - 1e-4 <= chosen <= max(folds) + 1e-4
    w = st["fused"]["image_weight"]
    np.testing.assert_allclose(b["tuned"]["test"]["fused"], w * b["tuned"]["test"]["image"] + (1 - w) * b["tuned"]["test"]["text"])


def test_defaults_baseline_is_scikit_learns_own_logistic_regression():
    # "LR C=1" must be what a user's untuned ten lines give: LogisticRegression() with all its defaults
    # on the same standardised features (its 100-iteration cap only binds on large catalogs).
    import warnings

    from sklearn.linear_model import LogisticRegression

    from huse.train.baselines import baseline_features

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 50)
    img = rng.normal(size=(200, 30)) + 0.7 * np.eye(4, 30)[y]  # overlapping classes
    txt = [f"item {['red', 'green', 'blue', 'gold'][c]} {i}" for i, c in enumerate(y)]
    train, test = np.arange(0, 200, 2), np.arange(1, 200, 2)
    b = logistic_baselines(img, txt, y, 4, train, {"test": test}, groups=np.arange(200), folds=3)
    x_train, x_test = baseline_features(img, txt, train, {"test": test})["image"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression().fit(x_train, y[train])
    np.testing.assert_allclose(b["defaults"]["test"]["image"], ref.predict_proba(x_test), atol=1e-6)


@pytest.mark.parametrize("cap", [100, 3])
def test_defaults_baseline_reuses_the_tuned_fit_only_when_it_is_the_same_fit(monkeypatch, cap):
    # Where cross-validation chooses C=1, the tuned fit is scikit-learn's LogisticRegression() run to
    # convergence, and it is reused for "LR C=1" when it converged within the cap. At cap 3 the cap binds:
    # the defaults must then be a capped fit of their own, not the tuned one.
    import warnings

    from sklearn.linear_model import LogisticRegression

    import huse.train.baselines as bl

    grid = bl._cross_validate
    monkeypatch.setattr(bl, "_cross_validate", lambda x, y, n, folds: grid(x, y, n, folds, grid=(1.0,)))
    monkeypatch.setattr(bl, "SKLEARN_MAX_ITER", cap)
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 50)
    img = rng.normal(size=(200, 30)) + 0.7 * np.eye(4, 30)[y]
    txt = [f"item {['red', 'green', 'blue', 'gold'][c]} {i}" for i, c in enumerate(y)]
    train, test = np.arange(0, 200, 2), np.arange(1, 200, 2)
    b = logistic_baselines(img, txt, y, 4, train, {"test": test}, groups=np.arange(200), folds=3)
    assert b["settings"]["image"]["C"] == b["settings"]["text"]["C"] == 1.0
    feats = bl.baseline_features(img, txt, train, {"test": test})
    for mode in ("image", "text"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LogisticRegression(max_iter=cap).fit(feats[mode][0], y[train])
        assert (ref.n_iter_[0] < cap) == (cap == 100)
        np.testing.assert_allclose(b["defaults"]["test"][mode], ref.predict_proba(feats[mode][1]), atol=1e-6)
        assert np.allclose(b["defaults"]["test"][mode], b["tuned"]["test"][mode], atol=1e-6) == (cap == 100)


def test_a_tuned_fit_on_more_rows_than_were_tuned_starts_from_the_samples_fit(monkeypatch):
    # Large catalogs tune C on a sample; the final fit on every row starts lbfgs from the sample's fit (on
    # fashion-products 244 iterations instead of 273), the same optimum to the solver's tolerance. At C=1 (the
    # defaults' C) it starts from zero.
    from sklearn.linear_model import LogisticRegression

    import huse.train.baselines as bl

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 300)
    x = rng.normal(size=(1200, 40)) + 0.6 * np.eye(4, 40)[y]
    monkeypatch.setattr(bl, "CV_MAX_ROWS", 300)
    rows, _ = bl.product_folds(y, np.arange(1200), 3, seed=0)
    assert len(rows) == 300
    cold = LogisticRegression(C=0.03, max_iter=2000).fit(x, y)
    warm = bl._tuned_fit(0.03, x, y, rows)
    assert warm.warm_start and warm.coef_.shape == cold.coef_.shape
    np.testing.assert_allclose(warm.predict_proba(x), cold.predict_proba(x), atol=1e-2)
    assert not bl._tuned_fit(1.0, x, y, rows).warm_start
    assert not bl._tuned_fit(0.03, x, y, np.arange(1200)).warm_start  # tuned on every row: nothing to start from
    assert not bl._tuned_fit(0.03, x, y, rows[y[rows] != 3]).warm_start  # the sample lacks a class


def test_the_baselines_fit_with_one_blas_thread_and_give_the_threads_back(monkeypatch):
    # scipy's L-BFGS-B with OpenBLAS's threads made the baselines 3.2x slower on the 2-core machine
    # (baselines.one_blas_thread): every solver fit, single- and multi-label, sees each BLAS the process has
    # (numpy's and scipy's own OpenBLAS) at one thread, and the caller's threads come back afterwards.
    import scipy.optimize  # noqa: F401  (its BLAS loaded, so that `before` lists it)
    from threadpoolctl import threadpool_info

    import huse.train.baselines as bl
    from huse.train import multilabel

    def blas() -> dict[str, int]:
        return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    seen: list[dict[str, int]] = []
    for module, name in ((bl, "_fit"), (multilabel, "_fit_ovr")):
        fit = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fit=fit, **k: (seen.append(blas()), _fit(*a, **k))[1])
    before = blas()
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    img = rng.normal(size=(120, 8)) + 4 * np.eye(3, 8)[y]
    txt = [f"item {['red', 'green', 'blue'][c]} {i}" for i, c in enumerate(y)]
    logistic_baselines(img, txt, y, 3, np.arange(80), {"val": np.arange(80, 120)}, groups=np.arange(120), folds=3)
    multilabel.ovr_baselines(img, img, np.eye(3)[y], np.arange(120), np.arange(80), {"val": np.arange(80, 120)})
    assert len(seen) > 20  # the cross-validation fits and the final ones, both kinds
    assert all(s.keys() == before.keys() and set(s.values()) == {1} for s in seen)
    assert blas() == before


def test_cross_validation_folds_keep_products_whole(monkeypatch):
    import huse.train.baselines as bl

    y = np.repeat(np.arange(3), 60)
    groups = np.arange(180) // 3  # 60 products of 3 rows each
    rows, folds = bl.product_folds(y, groups, 5, seed=0)
    assert len(rows) == 180 and len(folds) == 5
    for a, b in folds:
        assert not set(groups[rows[a]]) & set(groups[rows[b]])
    monkeypatch.setattr(bl, "CV_MAX_ROWS", 90)  # large catalogs tune on a sample of whole products
    rows, folds = bl.product_folds(y, groups, 5, seed=0)
    assert len(rows) == 90 and all(np.sum(groups[rows] == g) == 3 for g in set(groups[rows]))
    assert sorted(np.concatenate([rows[b] for _, b in folds]).tolist()) == rows.tolist()


def test_a_catalog_too_small_for_five_folds_gets_the_folds_it_allows_or_a_clear_error():
    import huse.train.baselines as bl
    from huse.runtime.errors import HuseError

    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])  # every class under 5 rows: scikit-learn refused 5 folds
    rows, folds = bl.product_folds(y, np.arange(11), 5, seed=0)
    assert len(folds) == 4 and sorted(np.concatenate([b for _, b in folds]).tolist()) == list(range(11))
    assert bl.fold_count(y, np.arange(11) // 4, 5) == 3  # 3 products
    with pytest.raises(HuseError, match="needs 2 products or more.* 11 training rows hold 1 products"):
        bl.product_folds(y, np.zeros(11, dtype=int), 5, seed=0)
    # One class with a single product: the fold that holds it out trains on the other class alone.
    rng = np.random.default_rng(0)
    y = np.array([0] * 8 + [1])
    feats = rng.normal(size=(9, 4)) + 3 * np.eye(2, 4)[y]
    b = bl.logistic_baselines(feats, feats, y, 2, np.arange(9), {"val": np.arange(9)}, folds=5)
    assert b["settings"]["folds"] == 5 and b["tuned"]["val"]["fused"].shape == (9, 2)


def test_titles_without_words_or_shared_ngrams_still_give_text_baseline_features():
    import huse.train.baselines as bl

    both = bl._tfidf(["red wool coat", "red wool scarf"], ["blue coat"])
    assert both[0].shape[1] > 5 and both[1].shape == (1, both[0].shape[1])
    names = bl._tfidf(["a1", "a2", "b1"], ["a1"])  # file-name titles: words of 2 letters, no 3-gram in 2 titles
    assert names[0].shape == (3, 3) and names[1].toarray().tolist() == [[1.0, 0.0, 0.0]]
    letters = bl._tfidf(["a", "b"], ["c"])  # nothing at all: one constant feature
    assert letters[0].shape == (2, 1) and letters[1].toarray().tolist() == [[1.0]]


def test_temperature_is_recovered_and_calibration_gets_better():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 5)) * 3
    true = temperature_scale(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)
    y = np.array([rng.choice(5, p=row) for row in true])  # labels drawn from the true probabilities
    overconfident = temperature_scale(true, 0.4)  # what an overfitted model reports
    t = fit_temperature(overconfident, y)
    assert 2.2 < t < 2.9  # 1 / 0.4 = 2.5
    before = expected_calibration_error(overconfident, y)
    after = expected_calibration_error(temperature_scale(overconfident, t), y)
    assert before > 0.1 and after < 0.03


def test_selective_accuracy_accepts_the_most_confident_share():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 0, 1, 1])  # the two confident ones are right, the others wrong
    cov = selective_accuracy(p, y, coverages=(0.5, 1.0))
    assert cov["0.50"] == {"accuracy": 1.0, "threshold": pytest.approx(0.8)}
    assert cov["1.00"]["accuracy"] == 0.5


def test_unseen_word_rate_chooses_the_text_encoder():
    from huse.train.trainer import OPEN_VOCABULARY_RATE, unseen_word_rate

    train = ["black leather boots", "navy cotton tee"]
    assert unseen_word_rate(train, ["Navy leather tee"]) == 0.0
    assert unseen_word_rate(train, ["merino henley", "navy tee"]) == 0.5
    assert OPEN_VOCABULARY_RATE < 0.5


def test_open_vocabulary_titles_never_use_training_words():
    import random

    from huse.train.fashion import (BRANDS, CLASSES, COLOURS, MATERIALS, OPEN_BRANDS, OPEN_MATERIALS, OPEN_NOUNS, SEASONS,
                                    SHARED_NOUNS, STYLES, make_title)

    closed = {w for ws in (BRANDS, MATERIALS, COLOURS, STYLES, SEASONS, *(c[1] for c in CLASSES), *SHARED_NOUNS.values())
              for p in ws for w in p.lower().split()}
    opened = {w for ws in (OPEN_BRANDS, OPEN_MATERIALS, *OPEN_NOUNS) for p in ws for w in p.lower().split()}
    assert not closed & opened
    rng = random.Random(0)
    titles = [make_title(k % 10, rng, open_vocab=True) for k in range(300)]
    assert sum(any(w in t.lower().split() for w in opened) for t in titles) > 200  # most name a new brand/noun


def _trainer(ds, out, **tc):
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    return Trainer(ds, out, HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32, max_len=8),
                   TrainConfig(batch_size=32, **{"cv_folds": 0, **tc}))


def test_run_reports_baselines_calibration_and_keeps_the_best_epoch(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert set(m["baseline"][split]) == set(m["baseline_defaults"][split]) == {"image", "text", "fused"}
    assert m["baseline_settings"]["image"]["C"] in C_GRID
    assert m["verdict"]["huse_beats_baseline_on_val"] == (not m["verdict"]["worse_modes"])
    cal = m["calibration"]
    assert set(cal["temperature"]) == {"image", "text", "fused"} and all(t > 0 for t in cal["temperature"].values())
    assert set(cal["coverage"]["fused"]) == {"0.50", "0.80", "0.95"}
    best = min(m["history"], key=lambda h: h["val_loss"])
    assert m["best_epoch"] == best["epoch"]
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["calibration"]["temperature"] == cal["temperature"]
    from huse.train.cli import format_metrics

    folds = m["baseline_settings"]["fused"]["fold_top1"]
    assert f"fused {min(folds):.2f}-{max(folds):.2f}" in format_metrics(m)  # the printed report shows the spread


def test_the_verdict_says_beats_only_when_every_mode_is_above_and_names_a_test_split_that_disagrees(tiny_run):
    """A tie on val is not a win, and a report whose test rows show HUSE below the baseline says so in words."""
    import copy

    from huse.train.cli import format_metrics

    m = json.loads((tiny_run / "metrics.json").read_text())
    m["verdict"]["worse_modes"] = {}
    for split in ("val", "test"):
        for mode in ("image", "text", "fused"):
            m[split][mode]["top1"], m["baseline"][split][mode]["top1"] = 0.9, 0.8
    last = lambda metrics: format_metrics(metrics).splitlines()[-1]  # noqa: E731
    assert last(m) == "HUSE beats the tuned logistic-regression baseline on val in every mode."
    tied = copy.deepcopy(m)
    tied["val"]["image"]["top1"] = 0.8
    assert last(tied) == ("HUSE matches or beats the tuned logistic-regression baseline on val in every mode (equal in "
                          "image).")
    tied["test"]["fused"]["top1"] = 0.75
    n = m["split_sizes"]["test"]
    assert last(tied).endswith(f"(equal in image). On test it is below in fused (0.7500 < 0.8000) ({n} test items: "
                               "small splits are noisy, and the settings were not chosen on test).")


@pytest.mark.parametrize("multi", [False, True], ids=["single-label", "multi-label"])
def test_early_stopping_stops_after_patience(multi, tiny_catalog, tiny_multi_catalog, tmp_path, capsys):
    from huse.train.data import load_catalog_dataset

    ds = load_catalog_dataset(tiny_multi_catalog if multi else tiny_catalog)
    m = _trainer(ds, tmp_path / "run", epochs=200, patience=1, lr=3e-3).fit()
    # patience is at least 3 epochs: the run ends 3 epochs after its best one, long before 200
    assert m["epochs_run"] == m["best_epoch"] + 3 < 200
    # and its progress bar says why it ends short of its total (it read as a run that died), naming what it
    # watched: a multi-label run stops on val mAP, which the bar called "val loss"
    steps = 3 * -(-len(ds.indices("train")) // 32)  # patience 1 step is at least 3 epochs of ceil(rows / 32) steps
    watched = "val mAP" if multi else "val loss"
    assert (f"training: stopped early, no better {watched} in {steps} steps; best epoch {m['best_epoch']} of "
            f"{m['epochs_run']}") in capsys.readouterr().err


def test_resume_is_bit_exact(tiny_catalog, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from huse.train.data import load_catalog_dataset
    from huse.train.trainer import Trainer

    ds = load_catalog_dataset(tiny_catalog)
    whole = _trainer(ds, tmp_path / "whole", epochs=4, patience=0).fit(progress=False)

    save = Trainer._save_checkpoint

    def killed_after_epoch_2(self):
        save(self)
        if self.epoch == 2:
            raise KeyboardInterrupt  # the process dies right after its second checkpoint

    monkeypatch.setattr(Trainer, "_save_checkpoint", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _trainer(ds, tmp_path / "cut", epochs=4, patience=0).fit(progress=False)
    monkeypatch.undo()
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig

    resumed = Trainer(ds, tmp_path / "cut", HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32,
                                                       max_len=8), TrainConfig(batch_size=32, epochs=4, patience=0, cv_folds=0),
                      resume=True).fit(progress=False)
    assert resumed["history"] == whole["history"]  # every loss and val figure, to the last bit
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_arch_presets_set_the_towers_and_custom_keeps_them():
    from huse.runtime.errors import HuseError
    from huse.train.config import HuseConfig, resolve_arch

    cfg = HuseConfig(num_classes=3, arch="compact", image_layers=5)
    resolve_arch(cfg)
    assert (cfg.image_layers, cfg.text_layers, cfg.dropout) == (1, 0, 0.5)
    cfg = HuseConfig(num_classes=3, arch="paper")
    resolve_arch(cfg)
    assert (cfg.image_layers, cfg.text_layers, cfg.dropout) == (5, 2, 0.15)
    cfg = HuseConfig(num_classes=3, image_layers=3)
    resolve_arch(cfg)
    assert cfg.image_layers == 3
    with pytest.raises(HuseError, match="available"):
        resolve_arch(HuseConfig(num_classes=3, arch="huge"))


def test_instance_loss_prefers_matching_pairs_and_treats_a_products_items_as_positives():
    import torch

    from huse.train.losses import instance_loss

    e = torch.nn.functional.normalize(torch.eye(4), dim=1)
    product = torch.tensor([0, 1, 2, 3])
    matched = instance_loss(e, e, product, 0.1)
    shuffled = instance_loss(e, e[[1, 0, 3, 2]], product, 0.1)
    assert matched < 0.01 < shuffled
    # items 0 and 1 are one product: pairing 0's image with 1's title is no longer a mistake
    assert instance_loss(e, e[[1, 0, 2, 3]], torch.tensor([0, 0, 2, 3]), 0.1) < shuffled
    assert instance_loss(e, e, product, 0.1, image_view=e) < 0.01


def test_final_fit_refits_on_train_and_val_with_the_chosen_settings(tiny_catalog, tmp_path):
    import torch
    from safetensors.torch import load_file

    from huse.runtime.tokenizer import words
    from huse.train.data import load_catalog_dataset
    from huse.train.trainer import load_run

    ds = load_catalog_dataset(tiny_catalog)
    m = _trainer(ds, tmp_path / "run", epochs=6, patience=0, lr=3e-3, final_fit="train+val").fit(progress=False)
    sizes = ds.split_sizes()
    ff = m["final_fit"]
    assert (ff["rows"], ff["splits"], ff["items"]) == ("train+val", ["train", "val"], sizes["train"] + sizes["val"])
    assert ff["epochs"] == m["best_epoch"] and set(ff["test"]) == {"image", "text", "fused"}  # test still held out
    assert set(ff["baseline_test"]) == {"image", "text", "fused"}  # the tuned LR on the same rows, beside it
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["final_fit"]["items"] == ff["items"]
    # The shipped model saw val: its vocabulary has val's words, and its feature statistics are those of train + val.
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    val_words = {w for i in ds.indices("val") for w in words(ds.titles[i])}
    assert val_words and val_words <= set(vocab)
    shipped = load_file(str(tmp_path / "run" / "model.safetensors"))
    feats = load_file(str(next((tmp_path / "run" / "cache").glob("image-features-*"))))["features"]
    rows = np.concatenate([ds.indices("train"), ds.indices("val")])
    torch.testing.assert_close(shipped["feature_norm.mean"], feats[rows].mean(0))
    load_run(tmp_path / "run")  # export can load it: weights and config agree


def test_final_fit_train_ships_the_held_out_model(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["final_fit"]["splits"] == ["train"] and "test" not in m["final_fit"]


def test_level_accuracy_counts_only_the_items_whose_class_reaches_that_level():
    """A ragged hierarchy (a shop's taxonomy, or a new class that only test rows carry): level 2 is read over the
    items whose class has a level 2. Before, every item of a one-level class counted as right at level 2, so a
    run whose only two-level class was never predicted reported L2=1.000."""
    from huse.runtime.hierarchy import Hierarchy
    from huse.train.trainer import accuracy_report

    h = Hierarchy(["arrows", "brand new<class", "shapes", "tools<hammers", "tools<saws"])
    y = np.array([0, 2, 1, 3, 4, 4])
    probs = np.eye(5)[[0, 2, 0, 3, 3, 4]] * 0.9 + 0.02  # item 2 (brand new<class) read as arrows, item 4 as hammers
    probs[2, 4] += 0.01  # what item 2 gives level 2 goes to tools<saws, not its own class: no tie to read as right
    r = accuracy_report(probs, y, h)
    assert r["top1"] == pytest.approx(4 / 6)
    assert r["levels"]["1"] == pytest.approx(5 / 6)  # item 2's first level is wrong; item 4's (tools) right
    assert r["levels"]["2"] == pytest.approx(2 / 4)  # items 2-5 reach level 2: 3 and 5 right
    assert accuracy_report(probs[[0, 1]], y[[0, 1]], h)["levels"] == {"1": 1.0}  # no item reaches level 2
