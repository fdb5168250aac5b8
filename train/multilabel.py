"""Multi-label training: the loss, the distance between sets of class paths, thresholds, metrics
and the one-vs-rest logistic-regression baseline.

A catalog is multi-label when some product lists several class paths (runtime/labels.py). Then:

- classification: one sigmoid per class on the same shared classification layer, trained with the
  asymmetric loss (`asymmetric_loss`; binary cross-entropy with `loss="bce"`) against the product's
  multi-hot target, summed over classes, for each modality;
- semantic graph: the class distance A_ij of two items becomes a distance between their SETS of
  paths, the symmetric mean of nearest distances (`set_distance`):
      D(S, T) = 1/2 (mean_{s in S} min_{t in T} A_st + mean_{t in T} min_{s in S} A_st).
  Why this one: it is exactly A_st when both items have one path, so single-label runs and the
  margin keep their meaning; it is 0 only for equal sets; and it is graded by the hierarchy: two
  products that share one of two categories, or whose other categories are siblings, come out
  closer than products with nothing in common (a Jaccard of label sets would call
  `a<b` and `a<c` as far apart as `a<b` and `z<y`). Gap and instance terms are unchanged;
- thresholds: per mode, the single threshold with the best val micro-F1 (`tune_thresholds`), read
  with the serving rule (none above it: the best class alone). A class takes its own F1-best
  threshold only with at least `MIN_VAL_PRODUCTS` positive val *products*: a product's photos
  share its title and labels, so items are not independent, and on phosphor-icons-multi (64 val
  products, about 7 per class) per-class thresholds cost 5.5 points of test micro-F1 against the
  global one (benchmarks/experiments/multilabel_decision.py);
- fusion: w * sigmoid(image logits) + (1 - w) * sigmoid(text logits), w chosen on val micro-F1,
  for HUSE and for the one-vs-rest baseline alike;
- early stopping: val mAP (threshold-free, so an overconfident model is not penalised for it);
- below KFOLD_MAX_ROWS train + val rows (train/trainer.py), "val" above is the pooled out-of-fold
  predictions of 5 product folds, and the shipped model is refitted on train + val; `ovr_final`
  gives the baseline the same treatment.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from huse.runtime.hierarchy import Hierarchy
from huse.runtime.labels import PATH_SEPARATOR, predict_sets
from huse.train.baselines import one_blas_thread

MODES = ("image", "text", "fused")
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.025), 3)
# A class's own threshold needs this many positive val products (independent units); fewer: the
# mode's global threshold. Per-class thresholds on a handful of products overfit (module docstring).
MIN_VAL_PRODUCTS = 50
CV_FOLDS = 3
C_GRID = (0.01, 0.1, 1.0, 10.0)


def multi_hot(classes: list[str], labels: list[str]) -> np.ndarray:
    """(N, C) float32 targets from `|`-joined class strings (runtime/labels.join_paths)."""
    col = {l: j for j, l in enumerate(labels)}
    y = np.zeros((len(classes), len(labels)), dtype=np.float32)
    for i, c in enumerate(classes):
        for p in c.split(PATH_SEPARATOR):
            y[i, col[p]] = 1.0
    return y


# ----------------------------------------------------------------------------------------
# Loss


HEADS = ("sigmoid", "softmax")
# The sigmoid head's loss. "asl", the asymmetric loss of Ridnik et al. (ICCV 2021) with that paper's
# settings, is the default: a product has 1-4 of 18-38 classes, so plain binary cross-entropy spends
# most of its gradient on negatives that are already easy, and early stopping on val mAP then picks a
# model whose ranking the one-vs-rest LR matches. Measured on both multi-label catalogs against "bce",
# test micro-F1 and mAP (benchmarks/experiments/multilabel_recipe.py; docs/quality.md, "Multi-label").
LOSSES = ("asl", "bce")
ASL_GAMMA_NEG = 4.0  # negatives weighted by p^4: an easy negative (p = 0.1) counts 1e-4 of a hard one
ASL_GAMMA_POS = 0.0  # positives keep their full cross-entropy: they are rare
ASL_CLIP = 0.05  # negatives with p < 0.05 give nothing (the paper's probability shifting)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = ASL_GAMMA_NEG,
                    gamma_pos: float = ASL_GAMMA_POS, clip: float = ASL_CLIP) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021), summed over classes and averaged over items.

    Args:
        logits: (N, C) per-class logits.
        targets: (N, C) multi-hot targets.
        gamma_neg, gamma_pos: focusing exponents of negatives and positives (0, 0, clip 0: binary cross-entropy).
        clip: probability shift of negatives.
    Returns:
        The scalar loss.
    """
    p = logits.sigmoid()
    p_neg = (p - clip).clamp(min=0) if clip else p
    pos = targets * F.logsigmoid(logits) * (1 - p) ** gamma_pos
    neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg ** gamma_neg
    return -(pos + neg).sum(1).mean()


def classification_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, targets: torch.Tensor,
                        head: str = "sigmoid", loss: str = "asl") -> torch.Tensor:
    """The shared layer's per-class sigmoids against the multi-hot target, summed over classes and
    averaged over items, for each modality (the multi-label counterpart of two cross-entropies).

    Args:
        image_logits, text_logits: (N, C) logits of each modality.
        targets: (N, C) multi-hot targets.
        head: "sigmoid", or "softmax": cross-entropy against the multi-hot target divided by its number
            of classes (`loss` does not apply).
        loss: the sigmoid head's loss, "asl" (asymmetric_loss) or "bce" (binary cross-entropy).
    Returns:
        The scalar loss.
    """
    if head == "softmax":
        soft = targets / targets.sum(1, keepdim=True)
        return F.cross_entropy(image_logits, soft) + F.cross_entropy(text_logits, soft)
    if loss == "asl":
        return asymmetric_loss(image_logits, targets) + asymmetric_loss(text_logits, targets)
    c = targets.shape[1]
    return c * (F.binary_cross_entropy_with_logits(image_logits, targets)
                + F.binary_cross_entropy_with_logits(text_logits, targets))


def set_distance(targets: torch.Tensor, class_dist: torch.Tensor) -> torch.Tensor:
    """Distance between the path sets of every pair of items (module docstring).

    Args:
        targets: (N, C) multi-hot label sets, each with at least one class.
        class_dist: (C, C) class distances A in [0, 1].
    Returns:
        (N, N) symmetric distances in [0, 1]; equal to A when every item has one class.
    """
    member = targets > 0
    big = torch.full_like(class_dist, 2.0)
    # nearest[i, t]: distance from class t to the nearest class of item i
    nearest = torch.where(member[:, :, None], class_dist[None], big[None]).amin(dim=1)
    counts = targets.sum(1)
    directed = (nearest @ targets.t()) / counts[None, :]  # [i, j]: mean over j's classes of the nearest of i's
    return 0.5 * (directed + directed.t())


# ----------------------------------------------------------------------------------------
# Thresholds, fusion and metrics


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)


def tune_thresholds(p: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
                    min_products: int = MIN_VAL_PRODUCTS) -> np.ndarray:
    """Thresholds (C,) from val probabilities and targets (module docstring).

    Args:
        p: (N, C) val probabilities.
        y: (N, C) multi-hot val targets.
        groups: (N,) product ids, so that a class's positives are counted in products; None: items.
        min_products: positive products a class needs for its own threshold (0: every class; a huge number: none).
    Returns:
        (C,) float32: the micro-F1-best threshold of THRESHOLD_GRID for every class, except the classes
        with at least `min_products` positive products, which take their own F1-best one.
    """
    yb = y > 0
    # predictions at every grid threshold (T, N, C), with the serving rule: none above, the best class alone
    pred = p[None, :, :] >= THRESHOLD_GRID[:, None, None]
    t_empty, n_empty = np.nonzero(~pred.any(axis=2))
    pred[t_empty, n_empty, p.argmax(axis=1)[n_empty]] = True
    tp = (pred & yb[None]).sum(1)
    fp = (pred & ~yb[None]).sum(1)
    fn = yb.sum(0)[None, :] - tp
    global_t = THRESHOLD_GRID[int(np.argmax(_f1(tp.sum(1), fp.sum(1), fn.sum(1))))]
    per_class = THRESHOLD_GRID[np.argmax(_f1(tp, fp, fn), axis=0)]
    positives = (yb.sum(0) if groups is None
                 else np.array([len(np.unique(groups[yb[:, j]])) for j in range(y.shape[1])]))
    return np.where(positives >= min_products, per_class, global_t).astype(np.float32)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Average precision of one class: the mean of the precision at each positive's rank."""
    order = np.argsort(-scores, kind="stable")
    t = truth[order].astype(bool)
    if not t.any():
        return float("nan")
    hits = np.cumsum(t)
    return float((hits[t] / (np.flatnonzero(t) + 1)).mean())


def mean_average_precision(p: np.ndarray, y: np.ndarray) -> float:
    """mAP over the classes with at least one positive."""
    aps = [average_precision(p[:, j], y[:, j]) for j in range(y.shape[1]) if y[:, j].any()]
    return float(np.mean(aps)) if aps else float("nan")


def set_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """micro-F1, macro-F1 (over classes present in truth or prediction), subset accuracy and mean Jaccard."""
    yb, pb = y > 0, pred.astype(bool)
    tp, fp, fn = (pb & yb).sum(0), (pb & ~yb).sum(0), (~pb & yb).sum(0)
    present = (tp + fp + fn) > 0
    inter, union = (pb & yb).sum(1), (pb | yb).sum(1)
    return {"micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
            "macro_f1": float(_f1(tp, fp, fn)[present].mean()) if present.any() else 0.0,
            "subset_accuracy": float((pb == yb).all(1).mean()),
            "jaccard": float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))}


def level_sets(mask: np.ndarray, hierarchy: Hierarchy, level: int) -> np.ndarray:
    """Leaf sets (N, C) -> the sets of their level-`level` nodes (N, nodes)."""
    return hierarchy.level_probs(mask.astype(np.float32), level) > 0


def multilabel_report(p: np.ndarray, y: np.ndarray, thresholds: np.ndarray, hierarchy: Hierarchy) -> dict[str, Any]:
    """Every multi-label figure of one split and mode: set metrics at `thresholds`, mAP, per-level F1."""
    pred = predict_sets(p, thresholds)
    report: dict[str, Any] = {**set_metrics(pred, y), "map": mean_average_precision(p, y), "levels": {}}
    for k in range(1, hierarchy.depth + 1):
        report["levels"][str(k)] = set_metrics(level_sets(pred, hierarchy, k), level_sets(y > 0, hierarchy, k))["micro_f1"]
    return report


def fused_micro_f1(p: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Val micro-F1 after tuning thresholds on the same val items (what the fusion weight is chosen by)."""
    return set_metrics(predict_sets(p, tune_thresholds(p, y, groups)), y)["micro_f1"]


def best_fusion_weight(p_img: np.ndarray, p_txt: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> float:
    """The image weight in [0, 1] (step 0.05) with the best val micro-F1; ties go to 0.5."""
    grid = np.round(np.linspace(0, 1, 21), 2)
    f1 = [round(fused_micro_f1(w * p_img + (1 - w) * p_txt, y, groups), 10) for w in grid]
    best = max(f1)
    return float(min((w for w, f in zip(grid, f1) if f == best), key=lambda w: abs(w - 0.5)))


def evaluate(val: dict[str, np.ndarray], test: dict[str, np.ndarray] | None, hierarchy: Hierarchy,
             groups: np.ndarray | None = None) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Thresholds tuned on val per mode, and the report of each split and mode.

    Args:
        val, test: {"image", "text", "fused": (n, C) probabilities, "y": (n, C) multi-hot}; test may be None.
        hierarchy: the class tree (per-level F1).
        groups: val product ids (tune_thresholds counts positives in products); None: items.
    Returns:
        ({mode: thresholds}, {split: {mode: report}}).
    """
    thresholds = {m: tune_thresholds(val[m], val["y"], groups) for m in MODES}
    reports = {name: {m: multilabel_report(pr[m], pr["y"], thresholds[m], hierarchy) for m in MODES}
               for name, pr in (("val", val), ("test", test)) if pr is not None}
    return {m: [round(float(t), 4) for t in thr] for m, thr in thresholds.items()}, reports


def verdict(metrics: dict[str, Any]) -> dict[str, Any]:
    """Where HUSE's val micro-F1 is below the one-vs-rest baseline's, with the figures."""
    worse = {m: {"huse": metrics["val"][m]["micro_f1"], "baseline": metrics["baseline"]["val"][m]["micro_f1"]}
             for m in MODES if metrics["val"][m]["micro_f1"] < metrics["baseline"]["val"][m]["micro_f1"]}
    return {"huse_beats_baseline_on_val": not worse, "worse_modes": worse, "metric": "micro_f1"}


# ----------------------------------------------------------------------------------------
# Baseline: one-vs-rest logistic regression, C chosen by cross-validation grouped by product


def _fit_ovr(x, y: np.ndarray, c: float, start: np.ndarray | None = None) -> np.ndarray:
    """Weights (F + 1, C) of one L2-regularised logistic regression per class, all with the same C.

    The objective of scikit-learn's LogisticRegression (C * sum of log losses + ||w||^2 / 2, intercept
    not penalised) summed over classes, which are independent, minimised in one L-BFGS run: one pass
    over X per step serves every class, where scikit-learn's one-vs-rest would fit each class alone.
    """
    from scipy.optimize import minimize
    from scipy.special import expit

    n, f, k = x.shape[0], x.shape[1], y.shape[1]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # divided by C * n, as scikit-learn does, so that its stopping tolerance means the same here
        w, b = theta[:f * k].reshape(f, k), theta[f * k:]
        z = x @ w + b
        r = (expit(z) - y) / n
        value = float(np.sum(np.logaddexp(0.0, z) - y * z)) / n + 0.5 * float(np.sum(w * w)) / (c * n)
        return value, np.concatenate([(np.asarray(x.T @ r) + w / (c * n)).ravel(), r.sum(0)])

    theta = np.zeros(f * k + k) if start is None else start.ravel()
    res = minimize(loss, theta, jac=True, method="L-BFGS-B",
                   options={"maxiter": 1000, "gtol": 1e-5, "ftol": 64 * np.finfo(float).eps})
    return res.x.reshape(f + 1, k)


def _ovr_predict(x, theta: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x @ theta[:-1] + theta[-1]).astype(np.float32)


def ovr_fit(x_train, y_train: np.ndarray, groups: np.ndarray, x_eval: list) -> tuple[list[np.ndarray], dict[str, Any]]:
    """One logistic regression per class, C from `C_GRID` chosen by mAP over `CV_FOLDS` folds grouped by
    product (a product's photos never sit on both sides of a fold, as in the real split).

    Returns:
        (probabilities (n, C) for each of `x_eval`, {"C": chosen, "cv_map": {C: mean mAP}}).
    """
    from sklearn.model_selection import GroupKFold

    y = y_train.astype(np.float64)
    folds = list(GroupKFold(n_splits=min(CV_FOLDS, len(np.unique(groups)))).split(x_train, y, groups))
    scores: dict[str, float] = {}
    starts: list[np.ndarray | None] = [None] * len(folds)
    for c in sorted(C_GRID):  # small C first: each fold's fit warm-starts the next C's
        maps = []
        for k, (tr, te) in enumerate(folds):
            starts[k] = _fit_ovr(x_train[tr], y[tr], c, starts[k])
            maps.append(mean_average_precision(_ovr_predict(x_train[te], starts[k]), y[te]))
        scores[str(c)] = float(np.nanmean(maps))
    best = max(C_GRID, key=lambda c: scores[str(c)])
    theta = _fit_ovr(x_train, y, best)
    return [_ovr_predict(x, theta) for x in x_eval], {"C": best, "cv_map": scores}


@one_blas_thread
def ovr_baselines(image_feats: np.ndarray, text, y: np.ndarray, groups: np.ndarray, train: np.ndarray,
                  evals: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Probabilities of the tuned one-vs-rest logistic regressions on each evaluation split.

    Args:
        image_feats: (N, F) frozen image features of every item.
        text: (N, T) frozen text features, or the N titles (TF-IDF, as the single-label baseline).
        y: (N, C) multi-hot targets.
        groups: (N,) product ids (the CV grouping).
        train: indices to fit on; evals: split name -> indices.
    Returns:
        ({split: {"image", "text", "fused"}}, {"C": {mode: C}, "cv_map": {mode: {C: mean mAP}},
        "fusion_image_weight": w, ...}). The fused probabilities weigh image and text by w chosen on val
        micro-F1 exactly as HUSE's (`best_fusion_weight`): a fixed 1/2 would handicap the baseline
        wherever one modality is weak, as the single-label baseline's tuned weight does not.
    """
    from huse.train.baselines import baseline_features

    feats = baseline_features(image_feats, text, train, evals)
    img, txt = feats["image"], feats["text"]
    info: dict[str, Any] = {"C": {}, "cv_map": {}, "folds": CV_FOLDS, "grouped_by": "product"}
    probs = {}
    for mode, x in (("image", img), ("text", txt)):
        probs[mode], chosen = ovr_fit(x[0], y[train], groups[train], x[1:])
        info["C"][mode], info["cv_map"][mode] = chosen["C"], chosen["cv_map"]
    out = {s: {"image": pi, "text": pt} for s, pi, pt in zip(evals, probs["image"], probs["text"])}
    w = (best_fusion_weight(out["val"]["image"], out["val"]["text"], y[evals["val"]], groups[evals["val"]])
         if "val" in out else 0.5)
    info["fusion_image_weight"] = w
    for pr in out.values():
        pr["fused"] = w * pr["image"] + (1 - w) * pr["text"]
    return out, info


@one_blas_thread
def ovr_final(image_feats: np.ndarray, text, y: np.ndarray, groups: np.ndarray, rows: np.ndarray, folds: list,
              test: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tuned one-vs-rest baseline fitted on `rows` (train + val), as a refitted HUSE is: the LR a careful
    user would ship on the same rows.

    C per mode by `ovr_fit`'s product-grouped CV on `rows`; the fusion weight and the thresholds on the
    out-of-fold predictions over `folds` (the same product folds HUSE's cross-validation used, positions
    into `rows`), chosen exactly as HUSE's are; then every row refitted and `test` predicted.

    Returns:
        ({"image", "text", "fused": (n_test, C) probabilities}, {"C", "fusion_image_weight", "thresholds"}).
    """
    from huse.train.baselines import baseline_features

    feats = baseline_features(image_feats, text, rows, {"test": test})
    yr, gr = y[rows].astype(np.float64), groups[rows]
    order = np.concatenate([held for _, held in folds])
    probs: dict[str, np.ndarray] = {}
    oof: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"C": {}, "folds": len(folds), "grouped_by": "product"}
    for mode in ("image", "text"):
        x, x_test = feats[mode]
        (probs[mode],), chosen = ovr_fit(x, yr, gr, [x_test])
        c = info["C"][mode] = chosen["C"]
        oof[mode] = np.concatenate([_ovr_predict(x[held], _fit_ovr(x[fit], yr[fit], c)) for fit, held in folds])
    y_oof, g_oof = yr[order], gr[order]
    w = best_fusion_weight(oof["image"], oof["text"], y_oof, g_oof)
    oof["fused"], probs["fused"] = (w * p["image"] + (1 - w) * p["text"] for p in (oof, probs))
    thresholds = {m: tune_thresholds(oof[m], y_oof, g_oof) for m in MODES}
    return probs, {**info, "fusion_image_weight": w, "thresholds": thresholds}


def format_table(metrics: dict[str, Any]) -> list[str]:
    """The printed table of a multi-label run: HUSE beside the one-vs-rest baseline, per split and mode."""
    lines = [f"{'split':5} {'mode':6} {'micro-F1':>8} {'baseline':>8} {'macro-F1':>8} {'mAP':>6} {'base mAP':>8} "
             f"{'subset':>6}  per-level F1", "-" * 84]
    for split in ("val", "test"):
        for mode, r in metrics.get(split, {}).items():
            b = metrics["baseline"][split][mode]
            levels = " ".join(f"L{k}={v:.3f}" for k, v in r["levels"].items())
            lines.append(f"{split:5} {mode:6} {r['micro_f1']:8.4f} {b['micro_f1']:8.4f} {r['macro_f1']:8.4f} "
                         f"{r['map']:6.4f} {b['map']:8.4f} {r['subset_accuracy']:6.4f}  {levels}")
    return lines

