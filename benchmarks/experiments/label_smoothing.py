"""Label smoothing in the single-label classification loss (issue 19, item 4): does it lift small catalogs?

    python benchmarks/experiments/label_smoothing.py --catalog phosphor-icons=data/phosphor-icons/catalog.csv \
        --catalog tabler-icons=data/tabler-icons/catalog.csv --catalog mdi-icons=data/mdi-icons/catalog.csv \
        --smoothing 0 --smoothing 0.1 --work runs/label-smoothing \
        --out benchmarks/results/cpu-2core/quality/label_smoothing.json

A one-off experiment kept outside the installed package. Each run is `huse-train --cv-folds 0` (one model, trained
on train, its epoch and fusion weight chosen on val: the held-out model of the README's quality table) with
`F.cross_entropy(..., label_smoothing=S)` patched into `huse.train.losses.classification_loss` for both modalities,
one thread each, two runs at a time. It writes each run's test top-1 per mode beside the tuned LR's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

PATCHED_TRAIN = """
import sys
import torch.nn.functional as F
import huse.train.losses as L
S = float(sys.argv[1])
def classification_loss(image_logits, text_logits, labels):
    return (F.cross_entropy(image_logits, labels, label_smoothing=S)
            + F.cross_entropy(text_logits, labels, label_smoothing=S))
L.classification_loss = classification_loss
from huse.runtime.cli import train_main
sys.argv = ["huse-train", *sys.argv[2:]]
train_main()
"""


def _run(name: str, catalog: str, s: float, work: Path) -> dict:
    out = work / f"{name}-ls{s:g}"
    if not (out / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(work / f"{name}-ls{s:g}.log", "w") as log:
            subprocess.run([sys.executable, "-c", PATCHED_TRAIN, str(s), "--data", catalog, "--out", str(out),
                            "--cv-folds", "0"], env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    m = json.loads((out / "metrics.json").read_text())
    return {"catalog": name, "smoothing": s,
            "test_top1": {mode: m["test"][mode]["top1"] for mode in ("fused", "image", "text")},
            "tuned_lr_test_top1": {mode: m["baseline"]["test"][mode]["top1"] for mode in ("fused", "image", "text")}
            if "test" in m.get("baseline", {}) else None,
            "best_epoch": m.get("best_epoch"), "fusion_image_weight": m.get("fusion_image_weight")}


@click.command()
@click.option("--catalog", "catalogs", multiple=True, required=True, help="NAME=catalog.csv (repeatable).")
@click.option("--smoothing", "values", multiple=True, type=float, default=(0.0, 0.1), show_default=True)
@click.option("--work", type=click.Path(file_okay=False), required=True, help="Where the runs go (reused).")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def main(catalogs, values, work, out) -> None:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(n, c, s) for n, c in (x.split("=", 1) for x in catalogs) for s in values]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda j: _run(*j, work), jobs))
    Path(out).write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    for r in rows:
        t = r["test_top1"]
        click.echo(f"{r['catalog']:16} smoothing {r['smoothing']:<4g} test top-1 fused {100 * t['fused']:.1f} "
                   f"image {100 * t['image']:.1f} text {100 * t['text']:.1f}")


if __name__ == "__main__":
    main()
