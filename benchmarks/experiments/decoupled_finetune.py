"""Would a fine-tuned image side help the fused answer if it kept its own stopping point? (issue 19, item 4)

`huse-train --fine-tune` trains the image backbone with both towers and stops once, on the sum of both
val losses: on the small catalogs that epoch suits the image side and the text tower has slipped by then,
so the fused answer loses to the frozen recipe. This asks what the decoupled model would score before
building it: the image probabilities of a `--fine-tune` run fused with the text probabilities of the
frozen default run (its text tower stopped at its own epoch), the image weight chosen on val by the rule
training uses (`baselines.best_weight`: best fused top-1, step 0.05), top-1 on the held-out test products.
An upper bound of sorts for the two-stage recipe, and no more: here the two sides are two separate
models, with no shared layer or gap term between them. Both runs trained on train only (`--cv-folds 0`);
the tuned LR (fitted on train, C by 5-fold cross-validation by product) is read from the frozen run's
metrics.json. Probabilities come from fp32 bundles through the runtime, at temperature 1 as training fuses
them.

    for c in phosphor-icons tabler-icons mdi-icons; do huse-train --data data/$c/catalog.csv --out runs/def-$c \
        --cv-folds 0; done                                         # ~2 min each
    (and runs/ft-*: huse-train --data ... --out runs/ft-... --fine-tune --cv-folds 0, 15-45 min each)
    huse-export runs/RUN --out bundles/x-RUN                       # each of the six runs
    python benchmarks/experiments/decoupled_finetune.py \
        --catalog phosphor-icons=data/phosphor-icons/catalog.csv:runs/def-phosphor-icons:bundles/x-def-phosphor-icons:bundles/x-ft-phos \
        --catalog ... --out benchmarks/results/cpu-2core/quality/decoupled_finetune.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from huse.runtime import Classifier
from huse.runtime.catalog import read_catalog
from huse.train.baselines import best_weight


def probabilities(bundle: str, images: list, titles: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The bundle's labels and its image, text and fused probabilities at temperature 1."""
    clf = Classifier(bundle, backend="onnxruntime")
    clf.temperature = {}  # training fuses and chooses weights on uncalibrated probabilities
    return clf.labels, {"image": clf.predict_proba(images=images), "text": clf.predict_proba(titles=titles),
                        "fused": clf.predict_proba(images=images, titles=titles)}


def top1(p: np.ndarray, y: np.ndarray) -> float:
    return round(float((p.argmax(1) == y).mean()), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", action="append", required=True, metavar="NAME=CSV:FROZEN_RUN:FROZEN_BUNDLE:FINETUNED_BUNDLE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    results = {}
    for spec in args.catalog:
        name, rest = spec.split("=", 1)
        csv, run, frozen, tuned = rest.split(":")
        recs = [r for r in read_catalog(csv) if r.split in ("val", "test")]
        split = np.array([r.split for r in recs])
        images, titles = [r.image for r in recs], [r.name for r in recs]
        labels, pf = probabilities(frozen, images, titles)
        labels_t, pt = probabilities(tuned, images, titles)
        assert labels == labels_t, "the two bundles must share their classes"
        y = np.array([labels.index(r.classes) for r in recs])
        v, t = split == "val", split == "test"
        w, val_top1 = best_weight(pt["image"][v], pf["text"][v], y[v])
        decoupled = w * pt["image"] + (1 - w) * pf["text"]
        lr = json.loads((Path(run) / "metrics.json").read_text())["baseline"]["test"]
        results[name] = {
            "tuned_lr": {m: round(lr[m]["top1"], 4) for m in lr},
            "frozen": {m: top1(pf[m][t], y[t]) for m in pf},
            "fine_tuned": {m: top1(pt[m][t], y[t]) for m in pt},
            "decoupled": {"image_weight": w, "val_top1": round(val_top1, 4), "test_top1": top1(decoupled[t], y[t])},
            "test_items": int(t.sum()), "val_items": int(v.sum()),
        }
        print(name, json.dumps(results[name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
