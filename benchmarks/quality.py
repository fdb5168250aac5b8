"""Model quality across catalogs: the default recipe against the logistic-regression baselines.

    for c in phosphor-icons tabler-icons mdi-icons; do python -m huse.benchmarks.catalogs $c data/$c; done
    python -m huse.benchmarks.quality --out bench-results/quality \\
        --catalog phosphor-icons=data/phosphor-icons/catalog.csv --catalog tabler-icons=data/tabler-icons/catalog.csv \\
        --catalog mdi-icons=data/mdi-icons/catalog.csv --dataset fashion-products-open --dataset fashion-products

Each catalog is trained with `huse-train`'s defaults (plus any `--train-arg`), exactly as a user
would run it, and the table compares HUSE with the baselines every run fits on the same split
and features (huse.train.baselines), on the held-out test products: top-1 per mode against the
tuned logistic regressions (C and fusion chosen by cross-validation by product) and the
differences, scikit-learn's defaults (C=1, probabilities averaged) beside them, and the fused
ECE after calibration. Where the shipped model was refitted on train+val (`--final-fit`), its
test top-1 is listed too. `--train-arg` applies to every catalog, e.g.
`--train-arg=--arch=paper` to measure the paper's towers. Runs that already finished in the
work folder are reused. Writes quality-RECIPE.json and .md in --out; rows of catalogs measured
earlier into the same file (and not in this invocation) are kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from huse.runtime.cli import run_cli
from huse.runtime.errors import HuseError

MODES = ("fused", "image", "text")


def train_default(name: str, args: list[str], run: Path) -> dict:
    """Run `huse-train` (its defaults + args) into `run` unless it already finished; return metrics.json."""
    if not (run / "metrics.json").is_file():
        t0 = time.time()
        cmd = [sys.executable, "-m", "huse.train.cli", *args, "--out", str(run)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise HuseError(f"training {name} failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        (run / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    return json.loads((run / "metrics.json").read_text())


def summarise(name: str, m: dict) -> dict:
    t, b, d = m["test"], m["baseline"]["test"], m["baseline_defaults"]["test"]
    row = {"catalog": name, "split_sizes": m["split_sizes"], "text_encoder": m["text_encoder"]["chosen"],
           "val_unseen_word_rate": m["text_encoder"]["val_unseen_word_rate"], "best_epoch": m["best_epoch"],
           "epochs_run": m["epochs_run"], "fusion_image_weight": m["fusion_image_weight"],
           "ece_fused_before": m["calibration"]["ece_before"]["fused"], "ece_fused_after": m["calibration"]["ece_after"]["fused"],
           "baseline_settings": m["baseline_settings"],
           "final_fit": {k: v for k, v in m["final_fit"].items() if k != "test"}}
    if "class_names" in m:  # the class-name prior (--class-name-init, --class-name-prior): applied or why not
        row["class_names"] = m["class_names"]
    if "cv" in m:  # k-fold choices (--cv-folds): the settings and each fold's figures
        row["cv"] = m["cv"]
    for mode in MODES:
        row[f"huse_{mode}"], row[f"baseline_{mode}"] = t[mode]["top1"], b[mode]["top1"]
        row[f"baseline_defaults_{mode}"] = d[mode]["top1"]
        row[f"diff_{mode}"] = t[mode]["top1"] - b[mode]["top1"]
        if "test" in m["final_fit"]:  # the refitted model, and the tuned LR fitted on the same rows
            row[f"refit_{mode}"] = m["final_fit"]["test"][mode]["top1"]
            row[f"refit_baseline_{mode}"] = m["final_fit"]["baseline_test"][mode]["top1"]
    return row


def markdown(rows: list[dict]) -> str:
    refit = any("refit_fused" in r for r in rows)
    head = ["catalog", "test items", "text encoder", "HUSE fused", "LR fused", "LR C=1 fused", "HUSE image", "LR image",
            "HUSE text", "LR text", "fused ECE (calibrated)"] + (["refit on train+val, HUSE (LR): fused / image / text"] if refit else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["catalog"], str(r["split_sizes"]["test"]), r["text_encoder"]]
        for mode in MODES:
            cells += [f"**{100 * r[f'huse_{mode}']:.1f}%** ({100 * r[f'diff_{mode}']:+.1f})", f"{100 * r[f'baseline_{mode}']:.1f}%"]
            if mode == "fused":
                cells.append(f"{100 * r['baseline_defaults_fused']:.1f}%")
        cells.append(f"{r['ece_fused_before']:.3f} ({r['ece_fused_after']:.3f})")
        if refit:
            cells.append(" / ".join(f"{100 * r[f'refit_{m}']:.1f}% ({100 * r[f'refit_baseline_{m}']:.1f}%)" for m in MODES)
                         if "refit_fused" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nLR: logistic regressions with C and the fusion weight chosen by 5-fold cross-validation "
                               "by product on the training split; LR C=1: scikit-learn's defaults, probabilities averaged. "
                               "(+x): HUSE minus LR.")


@click.command()
@click.option("--catalog", "catalogs", multiple=True, help="NAME=catalog.csv (repeatable).")
@click.option("--dataset", "datasets", multiple=True, help="A built-in dataset (repeatable).")
@click.option("--train-size", type=int, help="Built-in datasets: products in train (default: all).")
@click.option("--train-arg", "train_args", multiple=True, help="An extra huse-train argument for every run (repeatable).")
@click.option("--work", default="runs/quality", type=click.Path(file_okay=False), help="Where the runs go (reused).")
@click.option("--out", default="bench-results/quality", type=click.Path(file_okay=False))
def main(catalogs, datasets, train_size, train_args, work, out) -> None:
    """Train the default recipe on several catalogs and compare it with the baselines."""
    def body():
        jobs = []
        for spec in catalogs:
            name, _, path = spec.partition("=")
            jobs.append((name, ["--data", path]))
        for d in datasets:
            jobs.append((d, ["--dataset", d] + (["--train-size", str(train_size)] if train_size else [])))
        if not jobs:
            raise HuseError("nothing to measure: pass --catalog NAME=CSV and/or --dataset NAME")
        tag = "-".join(a.strip("-").replace("=", "") for a in train_args) or "default"
        rows = []
        for name, args in jobs:
            click.echo(f"{name}: training ({tag}) ...", err=True)
            rows.append(summarise(name, train_default(name, [*args, *train_args], Path(work) / tag / name)))
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / f"quality-{tag}.json"
        # Catalogs measured before (and not now) keep their rows, so slow catalogs can be run separately.
        done = {r["catalog"] for r in rows}
        old = json.loads(path.read_text())["rows"] if path.is_file() else []
        rows += [r for r in old if r["catalog"] not in done and "baseline_defaults_fused" in r]
        path.write_text(json.dumps({"recipe": tag, "rows": rows}, indent=2))
        table = markdown(rows)
        (Path(out) / f"quality-{tag}.md").write_text(table + "\n")
        click.echo(table)
    run_cli(body)


if __name__ == "__main__":
    main()
