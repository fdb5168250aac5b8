"""Label smoothing and the shared layer's starting logit scale (issue 19, item 4): do they lift small catalogs?

    python benchmarks/experiments/label_smoothing.py --catalog phosphor-icons=data/phosphor-icons/catalog.csv \
        --catalog tabler-icons=data/tabler-icons/catalog.csv --catalog mdi-icons=data/mdi-icons/catalog.csv \
        --variant 0,10 --variant 0.1,10 --variant 0,5 --variant 0,30 --work runs/label-smoothing \
        --out benchmarks/results/cpu-2core/quality/label_smoothing.json

A one-off experiment kept outside the installed package. Each run is `huse-train --cv-folds 0` (one model, trained
on train, its epoch and fusion weight chosen on val: the held-out model of the README's quality table) with
`F.cross_entropy(..., label_smoothing=S)` patched into `huse.train.losses.classification_loss` for both modalities
and the shared layer's learned logit scale starting at SCALE instead of 10 (`--variant S,SCALE`; 0,10 is the
default recipe), one thread each, two runs at a time. It writes each run's test top-1 per mode beside the tuned
LR's, and the logit scale the chosen epoch ended with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

PATCHED_TRAIN = """
import math, sys
import torch
import torch.nn.functional as F
import huse.train.losses as L
import huse.train.model as M
S, SCALE = float(sys.argv[1]), float(sys.argv[2])
def classification_loss(image_logits, text_logits, labels):
    return (F.cross_entropy(image_logits, labels, label_smoothing=S)
            + F.cross_entropy(text_logits, labels, label_smoothing=S))
L.classification_loss = classification_loss
init = M.SharedClassifier.__init__
def patched_init(self, dim, num_classes):
    init(self, dim, num_classes)
    self.log_scale.data.fill_(math.log(SCALE))
M.SharedClassifier.__init__ = patched_init
from huse.runtime.cli import train_main
sys.argv = ["huse-train", *sys.argv[3:]]
train_main()
"""


def _run(name: str, catalog: str, s: float, scale: float, work: Path) -> dict:
    tag = f"{name}-ls{s:g}" + ("" if scale == 10 else f"-scale{scale:g}")
    out = work / tag
    if not (out / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(work / f"{tag}.log", "w") as log:
            subprocess.run([sys.executable, "-c", PATCHED_TRAIN, str(s), str(scale), "--data", catalog, "--out",
                            str(out), "--cv-folds", "0"], env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    m = json.loads((out / "metrics.json").read_text())
    from safetensors.numpy import load_file

    log_scale = [v for k, v in load_file(str(out / "model.safetensors")).items() if k.endswith("log_scale")]
    return {"catalog": name, "smoothing": s, "start_scale": scale,
            "test_top1": {mode: m["test"][mode]["top1"] for mode in ("fused", "image", "text")},
            "tuned_lr_test_top1": {mode: m["baseline"]["test"][mode]["top1"] for mode in ("fused", "image", "text")},
            "best_epoch": m.get("best_epoch"), "fusion_image_weight": m.get("fusion_image_weight"),
            "scale_at_best_epoch": float(np.exp(log_scale[0])) if log_scale else None}


@click.command()
@click.option("--catalog", "catalogs", multiple=True, required=True, help="NAME=catalog.csv (repeatable).")
@click.option("--variant", "variants", multiple=True, default=("0,10", "0.1,10"), show_default=True,
              help="SMOOTHING,START_SCALE (repeatable); 0,10 is the default recipe.")
@click.option("--work", type=click.Path(file_okay=False), required=True, help="Where the runs go (reused).")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def main(catalogs, variants, work, out) -> None:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(float(x) for x in v.split(",")) for v in variants]
    jobs = [(n, c, s, scale) for n, c in (x.split("=", 1) for x in catalogs) for s, scale in pairs]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda j: _run(*j, work), jobs))
    Path(out).write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    for r in rows:
        t = r["test_top1"]
        click.echo(f"{r['catalog']:16} smoothing {r['smoothing']:<4g} start scale {r['start_scale']:<3g} test top-1 "
                   f"fused {100 * t['fused']:.1f} image {100 * t['image']:.1f} text {100 * t['text']:.1f} "
                   f"(scale then {r['scale_at_best_epoch']:.2f})")


if __name__ == "__main__":
    main()
