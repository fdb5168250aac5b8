"""Baselines every training run compares itself with, and calibration of its confidence.

A user who has a catalog and the same frozen features could fit a logistic regression in ten
lines of scikit-learn, and a careful one would tune it. Every `huse-train` run does exactly
that, on the same split and the same features, so that it can say plainly when HUSE is not
worth it:

- image: multinomial logistic regression on the standardised frozen backbone features;
- text: on the frozen text features when the text encoder is pretrained (MiniLM), else on
  TF-IDF of words and character 3-5-grams of the title (the word CNN has no frozen features);
- fused: the two probabilities mixed with an image weight w.

Two versions are fitted. *Tuned* (the one the verdict uses): C from a small grid and the fusion
weight chosen by k-fold cross-validation on the training split, folds grouped by product so that
no product is on both sides; tuning runs on at most CV_MAX_ROWS training rows (a seeded sample
of products), and the chosen settings are then fitted once on all training rows. *Defaults*:
scikit-learn's own `LogisticRegression()` (C=1, at most 100 solver iterations) and the two
probabilities averaged, what ten untuned lines give.

Cost on fashion-products (55,000 rows, 1,984 image features, 18,158 TF-IDF text features; one
thread, `make demo`'s step): tuning 60 fits on 2,000 rows 26 s, the tuned text fit 8 s, the tuned
image fit (C=0.01, 274 iterations) 84-119 s, the defaults' image fit 29 s. That fit ran 262 s
when the defaults had the tuned fits' 2,000-iteration cap: C=1 converges slowly, and the cap is not
what a user's ten lines get (with it: image test top-1 88.5%; scikit-learn's own 100: 89.8%).
With BLAS's default threads (two on the 2-core machine) the whole step took 143-149 s; at one thread,
how it runs now (`one_blas_thread`), 93-94 s.

One regression on both feature sets side by side was tried as the fused baseline and dropped:
its cross-validated top-1 (best C) was 9-10 points below the mixed probabilities on all three
small real catalogs (phosphor-icons 54.0% vs 63.9%, tabler-icons 60.3% vs 69.6%, mdi-icons
81.4% vs 89.8%), and it cost a third of the tuning time.

Calibration: one temperature per mode, fitted on validation by minimising the negative log
likelihood (Guo et al. 2017, "On Calibration of Modern Neural Networks"). For image and text it
divides the logits; for fused it divides the log of the fused probabilities (a mixture has no
single logit vector), i.e. p -> p^(1/T), renormalised.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from huse.runtime.classifier import temperature_scale
from huse.runtime.errors import HuseError

MODES = ("image", "text", "fused")
COVERAGES = (0.5, 0.8, 0.95)
# Inverse L2 strength; scikit-learn's default is 1. Chosen on phosphor-icons: image 0.1, text 0.3.
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
CV_FOLDS = 5
# Tuning cost grows with rows x grid x folds (60 fits): on fashion-products, 2,400-row folds took
# 8-20 s a fit on a busy 2-core machine, so its 55,000 rows tune on a sample of whole products and
# are fitted once at the end; small catalogs (phosphor-icons: 1,602 rows) tune on all of them.
CV_MAX_ROWS = 2000
WEIGHT_GRID = np.round(np.linspace(0, 1, 21), 2)  # the image weight of a fused answer, step 0.05


# Tuned fits run to convergence; capping them (e.g. at 100 iterations) saved a minute on fashion-products
# for 0.04 points of image top-1, and subsampling its 55,000 rows to 20,000 cost 1.2 points: neither is used.
TUNED_MAX_ITER = 2000
SKLEARN_MAX_ITER = 100  # LogisticRegression's default


def one_blas_thread(fit):
    """Run `fit` (the baselines' solver fits) with numpy's and scipy's BLAS limited to one thread.

    scipy's L-BFGS-B (rewritten in C in scipy 1.15) calls BLAS vector routines on the F x C weights at every
    step, and with OpenBLAS's threads those calls cost more than the work they share (scipy/scipy#22438,
    #23191; OpenMathLib/OpenBLAS#5383, where OPENBLAS_NUM_THREADS=1 is the known remedy). On the 2-core
    machine the baselines took 57-58 s with two threads and 18 s with one on 3,000 fashion-products rows (3.2x),
    143-149 s and 93-94 s on its 55,000 (1.56x), 2.6-4.0x less on the three small icon catalogs, with the same
    test top-1 (`benchmarks/experiments/baseline_threads.py`; docs/quality.md).
    torch and onnxruntime keep their own pools; the limit ends when `fit` returns.
    """
    @functools.wraps(fit)
    def limited(*args, **kwargs):
        import scipy.optimize  # noqa: F401  (loads scipy's own OpenBLAS, which the limit must see)
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        with threadpool_limits(limits=1, user_api="blas"):
            return fit(*args, **kwargs)
    return limited


def _lr(c: float, max_iter: int = TUNED_MAX_ITER):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter)


def _proba(clf, x, n_classes: int) -> np.ndarray:
    p = np.zeros((x.shape[0], n_classes), dtype=np.float32)
    p[:, clf.classes_] = clf.predict_proba(x)  # classes absent from train get probability 0
    return p


def _fit(c: float, x_train, y_train: np.ndarray, max_iter: int = TUNED_MAX_ITER):
    """LogisticRegression(C=c, max_iter) fitted on the rows given."""
    if max_iter < TUNED_MAX_ITER:  # scikit-learn's defaults: stopping at its iteration cap is what a user gets
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return _lr(c, max_iter).fit(x_train, y_train)
    return _lr(c, max_iter).fit(x_train, y_train)


def _fit_predict(c: float, x_train, y_train: np.ndarray, n_classes: int, x_eval: list,
                 max_iter: int = TUNED_MAX_ITER) -> list[np.ndarray]:
    """Fit LogisticRegression(C=c, max_iter) and return the probabilities (N, n_classes) of each of `x_eval`.

    Rows of one class (a fold's training side on a catalog of a few products) predict that class: scikit-learn
    refuses to fit them."""
    if len(only := np.unique(y_train)) == 1:
        return [np.eye(n_classes, dtype=np.float32)[np.full(x.shape[0], only[0])] for x in x_eval]
    clf = _fit(c, x_train, y_train, max_iter)
    return [_proba(clf, x, n_classes) for x in x_eval]


def _tuned_fit(c: float, x_train, y_train: np.ndarray, sample: np.ndarray):
    """The tuned fit on every training row, lbfgs started from the fit on `sample` (the cross-validation rows).

    The same optimum to the solver's tolerance, in a few fewer passes over the rows: fashion-products' image LR
    (55,000 x 1,984, C=0.01) took 244 iterations and 73 s from this sample's fit against 273 and 77 s from zero
    (test top-1 90.71% against 90.68%); fashion-products-open's MiniLM text LR (384 features, C=0.1) 112 and
    10.3 s against 113 and 9.8 s. A fit at scikit-learn's default C starts from
    zero as before: converged within the defaults' 100 iterations it is their fit too (`_defaults_fit`). So
    does a fit whose sample is every row, or lacks a class.
    """
    if c == 1.0 or len(sample) == len(y_train) or len(np.unique(y_train[sample])) != len(np.unique(y_train)):
        return _fit(c, x_train, y_train)
    clf = _lr(c)
    clf.warm_start = True
    clf.fit(x_train[sample], y_train[sample])
    return clf.fit(x_train, y_train)


def _defaults_fit(tuned, c: float, x_train, y_train: np.ndarray):
    """scikit-learn's `LogisticRegression()` on the rows given; the tuned fit itself when that is the same fit.

    The tuned fit at C=1 that converged within the defaults' 100 iterations is that fit: lbfgs takes
    the same steps from the same start and stops at the same point, the cap never reached (fashion-
    products' TF-IDF text LR: one ~7 s fit saved in every run).
    """
    if c == 1.0 and int(np.max(tuned.n_iter_)) < SKLEARN_MAX_ITER:
        return tuned
    return _fit(1.0, x_train, y_train, SKLEARN_MAX_ITER)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def _tfidf(train: list[str], *others: list[str]):
    """TF-IDF of words and of character 3-5-grams (those in 2 titles or more). A half that finds no term in the
    training titles (names such as 'a1', 'a2': no word of 2 letters, no n-gram shared) is left out; with neither,
    one constant feature (the LR then answers the classes' frequencies)."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    fitted = []
    for vec in (TfidfVectorizer(lowercase=True, ngram_range=(1, 2), sublinear_tf=True),
                TfidfVectorizer(lowercase=True, analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2)):
        try:
            fitted.append((vec, vec.fit_transform(train)))
        except ValueError:  # scikit-learn's "empty vocabulary" / "no terms remain"
            continue
    if not fitted:
        return [csr_matrix(np.ones((len(t), 1), dtype=np.float32)) for t in (train, *others)]
    out = [hstack([m for _, m in fitted]).tocsr()]
    out += [hstack([vec.transform(t) for vec, _ in fitted]).tocsr() for t in others]
    return out


def best_weight(p_img: np.ndarray, p_txt: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The image weight in [0, 1] (step 0.05) with the best fused top-1, ties to 0.5; and that top-1."""
    acc = [float(((w * p_img + (1 - w) * p_txt).argmax(1) == y).mean()) for w in WEIGHT_GRID]
    best = max(acc)
    return float(min((w for w, a in zip(WEIGHT_GRID, acc) if a == best), key=lambda w: abs(w - 0.5))), best


def baseline_features(image_feats: np.ndarray, text: np.ndarray | list[str], train: np.ndarray,
              evals: dict[str, np.ndarray]) -> dict[str, list]:
    """mode -> [train features, *features of each evaluation split] (image: standardised; text: standardised or TF-IDF)."""
    names = list(evals)
    img = _standardise(image_feats[train], *(image_feats[evals[s]] for s in names))
    if isinstance(text, np.ndarray):
        txt = _standardise(text[train], *(text[evals[s]] for s in names))
    else:
        txt = _tfidf([text[i] for i in train], *([text[i] for i in evals[s]] for s in names))
    return {"image": img, "text": txt}


def fold_count(y: np.ndarray, groups: np.ndarray, folds: int) -> int:
    """How many of `folds` product folds rows with classes `y` and products `groups` allow: one product cannot be
    cut, and scikit-learn's StratifiedGroupKFold refuses more folds than the largest class has rows."""
    return int(min(folds, len(np.unique(groups)), np.bincount(y).max(initial=0)))


def product_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int,
                  sample: bool = True) -> tuple[np.ndarray, list]:
    """Cross-validation folds grouped by product (stratified by class where the products allow it).

    Args:
        y: (N,) class index of each row.
        groups: (N,) product of each row: a product's rows are always in one fold.
        folds: number of folds; fewer where the rows allow fewer (`fold_count`).
        seed: the fold assignment and the sample.
        sample: above CV_MAX_ROWS rows (the baselines' tuning budget), use a seeded sample of whole products of
            about that many rows; False: every row.
    Returns:
        (the rows used, as indices into y; [(train, validation) positions into those rows] per fold).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    rows = np.arange(len(y))
    if sample and len(rows) > CV_MAX_ROWS:  # sample whole products, so a sampled product keeps all its rows
        products = np.unique(groups)
        keep = np.random.default_rng(seed).permutation(products)[:max(1, int(len(products) * CV_MAX_ROWS / len(rows)))]
        rows = rows[np.isin(groups, keep)]
    k = fold_count(y[rows], groups[rows], folds)
    if k < 2:
        raise HuseError(f"cross-validation by product needs 2 products or more, and a class with 2 rows or more; "
                        f"these {len(rows)} training rows hold {len(np.unique(groups[rows]))} products and at most "
                        f"{np.bincount(y[rows]).max(initial=0)} rows a class: add products to the catalog")
    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": expected on small catalogs
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return rows, list(splitter.split(rows, y[rows], groups[rows]))


def _cross_validate(x, y: np.ndarray, n_classes: int, folds: list, grid=C_GRID) -> dict[float, np.ndarray]:
    """Out-of-fold probabilities for each C: C -> (rows, n_classes), in the folds' validation-row order.

    Every fit starts cold, as the final fit does: warm starts along the grid stop at the solver's
    tolerance near the previous C's solution, and on phosphor-icons picked a C whose cold fit
    then scored 4 points lower on test.
    """
    return {c: np.concatenate([_fit_predict(c, x[a], y[a], n_classes, [x[b]])[0] for a, b in folds]) for c in grid}


def _pick_c(oof: dict[float, np.ndarray], y_oof: np.ndarray) -> tuple[float, dict[str, float]]:
    """The C with the best out-of-fold top-1 (ties to the smaller C: the simpler model); and every C's top-1."""
    acc = {c: float((p.argmax(1) == y_oof).mean()) for c, p in oof.items()}
    best = max(acc.values())
    return min(c for c, a in acc.items() if a == best), {str(c): a for c, a in acc.items()}


@one_blas_thread
def logistic_baselines(image_feats: np.ndarray, text: np.ndarray | list[str], y: np.ndarray, n_classes: int,
                       train: np.ndarray, evals: dict[str, np.ndarray], groups: np.ndarray | None = None,
                       folds: int = CV_FOLDS, seed: int = 0, final: np.ndarray | None = None) -> dict[str, Any]:
    """Probabilities of the tuned and the scikit-learn-defaults logistic-regression baselines on each evaluation split.

    Args:
        image_feats: (N, F) frozen image features of every item.
        text: (N, T) frozen text features, or the N titles (then TF-IDF features are used).
        y: (N,) class indices.
        n_classes: number of classes.
        train: indices to fit on.
        evals: split name -> indices to predict.
        groups: (N,) product of every item: cross-validation folds never split a product (default: every item its own).
        folds: cross-validation folds.
        seed: the folds and the tuning sample.
        final: indices the shipped HUSE model is refitted on (e.g. train + val), or None: the tuned settings are
            then also fitted on these rows, for a comparison on equal data.
    Returns:
        {"tuned": {split: {"image", "text", "fused": (n, C) probabilities}}, "defaults": the same for C=1 and
        averaged probabilities, "settings": what cross-validation chose and measured (every C's top-1, and the
        chosen settings' top-1 on each fold), and with `final`
        "tuned_final": the tuned settings fitted on `final`}.
    """
    feats = baseline_features(image_feats, text, train, evals)
    y_tr = y[train]
    rows, cv = product_folds(y_tr, (groups if groups is not None else np.arange(len(y)))[train], folds, seed)
    y_cv = y_tr[rows]
    y_oof = np.concatenate([y_cv[b] for _, b in cv])
    settings: dict[str, Any] = {"folds": len(cv), "cv_rows": int(len(rows)), "train_rows": int(len(train)),
                                "c_grid": list(C_GRID)}
    bounds = np.cumsum([0] + [len(b) for _, b in cv])

    def fold_top1(p: np.ndarray) -> list[float]:  # the chosen setting's top-1 on each fold: how much one split can move it
        return [round(float((p[a:b].argmax(1) == y_oof[a:b]).mean()), 4) for a, b in zip(bounds[:-1], bounds[1:])]

    oof_best: dict[str, np.ndarray] = {}
    for mode in ("image", "text"):
        oof = _cross_validate(feats[mode][0][rows], y_cv, n_classes, cv)
        c, acc = _pick_c(oof, y_oof)
        settings[mode] = {"C": c, "cv_top1": acc, "fold_top1": fold_top1(oof[c])}
        oof_best[mode] = oof[c]
    w, fused_acc = best_weight(oof_best["image"], oof_best["text"], y_oof)
    settings["fused"] = {"image_weight": w, "cv_top1": fused_acc,
                         "fold_top1": fold_top1(w * oof_best["image"] + (1 - w) * oof_best["text"])}

    fits = {m: _tuned_fit(settings[m]["C"], feats[m][0], y_tr, rows) for m in ("image", "text")}
    tuned = {m: [_proba(fits[m], x, n_classes) for x in feats[m][1:]] for m in ("image", "text")}
    default_fits = {m: _defaults_fit(fits[m], settings[m]["C"], feats[m][0], y_tr) for m in ("image", "text")}
    defaults = {m: [_proba(default_fits[m], x, n_classes) for x in feats[m][1:]] for m in ("image", "text")}
    out: dict[str, Any] = {"tuned": {}, "defaults": {}, "settings": settings}
    for k, s in enumerate(evals):
        pi, pt = tuned["image"][k], tuned["text"][k]
        out["tuned"][s] = {"image": pi, "text": pt, "fused": w * pi + (1 - w) * pt}
        di, dt = defaults["image"][k], defaults["text"][k]
        out["defaults"][s] = {"image": di, "text": dt, "fused": 0.5 * (di + dt)}
    if final is not None:
        more = baseline_features(image_feats, text, final, evals)
        pi, pt = (_fit_predict(settings[m]["C"], more[m][0], y[final], n_classes, more[m][1:]) for m in ("image", "text"))
        out["tuned_final"] = {s: {"image": pi[k], "text": pt[k], "fused": w * pi[k] + (1 - w) * pt[k]}
                              for k, s in enumerate(evals)}
    return out


# ----------------------------------------------------------------------------------------
# Calibration


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-12, None))


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log likelihood of the labels `y` under probabilities `p`."""
    return float(-_log(p[np.arange(len(y)), y]).mean())


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising validation NLL (log grid, then a finer grid around the best)."""
    def nll_at(t: float) -> float:
        return nll(temperature_scale(p, t), y)

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = min(grid, key=nll_at)
    fine = best * np.exp(np.linspace(-0.1, 0.1, 21))
    return float(min(fine, key=nll_at))


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over equal-width bins of |accuracy - confidence| weighted by the bin's share."""
    conf, right = p.max(1), (p.argmax(1) == y)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(ece)


def selective_accuracy(p: np.ndarray, y: np.ndarray, coverages=COVERAGES) -> dict[str, dict[str, float]]:
    """Accuracy on the most confident `c` share of items, and the confidence threshold that keeps that share.

    This is what a catalog team auto-accepting confident predictions gets: at coverage 0.8, the
    80% most confident predictions are accepted (threshold = the lowest accepted confidence) and
    the rest go to people.
    """
    conf, right = p.max(1), (p.argmax(1) == y)
    order = np.argsort(-conf, kind="stable")
    out = {}
    for c in coverages:
        k = max(1, int(round(c * len(y))))
        out[f"{c:.2f}"] = {"accuracy": float(right[order[:k]].mean()), "threshold": float(conf[order[k - 1]])}
    return out


def calibration_report(val: dict[str, np.ndarray], test: dict[str, np.ndarray] | None, y_val: np.ndarray,
                       y_test: np.ndarray | None, fit: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per mode: the temperature fitted on val, ECE before/after and selective accuracy on test (else val).

    Args:
        val, test: mode -> probabilities of each split (test may be None).
        y_val, y_test: their labels.
        fit: mode -> probabilities and "y" -> labels to fit the temperatures on instead of val (k-fold
            cross-validation's pooled out-of-fold predictions); recorded as "fitted_on".
    """
    y_eval = y_test if test is not None else y_val
    evals = test if test is not None else val
    out: dict[str, Any] = {"temperature": {}, "ece_before": {}, "ece_after": {}, "coverage": {},
                           "split": "test" if test is not None else "val"}
    if fit is not None:  # only then, so that runs without k-fold cross-validation keep their metrics byte for byte
        out["fitted_on"] = "out-of-fold predictions"
    for mode in MODES:
        t = fit_temperature(fit[mode], fit["y"]) if fit is not None else fit_temperature(val[mode], y_val)
        after = temperature_scale(evals[mode], t)
        out["temperature"][mode] = round(t, 4)
        out["ece_before"][mode] = expected_calibration_error(evals[mode], y_eval)
        out["ece_after"][mode] = expected_calibration_error(after, y_eval)
        out["coverage"][mode] = selective_accuracy(after, y_eval)
    return out
