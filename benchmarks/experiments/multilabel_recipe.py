"""What limits the multi-label model's ranking (mAP) and micro-F1 against the tuned one-vs-rest LR (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/experiments/multilabel_recipe.py \\
        --catalog data/phosphor-icons-multi/catalog.csv --work runs/recipe/phosphor \\
        --variant default --variant asl --variant focal --seed 0 --seed 1 --seed 2
    OMP_NUM_THREADS=1 python benchmarks/experiments/multilabel_recipe.py \\
        --catalog data/phosphor-icons-multi/catalog.csv --work runs/recipe/phosphor \\
        --variant stop-text-map --variant stop-fused-map --variant logit-fusion --variant smooth-0.1 \\
        --variant posw-0.5 --variant cls-only --variant no-gap --variant no-instance --variant scale-fixed-10
    (the first also with --catalog data/mdi-icons-multi/catalog.csv --work runs/recipe/mdi; --list names the
    variants; about 1-2 minutes a training on one thread, plus one LR fit of about 5 minutes per catalog)

Each variant is the recipe as it was before the asymmetric loss, "default" (Trainer as huse-train runs
it, with binary cross-entropy), with ONE thing changed: the classification loss ("asl", huse-train's
default now; focal, label smoothing, positive-class weights), the other loss
terms' weights, the shared layer's logit scale, the fusion of logits instead of probabilities, or the
early-stopping criterion. The one-vs-rest LR is fitted once per catalog on the same split and frozen
features (probabilities cached). Every variant is read exactly as a run reads itself: the fusion
weight and the thresholds chosen on val (multilabel.best_fusion_weight, multilabel.evaluate), then
val and test micro-F1 and mAP, fused, image and text, beside the LR's. Probabilities of each variant
are kept in WORK/VARIANT-seedS/probabilities.npz, so re-reading costs nothing.

A variant becomes the default only if its mean over seeds helps on the held-out test products of both
catalogs; val figures are reported beside (thresholds and the fusion weight are fitted on val, so its
micro-F1 flatters the model they fit closest). Writes WORK/recipe.json (every variant run so far) and
benchmarks/results/cpu-2core/multilabel/recipe-CATALOG.json with a per-variant summary over seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

def _asl(gamma_neg: float, gamma_pos: float, clip: float):
    """The asymmetric loss with other settings than the shipped ones (multilabel.asymmetric_loss)."""
    import huse.train.multilabel as multilabel

    return lambda logits, y: multilabel.asymmetric_loss(logits, y, gamma_neg, gamma_pos, clip)


def _focal(gamma: float = 2.0):
    return _asl(gamma, gamma, 0.0)


def _smooth(eps: float = 0.1):
    import torch.nn.functional as F

    def loss(logits, y):
        t = y * (1 - eps) + (1 - y) * eps
        return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / len(y)
    return loss


def _asl_smooth(eps: float = 0.1):
    """The shipped asymmetric loss against targets smoothed as _smooth smooths them.

    asymmetric_loss is linear in its targets (t * positive term + (1 - t) * negative term), so a soft
    target weighs both terms: each negative also pulls its probability up with weight eps, and each
    positive is pushed down by the focused, clipped negative term with weight eps.
    """
    import huse.train.multilabel as multilabel

    return lambda logits, y: multilabel.asymmetric_loss(logits, y * (1 - eps) + (1 - y) * eps)


def _pos_weight(power: float = 0.5):
    """BCE with positives of class c weighted by (negatives / positives)^power over the whole training split."""
    import torch.nn.functional as F

    state = {}

    def loss(logits, y):
        w = state["w"].to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=w, reduction="sum") / len(y)
    return loss, state


def _patch_loss(per_modality, trainer=None, state=None):
    """Replace multilabel.classification_loss by per_modality(image) + per_modality(text)."""
    import huse.train.multilabel as multilabel

    if state is not None:
        y = trainer.y[trainer.split["train"]].float()
        pos = y.sum(0).clamp(min=1)
        state["w"] = ((len(y) - pos) / pos) ** state["power"]
    multilabel.classification_loss = lambda il, tl, t, *args: per_modality(il, t) + per_modality(tl, t)


# "default" is the recipe before the asymmetric loss (binary cross-entropy); every variant but "asl" and
# those that set their own loss trains with it, so that each changes one thing against it.
VARIANTS = {
    "default": {},
    "asl": {"label_loss": "asl"},  # the shipped default now: the ASL paper's gamma- 4, gamma+ 0, clip 0.05
    "asl-2": {"loss": lambda: _asl(2.0, 0.0, 0.05)},
    "focal": {"loss": lambda: _focal(2.0)},
    "smooth-0.1": {"loss": lambda: _smooth(0.1)},
    "posw-0.5": {"pos_weight": 0.5},
    "posw-1": {"pos_weight": 1.0},
    "no-graph": {"tc": {"beta": 0.0}},
    "graph-3": {"tc": {"beta": 3.0}},
    "no-instance": {"tc": {"delta": 0.0}},
    "no-gap": {"tc": {"gamma": 0.0}},
    "cls-only": {"tc": {"beta": 0.0, "gamma": 0.0, "delta": 0.0}},
    "alpha-3": {"tc": {"alpha": 3.0}},
    "scale-fixed-10": {"scale": ("fixed", 10.0)},
    "scale-init-30": {"scale": ("init", 30.0)},
    "wd-0.5": {"tc": {"weight_decay": 0.5}},
    "stop-fused-map": {"stop": "fused"},
    "stop-text-map": {"stop": "text"},
    "stop-loss": {"stop": "loss"},
    "logit-fusion": {"fusion": "logit", "reuse": "default"},  # the default's probabilities, fused as logits
    "softmax": {"head": "softmax"},
    "asl-no-instance": {"label_loss": "asl", "tc": {"delta": 0.0}},  # the shipped loss without the instance term
    # the shipped loss with label smoothing (smooth-0.1 on BCE reached a higher phosphor mAP, one seed)
    "asl-smooth-0.1": {"label_loss": "asl", "loss": lambda: _asl_smooth(0.1)},
    "asl-smooth-0.05": {"label_loss": "asl", "loss": lambda: _asl_smooth(0.05)},
}


def train_variant(catalog: str, work: Path, name: str, seed: int) -> dict[str, np.ndarray]:
    """Val and test probabilities (image, text) of one variant and seed, with targets and product ids."""
    out = work / f"{name}-seed{seed}"
    cached = out / "probabilities.npz"
    if cached.is_file():
        return dict(np.load(cached))
    import math

    import torch

    import huse.train.multilabel as multilabel
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    v = VARIANTS[name]
    original_loss, original_map = multilabel.classification_loss, multilabel.mean_average_precision
    shutil.rmtree(out, ignore_errors=True)
    ds = load_catalog_dataset(catalog, seed=seed)
    mc = HuseConfig(num_classes=0, text_encoder="auto", arch="compact", label_head=v.get("head", "sigmoid"),
                    label_loss=v.get("label_loss", "bce"))
    t = Trainer(ds, out, mc, TrainConfig(seed=seed, **{"cv_folds": 0, **v.get("tc", {})}), cache=work / "cache")
    try:
        if "loss" in v:
            _patch_loss(v["loss"]())
        if "pos_weight" in v:
            fn, state = _pos_weight()
            state["power"] = v["pos_weight"]
            _patch_loss(fn, t, state)
        if "scale" in v:
            kind, value = v["scale"]
            with torch.no_grad():
                t.model.classifier.log_scale.fill_(math.log(value))
            if kind == "fixed":
                t.model.classifier.log_scale.requires_grad_(False)
                t.optimizer = torch.optim.AdamW([p for p in t.model.parameters() if p.requires_grad],
                                                lr=t.tc.lr, weight_decay=t.tc.weight_decay)
        if "stop" in v:
            _patch_stop(t, v["stop"])
        t.finish = lambda progress=True: {}
        t.fit(progress=False)
    finally:
        multilabel.classification_loss, multilabel.mean_average_precision = original_loss, original_map
    d: dict[str, np.ndarray] = {"best_epoch": np.array(t.best["epoch"]), "epochs_run": np.array(t.epoch)}
    for s in ("val", "test"):
        pr = t.predict(s)
        d.update({f"{s}_image": pr["image"], f"{s}_text": pr["text"], f"{s}_y": pr["y"],
                  f"{s}_product": t.product[t.split[s]].numpy()})
    if name == "default" and seed == 0:  # the LR on the same split and frozen features, once per catalog
        splits = {s: t.split[s].numpy() for s in ("val", "test")}
        text = t.text_feats.numpy() if t.text_feats is not None else t.ds.titles
        base, info = multilabel.ovr_baselines(t.image_feats.numpy(), text, t.y.numpy(), t.product.numpy(),
                                              t.split["train"].numpy(), splits)
        np.savez(work / "baseline.npz", **{f"{s}_{m}": base[s][m] for s in splits for m in ("image", "text")})
    np.savez(cached, **d)
    return d


def _patch_stop(t, how: str) -> None:
    """Early stopping on val fused mAP (best weight), text mAP alone, or the val classification loss."""
    import huse.train.multilabel as multilabel

    predict = t.predict

    def score(val):
        if how == "text":
            return 1.0 - multilabel.mean_average_precision(val["text"], val["y"])
        if how == "fused":
            return 1.0 - max(multilabel.mean_average_precision(w * val["image"] + (1 - w) * val["text"], val["y"])
                             for w in np.linspace(0, 1, 11))
        p = {m: np.clip(val[m], 1e-6, 1 - 1e-6) for m in ("image", "text")}
        return float(sum(-(val["y"] * np.log(p[m]) + (1 - val["y"]) * np.log(1 - p[m])).sum(1).mean() for m in p))

    # _train reads 2 - (image mAP + text mAP); give it the chosen criterion in the same place
    original_map = multilabel.mean_average_precision
    state = {}

    def predict_hook(split):
        pr = predict(split)
        if split == "val":
            state["score"], state["calls"] = score(pr), 0
        return pr

    def map_hook(p, y):
        if "score" in state and state["calls"] < 2:
            state["calls"] += 1
            return 1.0 - state["score"] / 2  # two calls sum to 2 - score: val_loss = score
        return original_map(p, y)

    t.predict = predict_hook
    multilabel.mean_average_precision = map_hook  # train_variant puts it back


def read(d: dict[str, np.ndarray], fusion: str = "prob") -> dict:
    """A variant read as a run reads itself: fusion weight and thresholds on val; figures per split and mode."""
    import huse.train.multilabel as multilabel
    from huse.runtime.hierarchy import Hierarchy

    n = d["val_y"].shape[1]
    hierarchy = Hierarchy([f"c{j}" for j in range(n)])
    if fusion == "logit":
        to = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
        back = lambda z: 1 / (1 + np.exp(-z))
        for s in ("val", "test"):
            d = {**d, f"{s}_image_logit": to(d[f"{s}_image"]), f"{s}_text_logit": to(d[f"{s}_text"])}
        grid = np.round(np.linspace(0, 1, 21), 2)
        f1 = [round(multilabel.fused_micro_f1(back(w * d["val_image_logit"] + (1 - w) * d["val_text_logit"]),
                                              d["val_y"], d["val_product"]), 10) for w in grid]
        w = float(min((g for g, f in zip(grid, f1) if f == max(f1)), key=lambda g: abs(g - 0.5)))
        fuse = lambda s: back(w * d[f"{s}_image_logit"] + (1 - w) * d[f"{s}_text_logit"])
    else:
        w = multilabel.best_fusion_weight(d["val_image"], d["val_text"], d["val_y"], d["val_product"])
        fuse = lambda s: w * d[f"{s}_image"] + (1 - w) * d[f"{s}_text"]
    splits = {s: {"image": d[f"{s}_image"], "text": d[f"{s}_text"], "fused": fuse(s), "y": d[f"{s}_y"]}
              for s in ("val", "test")}
    _, reports = multilabel.evaluate(splits["val"], splits["test"], hierarchy, d["val_product"])
    return {"w": w, **{s: {m: {k: round(100 * reports[s][m][k], 2) for k in ("micro_f1", "map", "macro_f1")}
                           for m in ("image", "text", "fused")} for s in reports}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", default="data/phosphor-icons-multi/catalog.csv")
    ap.add_argument("--work", help="Runs, cached probabilities and the LR's (reused).")
    ap.add_argument("--variant", action="append", default=[], help=f"one of {list(VARIANTS)} (repeatable)")
    ap.add_argument("--seed", type=int, action="append", default=[])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", help="default: benchmarks/results/cpu-2core/multilabel/recipe-CATALOG.json, CATALOG the "
                                   "catalog's folder name")
    a = ap.parse_args()
    if a.list:
        print("\n".join(VARIANTS))
        return
    if not a.work:
        ap.error("--work is required")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train_variant(a.catalog, work, "default", 0)  # also fits the LR
    base_d = dict(np.load(work / "baseline.npz"))
    ref = dict(np.load(work / "default-seed0" / "probabilities.npz"))
    base = read({**ref, **base_d})
    results_path = work / "recipe.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["baseline"] = base
    for name in a.variant or ["default"]:
        for seed in a.seed or [0]:
            d = train_variant(a.catalog, work, VARIANTS[name].get("reuse", name), seed)
            r = read(d, VARIANTS[name].get("fusion", "prob"))
            r.update(best_epoch=int(d["best_epoch"]), epochs_run=int(d["epochs_run"]))
            results[f"{name}-seed{seed}"] = r
            results_path.write_text(json.dumps(results, indent=2))
            print(line(f"{name}-seed{seed}", r, base), flush=True)
    print(line("LR (tuned)", base, base))
    results["summary"] = summary(results)
    for name, x in results["summary"].items():
        print(f"{name:16} seeds {x['seeds']}: test fused micro-F1 {x['micro_f1']['mean']:.1f} "
              f"({x['micro_f1']['min']:.1f}-{x['micro_f1']['max']:.1f}), mAP {x['map']['mean']:.1f} "
              f"({x['map']['min']:.1f}-{x['map']['max']:.1f}); minus the LR: {x['micro_f1_vs_lr']:+.1f} / {x['map_vs_lr']:+.1f}")
    results_path.write_text(json.dumps(results, indent=2))
    out = Path(a.out or ROOT / f"benchmarks/results/cpu-2core/multilabel/recipe-{Path(a.catalog).parent.name}.json")
    out.write_text(json.dumps({"catalog": a.catalog, **results}, indent=2))
    print(f"wrote {out}")


def summary(results: dict) -> dict:
    """Per variant: test fused micro-F1 and mAP over the seeds run (mean, min, max) and the mean minus the LR's."""
    by: dict[str, list[dict]] = {}
    for key, r in results.items():
        if "-seed" in key:
            by.setdefault(key.rsplit("-seed", 1)[0], []).append(r)
    out = {}
    for name, rs in by.items():
        x = {"seeds": len(rs)}
        for k in ("micro_f1", "map"):
            v = [r["test"]["fused"][k] for r in rs]
            x[k] = {"mean": round(float(np.mean(v)), 2), "min": min(v), "max": max(v)}
            x[f"{k}_vs_lr"] = round(x[k]["mean"] - results["baseline"]["test"]["fused"][k], 2)
        out[name] = x
    return out


def line(name: str, r: dict, base: dict) -> str:
    f = lambda s, m, k: r[s][m][k]
    dlt = lambda s, k: r[s]["fused"][k] - base[s]["fused"][k]
    return (f"{name:22} w={r['w']:.2f} ep={r.get('best_epoch', '-')!s:>3}  val F1 {f('val', 'fused', 'micro_f1'):5.1f} "
            f"mAP {f('val', 'fused', 'map'):5.1f} | test F1 {f('test', 'fused', 'micro_f1'):5.1f} ({dlt('test', 'micro_f1'):+.1f}) "
            f"mAP {f('test', 'fused', 'map'):5.1f} ({dlt('test', 'map'):+.1f}) | text mAP val {f('val', 'text', 'map'):5.1f} "
            f"test {f('test', 'text', 'map'):5.1f} | image mAP test {f('test', 'image', 'map'):5.1f}")


if __name__ == "__main__":
    main()
