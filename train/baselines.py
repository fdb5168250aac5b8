"""Simple baselines every training run compares itself with, and calibration of its confidence.

A user who has a catalog and the same frozen features could fit a logistic regression in ten
lines of scikit-learn. Every `huse-train` run does exactly that, on the same split and the same
features, so that it can say plainly when HUSE is not worth it:

- image: multinomial logistic regression on the standardised frozen backbone features;
- text: on the frozen text features when the text encoder is pretrained (MiniLM), else on
  TF-IDF of words and character 3-5-grams of the title (the word CNN has no frozen features);
- fused: the two probabilities averaged, as a user would.

Calibration: one temperature per mode, fitted on validation by minimising the negative log
likelihood (Guo et al. 2017, "On Calibration of Modern Neural Networks"). For image and text it
divides the logits; for fused it divides the log of the fused probabilities (a mixture has no
single logit vector), i.e. p -> p^(1/T), renormalised.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from huse.runtime.classifier import temperature_scale

MODES = ("image", "text", "fused")
COVERAGES = (0.5, 0.8, 0.95)


def _logistic_regression(x_train: np.ndarray, y_train: np.ndarray, n_classes: int, x_eval: list[np.ndarray]) -> list[np.ndarray]:
    """Fit scikit-learn's LogisticRegression (its defaults, C=1) and return eval probabilities (N, n_classes)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000)
    clf.fit(x_train, y_train)
    out = []
    for x in x_eval:
        p = np.zeros((x.shape[0], n_classes), dtype=np.float32)
        p[:, clf.classes_] = clf.predict_proba(x)  # classes absent from train get probability 0
        out.append(p)
    return out


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def _tfidf(train: list[str], *others: list[str]):
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), sublinear_tf=True)
    chars = TfidfVectorizer(lowercase=True, analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2)
    out = [hstack([words.fit_transform(train), chars.fit_transform(train)]).tocsr()]
    out += [hstack([words.transform(t), chars.transform(t)]).tocsr() for t in others]
    return out


def logistic_baselines(image_feats: np.ndarray, text: np.ndarray | list[str], y: np.ndarray, n_classes: int,
                       train: np.ndarray, evals: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Probabilities of the logistic-regression baselines on each evaluation split.

    Args:
        image_feats: (N, F) frozen image features of every item.
        text: (N, T) frozen text features, or the N titles (then TF-IDF features are used).
        y: (N,) class indices.
        n_classes: number of classes.
        train: indices to fit on.
        evals: split name -> indices to predict.
    Returns:
        {split: {"image", "text", "fused": (n, C) probabilities}}.
    """
    names = list(evals)
    img = _standardise(image_feats[train], *(image_feats[evals[s]] for s in names))
    p_img = _logistic_regression(img[0], y[train], n_classes, img[1:])
    if isinstance(text, np.ndarray):
        txt = _standardise(text[train], *(text[evals[s]] for s in names))
    else:
        txt = _tfidf([text[i] for i in train], *([text[i] for i in evals[s]] for s in names))
    p_txt = _logistic_regression(txt[0], y[train], n_classes, txt[1:])
    return {s: {"image": pi, "text": pt, "fused": 0.5 * (pi + pt)} for s, pi, pt in zip(names, p_img, p_txt)}


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
                       y_test: np.ndarray | None) -> dict[str, Any]:
    """Per mode: the temperature fitted on val, ECE before/after and selective accuracy on test (else val)."""
    y_eval = y_test if test is not None else y_val
    evals = test if test is not None else val
    out: dict[str, Any] = {"temperature": {}, "ece_before": {}, "ece_after": {}, "coverage": {},
                           "split": "test" if test is not None else "val"}
    for mode in MODES:
        t = fit_temperature(val[mode], y_val)
        after = temperature_scale(evals[mode], t)
        out["temperature"][mode] = round(t, 4)
        out["ece_before"][mode] = expected_calibration_error(evals[mode], y_eval)
        out["ece_after"][mode] = expected_calibration_error(after, y_eval)
        out["coverage"][mode] = selective_accuracy(after, y_eval)
    return out
