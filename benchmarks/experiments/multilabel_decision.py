"""Why the multi-label model led the one-vs-rest LR by 7.5 points of mAP but 0.3 of micro-F1 (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/experiments/multilabel_decision.py \\
        --catalog data/phosphor-icons-multi/catalog.csv --work runs/multilabel-decision/phosphor-icons-multi
    OMP_NUM_THREADS=1 python benchmarks/experiments/multilabel_decision.py \\
        --catalog data/mdi-icons-multi/catalog.csv --work runs/multilabel-decision/mdi-icons-multi

Trains the default multi-label recipe once (Trainer, as huse-train does; the run's own metrics are not
needed), fits the tuned one-vs-rest logistic regression on the same split and frozen features, and then
scores, for BOTH models on the held-out test products, every decision rule and fusion below with the
thresholds and the fusion weight chosen on val:

- rules: "per-class-5" (the former default: each class its F1-best threshold unless it has fewer than 5
  val items), per-class with a floor of 3 / 10 val *products*, shrinkage of the per-class thresholds to
  the global one (t = (n t_c + k t_g) / (n + k), n the class's val items, k = 10 / 50), "global" (one
  micro-F1-best threshold, the new default) and "top-1" (the best class alone);
- fusion of probabilities (the default) or of logits;
- the baseline's fusion weight fixed at 1/2 (the former baseline) or chosen on val like HUSE's.

How a user could pick the rule without test: 4-fold cross-validation over val *products* (thresholds from
three folds, scored on the fourth). The gap between HUSE and the baseline gets a 95% interval from 2,000
bootstrap resamples of the test products. Writes decision_rules-CATALOG.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", default="data/phosphor-icons-multi/catalog.csv")
    ap.add_argument("--work", required=True, help="Run folder (its probabilities are reused).")
    ap.add_argument("--out", help="default: benchmarks/results/cpu-2core/multilabel/decision_rules-CATALOG.json, CATALOG "
                                   "the catalog's folder name")
    ap.add_argument("--epochs", type=int, help="Smoke runs only: the figures are for the default budget.")
    ap.add_argument("--bootstrap", type=int, default=2000)
    a = ap.parse_args()
    d = probabilities(a.catalog, Path(a.work), a.epochs)
    result = {"catalog": a.catalog, "epochs": a.epochs or "default", **compare(d, a.bootstrap)}
    out = Path(a.out or ROOT / f"benchmarks/results/cpu-2core/multilabel/decision_rules-{Path(a.catalog).parent.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for line in result["table"]:
        print(line)
    print(f"wrote {out}")


def probabilities(catalog: str, work: Path, epochs: int | None) -> dict[str, np.ndarray]:
    """Val and test probabilities of HUSE (default recipe) and of the one-vs-rest LR, product ids, targets."""
    cached = work / "probabilities.npz"
    if cached.is_file():
        return dict(np.load(cached))
    import torch

    from huse.train import multilabel
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    shutil.rmtree(work, ignore_errors=True)
    ds = load_catalog_dataset(catalog)
    # huse-train's defaults (train/cli.py)
    t = Trainer(ds, work, HuseConfig(num_classes=0, text_encoder="auto", arch="compact"), TrainConfig(epochs=epochs, cv_folds=0))
    t.finish = lambda progress=True: {}  # only the restored best model's probabilities are wanted
    t.fit(progress=False)
    splits = {s: t.split[s].numpy() for s in ("val", "test")}
    text = t.text_feats.numpy() if t.text_feats is not None else t.ds.titles
    base, _ = multilabel.ovr_baselines(t.image_feats.numpy(), text, t.y.numpy(), t.product.numpy(),
                                       t.split["train"].numpy(), splits)
    d: dict[str, np.ndarray] = {}
    for s in splits:
        pr = t.predict(s)
        d.update({f"huse_{s}_image": pr["image"], f"huse_{s}_text": pr["text"], f"{s}_y": pr["y"],
                  f"base_{s}_image": base[s]["image"], f"base_{s}_text": base[s]["text"],
                  f"{s}_product": t.product[t.split[s]].numpy()})
    np.savez(cached, **d)
    return d


RULES = ("per-class-5", "per-class-3-products", "per-class-10-products", "shrink-10", "shrink-50", "global", "top-1")


def thresholds(p: np.ndarray, y: np.ndarray, products: np.ndarray, rule: str) -> np.ndarray:
    """(C,) thresholds of one rule from val probabilities, targets and product ids."""
    from huse.train import multilabel

    if rule == "top-1":
        return np.full(y.shape[1], 2.0)  # nothing passes: predict_sets keeps the best class alone
    g = multilabel.tune_thresholds(p, y, products, min_products=10 ** 9)
    own = multilabel.tune_thresholds(p, y, products, min_products=0)
    items = (y > 0).sum(0)
    n_products = np.array([len(np.unique(products[y[:, j] > 0])) for j in range(y.shape[1])])
    if rule == "global":
        return g
    if rule == "per-class-5":
        return np.where(items >= 5, own, g)
    if rule.startswith("per-class-"):
        return np.where(n_products >= int(rule.split("-")[2]), own, g)
    k = float(rule.split("-")[1])  # shrink-k
    return (items * own + k * g) / (items + k)


def fuse(img: np.ndarray, txt: np.ndarray, w: float, how: str) -> np.ndarray:
    if how == "prob":
        return w * img + (1 - w) * txt
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
    return 1 / (1 + np.exp(-(w * logit(img) + (1 - w) * logit(txt))))


def micro_f1(p: np.ndarray, y: np.ndarray, t: np.ndarray) -> float:
    from huse.runtime.labels import predict_sets
    from huse.train.multilabel import set_metrics

    return set_metrics(predict_sets(p, t), y)["micro_f1"]


def best_weight(d: dict, model: str, rule: str, how: str) -> float:
    """The image weight with the best val micro-F1 under this rule and fusion (ties: nearest 1/2)."""
    best = None
    for w in np.round(np.linspace(0, 1, 21), 2):
        p = fuse(d[f"{model}_val_image"], d[f"{model}_val_text"], w, how)
        f = round(micro_f1(p, d["val_y"], thresholds(p, d["val_y"], d["val_product"], rule)), 10)
        if best is None or f > best[0] or (f == best[0] and abs(w - 0.5) < abs(best[1] - 0.5)):
            best = (f, float(w))
    return best[1]


def predictions(d: dict, model: str, rule: str, how: str, w: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Test label sets, test fused probabilities and the val 4-fold-by-product CV micro-F1 of the rule."""
    from huse.runtime.labels import predict_sets

    pv = fuse(d[f"{model}_val_image"], d[f"{model}_val_text"], w, how)
    pt = fuse(d[f"{model}_test_image"], d[f"{model}_test_text"], w, how)
    pred = predict_sets(pt, thresholds(pv, d["val_y"], d["val_product"], rule))
    products = np.unique(d["val_product"])
    np.random.default_rng(0).shuffle(products)
    cv = []
    for k in range(4):
        held = np.isin(d["val_product"], products[k::4])
        t = thresholds(pv[~held], d["val_y"][~held], d["val_product"][~held], rule)
        cv.append(micro_f1(pv[held], d["val_y"][held], t))
    return pred, pt, float(np.mean(cv))


def bootstrap(a: np.ndarray, b: np.ndarray, y: np.ndarray, products: np.ndarray, n: int) -> list[float]:
    """95% interval (points) of micro-F1(a) - micro-F1(b) over resamples of the test products."""
    from huse.train.multilabel import set_metrics

    rng = np.random.default_rng(0)
    rows = [np.flatnonzero(products == p) for p in np.unique(products)]
    diffs = []
    for _ in range(n):
        pick = np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))])
        diffs.append(set_metrics(a[pick], y[pick])["micro_f1"] - set_metrics(b[pick], y[pick])["micro_f1"])
    return [round(100 * float(np.percentile(diffs, q)), 2) for q in (2.5, 97.5)]


def compare(d: dict, n_boot: int) -> dict:
    from huse.train.multilabel import mean_average_precision, set_metrics

    y = d["test_y"]
    rows, table = [], ["| rule | fusion | HUSE w | HUSE test micro-F1 | HUSE mAP | HUSE val-CV | LR w (tuned) | LR micro-F1 "
                       "| LR mAP | LR val-CV | LR w=1/2 micro-F1 | HUSE - LR (tuned w), 95% |", "|" + "---|" * 12]
    for how in ("prob", "logit"):
        for rule in RULES:
            r = {"rule": rule, "fusion": how}
            for model in ("huse", "base"):
                w = best_weight(d, model, rule, how)
                pred, pt, cv = predictions(d, model, rule, how, w)
                r[model] = {"w": w, "micro_f1": set_metrics(pred, y)["micro_f1"], "map": mean_average_precision(pt, y),
                            "val_cv_micro_f1": cv, "pred": pred}
            half, _, _ = predictions(d, "base", rule, how, 0.5)
            r["base_half_micro_f1"] = set_metrics(half, y)["micro_f1"]
            r["gap_points"] = 100 * (r["huse"]["micro_f1"] - r["base"]["micro_f1"])
            r["gap_95"] = bootstrap(r["huse"]["pred"], r["base"]["pred"], y, d["test_product"], n_boot)
            h, b = r["huse"], r["base"]
            table.append(f"| {rule} | {how} | {h['w']:.2f} | {100 * h['micro_f1']:.1f}% | {100 * h['map']:.1f}% | "
                         f"{100 * h['val_cv_micro_f1']:.1f}% | {b['w']:.2f} | {100 * b['micro_f1']:.1f}% | "
                         f"{100 * b['map']:.1f}% | {100 * b['val_cv_micro_f1']:.1f}% | {100 * r['base_half_micro_f1']:.1f}% | "
                         f"{r['gap_points']:+.1f} [{r['gap_95'][0]:+.1f}, {r['gap_95'][1]:+.1f}] |")
            for model in ("huse", "base"):
                del r[model]["pred"]
            rows.append(r)
    text_only = {m: {"micro_f1": set_metrics(predictions(d, m, "global", "prob", 0.0)[0], y)["micro_f1"],
                     "map": mean_average_precision(d[f"{m}_test_text"], y)} for m in ("huse", "base")}
    return {"rows": rows, "text_only_global": text_only, "table": table,
            "test_items": int(len(y)), "test_products": int(len(np.unique(d["test_product"]))),
            "val_products": int(len(np.unique(d["val_product"])))}


if __name__ == "__main__":
    main()
