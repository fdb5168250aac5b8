"""Accuracy of a bundle on its held-out test split, through the lean runtime, per mode and level.

    python -m huse.benchmarks.accuracy BUNDLE [--precisions fp32,fp16,int8] [--out accuracy.json]

Checks the fashion-products bars of the default recipe: fused top-1 >= 96%, image-only >= 90%,
text-only within 70-80%, fused above both single modalities.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from huse.runtime.bundle import is_multi_label
from huse.runtime.classifier import Classifier
from huse.runtime.cli import run_cli
from huse.runtime.errors import HuseError

BARS = {"fused_min": 0.96, "image_min": 0.90, "text_range": (0.70, 0.80)}


def evaluate(bundle: str | Path, precisions: list[str] | None = None, split: str = "test") -> dict:
    """Top-1/top-5 and per-level top-1 of every mode and precision on a split, via Classifier."""
    from huse.runtime.bundle import load_manifest
    from huse.train.data import load_source
    from huse.train.trainer import accuracy_report

    manifest = load_manifest(bundle)
    if is_multi_label(manifest):  # top-1 against one class per product means nothing there
        raise HuseError(f"{bundle} is a multi-label bundle; measure its accuracy with `python -m "
                        "huse.benchmarks.multilabel` (micro-F1, mAP through the runtime)")
    ds = load_source(manifest["data"])
    idx = ds.indices(split)
    images, titles = [ds.images[i] for i in idx], [ds.titles[i] for i in idx]
    y = np.asarray([manifest["labels"].index(ds.classes[i]) for i in idx])
    out = {"bundle": str(bundle), "split": split, "n": int(len(idx)), "precisions": {}}
    for p in precisions or sorted(manifest["models"]):
        with Classifier(bundle, backend="onnxruntime", precision=p, batch_size=128) as clf:
            t = time.perf_counter()
            probs = {"image": clf.predict_proba(images=images), "text": clf.predict_proba(titles=titles),
                     "fused": clf.predict_proba(images=images, titles=titles)}
            out["precisions"][p] = {m: accuracy_report(pr, y, clf.hierarchy) for m, pr in probs.items()}
            out["precisions"][p]["seconds"] = time.perf_counter() - t
    return out


def check_bars(report: dict) -> list[str]:
    """Which fashion-products bars the fp32 result misses (empty: all met)."""
    r = report["precisions"].get("fp32")
    if r is None:
        return ["no fp32 result"]
    fused, image, text = r["fused"]["top1"], r["image"]["top1"], r["text"]["top1"]
    misses = []
    if fused < BARS["fused_min"]:
        misses.append(f"fused top-1 {fused:.4f} < {BARS['fused_min']}")
    if image < BARS["image_min"]:
        misses.append(f"image top-1 {image:.4f} < {BARS['image_min']}")
    lo, hi = BARS["text_range"]
    if not lo <= text <= hi:
        misses.append(f"text top-1 {text:.4f} outside {lo}-{hi}")
    if not fused > max(image, text):
        misses.append("fused does not beat both single modalities")
    return misses


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precisions", help="Comma-separated (default: every precision in the bundle).")
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
def main(bundle, precisions, split, out) -> None:
    """Measure a bundle's accuracy through the runtime and check the fashion-products bars."""
    def body():
        report = evaluate(bundle, precisions.split(",") if precisions else None, split)
        click.echo(f"{report['n']} {split} products of {bundle}, classified through huse.runtime (onnxruntime CPU)")
        click.echo(f"{'precision':9} {'mode':6} {'top1':>7} {'top5':>7}  per-level top1")
        for p, r in report["precisions"].items():
            for m in ("image", "text", "fused"):
                levels = " ".join(f"L{k}={v:.4f}" for k, v in r[m]["levels"].items())
                click.echo(f"{p:9} {m:6} {r[m]['top1']:7.4f} {r[m]['top5']:7.4f}  {levels}")
        report["bars_missed"] = check_bars(report)
        click.echo("bars (fashion-products, fp32): " + ("all met" if not report["bars_missed"] else "; ".join(report["bars_missed"])))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=1))
    run_cli(body)


if __name__ == "__main__":
    main()
