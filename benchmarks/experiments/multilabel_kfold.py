"""Multi-label settings from 5 folds and a refit on train + val, against the former default and the LR (issue 22).

    for seed in 0 1 2; do for c in phosphor-icons-multi mdi-icons-multi; do
        OMP_NUM_THREADS=1 python -m huse.benchmarks.multilabel --catalog data/$c/catalog.csv --name $c-cv5-seed$seed \\
            --work runs/multilabel --out benchmarks/results/cpu-2core/multilabel/kfold \\
            --train-arg=--cv-folds=5 --train-arg=--seed=$seed; done; done
    python benchmarks/experiments/multilabel_kfold.py

Reads each of those runs' benchmark JSON (the shipped refit through the runtime, and the tuned one-vs-rest LR
refitted on the same rows with its weight and thresholds from the same folds) and, for the former default (train
only, weight and thresholds on val), the same seed's `asl-seedN` row of `recipe-NAME.json`: the run's own
held-out model is that model (its image and text test figures are checked equal here), and its fused figures
there are read at val's fusion weight. Writes kfold/summary.json and prints a table of test micro-F1 and mAP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results/cpu-2core/multilabel")
CATALOGS = ("phosphor-icons-multi", "mdi-icons-multi")
SEEDS = (0, 1, 2)


def points(x: dict) -> dict:
    return {"micro_f1": round(100 * x["micro_f1"], 2), "map": round(100 * x["map"], 2)}


def main() -> None:
    summary: dict = {}
    for catalog in CATALOGS:
        recipe = json.loads((RESULTS / f"recipe-{catalog}.json").read_text())
        rows = []
        for seed in SEEDS:
            r = json.loads((RESULTS / "kfold" / f"{catalog}-cv5-seed{seed}.json").read_text())
            former = recipe[f"asl-seed{seed}"]
            held = r["held_out_test"]["huse"]
            for mode in ("image", "text"):  # the run's held-out model is the former default's model
                same = points(held[mode]) == {k: former["test"][mode][k] for k in ("micro_f1", "map")}
                if not same:
                    raise SystemExit(f"{catalog} seed {seed}: the held-out {mode} figures differ from recipe-{catalog}.json")
            rows.append({"seed": seed,
                         "refit": points(r["runtime_test_fused"]["fp32"]),
                         "refit_lr": points(r["run_test"]["baseline"]["fused"]),
                         "former_default": {k: former["test"]["fused"][k] for k in ("micro_f1", "map")},
                         "train_only_lr": {k: recipe["baseline"]["test"]["fused"][k] for k in ("micro_f1", "map")},
                         "epochs": r["shipped"]["epochs"], "image_weight": r["fusion_image_weight"],
                         "precisions": {p: e["message"] for p, e in r["bars"]["precisions"].items()}})
        mean = {key: {m: round(float(np.mean([x[key][m] for x in rows])), 2) for m in ("micro_f1", "map")}
                for key in ("refit", "refit_lr", "former_default", "train_only_lr")}
        summary[catalog] = {"seeds": rows, "mean": mean}
    (RESULTS / "kfold" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| catalog, seed | refit HUSE | LR refitted on the same rows | former default (train only) | LR on train |")
    print("|---|---|---|---|---|")
    for catalog, s in summary.items():
        for x in [*s["seeds"], {"seed": "mean", **s["mean"]}]:
            cells = [f"{x[k]['micro_f1']:.1f} / {x[k]['map']:.1f}" for k in ("refit", "refit_lr", "former_default",
                                                                              "train_only_lr")]
            print(f"| {catalog}, {x['seed']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
