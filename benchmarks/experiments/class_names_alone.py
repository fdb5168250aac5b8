"""How well the class names alone classify a catalog's titles (zero-shot, as CLIP does with prompts).

    python benchmarks/experiments/class_names_alone.py --out benchmarks/results/cpu-2core/quality/class_names_alone.json \\
        data/phosphor-icons/catalog.csv data/tabler-icons/catalog.csv data/mdi-icons/catalog.csv

A one-off experiment behind the class-name prior (`huse-train --class-name-init`, docs/quality.md):
each class path's words (`class_name_title`) and each title go through frozen MiniLM, and a title's answer
is the class whose name is nearest (cosine); no training. Per catalog and split: that top-1. Where the
names do not classify the training titles, starting the shared layer at them points it the wrong way.
Needs the catalogs' `split` column (the benchmark catalogs have one: huse.benchmarks.catalogs).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli


@click.command()
@click.argument("catalogs", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def main(catalogs, out) -> None:
    """Zero-shot top-1 of the class names on each catalog's train, val and test titles."""
    def body():
        from huse.train.minilm import embed_texts
        from huse.train.model import class_name_title

        result = {}
        for path in catalogs:
            rows = list(csv.DictReader(open(path, newline="")))
            labels = sorted({r["classes"] for r in rows})
            names = embed_texts([class_name_title(label) for label in labels], progress=False)
            result[Path(path).parent.name] = per = {}
            for split in ("train", "val", "test"):
                part = [r for r in rows if r["split"] == split]
                titles = embed_texts([r["name"] for r in part], progress=False)
                y = np.array([labels.index(r["classes"]) for r in part])
                per[split] = {"items": len(part), "top1": round(float(((titles @ names.T).argmax(1) == y).mean()), 4)}
            click.echo(f"{Path(path).parent.name}: " + ", ".join(f"{s} {v['top1']:.1%}" for s, v in per.items()))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    run_cli(body)


if __name__ == "__main__":
    main()
