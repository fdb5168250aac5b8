"""Multi-label quality: the default recipe against the tuned one-vs-rest logistic regression, end to end.

    python -m huse.benchmarks.catalogs phosphor-icons-multi data/phosphor-icons-multi
    OMP_NUM_THREADS=1 python -m huse.benchmarks.multilabel --catalog data/phosphor-icons-multi/catalog.csv

1. `huse-train` with its defaults (the catalog's `|`-separated paths make it multi-label), exactly as
   a user would run it; the run fits the one-vs-rest baseline on the same split and frozen features
   (C by product-grouped cross-validation, thresholds tuned like HUSE's). Below 5,000 train + val rows
   the default takes the fusion weight, thresholds and epochs from 5 folds and ships a refit on train +
   val: then the bars compare it with the LR refitted on the same rows, its weight and thresholds from
   the same folds (the held-out pair is kept in the JSON as `held_out_test`).
2. `huse-export` to an fp32 bundle, then `--fp16` and `--int8-cpu` added one at a time, so a failed
   gate is recorded with its message (which bar, by how much) and does not hide the other.
3. The held-out test products classified through the lean runtime (`Classifier`, onnxruntime CPU)
   with every precision the bundle holds: fused micro-F1, macro-F1, mAP, subset accuracy and the
   labels per product, beside the baseline's test figures from the run.

Accuracy only, no timing: it can run on a busy machine. Runs and bundles already finished in the
work folder are reused. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli
from huse.runtime.errors import HuseError

PRECISIONS = ("fp16", "int8-cpu")
BARS = {"micro_f1_points_over_baseline": 2.0, "map_points_over_baseline": 0.0}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)


def train(catalog: str, run: Path, args: tuple[str, ...] = ()) -> dict:
    """`huse-train --data CATALOG` (defaults + args) into `run` unless it finished; its metrics.json."""
    if not (run / "metrics.json").is_file():
        resume = ["--resume"] if (run / "state.json").is_file() else []
        p = _run(["huse.train.cli", "--data", catalog, "--out", str(run), *resume, *args])
        if p.returncode:
            raise HuseError(f"training failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return json.loads((run / "metrics.json").read_text())


def export(run: Path, bundle: Path, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, dict]:
    """fp32 bundle, then each reduced precision added on its own; what each export said."""
    out: dict[str, dict] = {}
    if not (bundle / "manifest.json").is_file():
        p = _run(["huse.export.cli", str(run), "--out", str(bundle), "--engine", "skip"])
        if p.returncode:
            raise HuseError(f"export failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    models = json.loads((bundle / "manifest.json").read_text())["models"]
    for precision in precisions:
        if precision not in models:
            p = _run(["huse.export.cli", str(bundle), f"--{precision}", "--eval-size", "0", "--engine", "skip"])
            if p.returncode:  # refused: the one-line error says which gate failed and by how much
                err = [l for l in p.stderr.splitlines() if l.strip()]
                out[precision] = {"added": False, "message": err[-1] if err else f"exit code {p.returncode}"}
                continue
        gate = json.loads((bundle / "manifest.json").read_text())["accuracy"][precision]
        out[precision] = {"added": True, "gate": gate["modes"], "n": gate["n"],
                          "message": f"fused gate passed on {gate['n']} test items: label-set agreement "
                                     f"{gate['modes']['fused']['agreement']:.2f}%, micro-F1 drop "
                                     f"{gate['modes']['fused']['drop_points']:+.2f} points"}
    return out


def through_runtime(bundle: Path, data: dict, precision: str) -> dict:
    """Fused multi-label figures of the test products classified by the runtime with one precision."""
    from huse.runtime.classifier import Classifier
    from huse.train.multilabel import multilabel_report

    with Classifier(bundle, precision=precision, threads=1) as clf:
        results = clf.classify(images=data["images"], titles=data["titles"], top_k=len(clf.labels))
        labels = clf.labels
        from huse.runtime.hierarchy import Hierarchy

        hierarchy = Hierarchy(labels)
        thresholds = clf.thresholds["fused"]
    col = {l: j for j, l in enumerate(labels)}
    probs = np.zeros((len(results), len(labels)), np.float32)
    for i, r in enumerate(results):
        if "error" in r:
            raise HuseError(f"test item {i}: {r['error']}")
        for t in r["top_k"]:
            probs[i, col[t["label"]]] = t["score"]
    report = multilabel_report(probs, data["y"], thresholds, hierarchy)
    report["labels_per_product"] = float(np.mean([len(r["labels"]) for r in results]))
    return report


@click.command()
@click.option("--catalog", default="data/phosphor-icons-multi/catalog.csv", type=click.Path(dir_okay=False))
@click.option("--name", default="phosphor-icons-multi")
@click.option("--work", default="runs/multilabel", type=click.Path(file_okay=False), help="Runs and bundles (reused).")
@click.option("--out", default="benchmarks/results/cpu-2core/multilabel", type=click.Path(file_okay=False))
@click.option("--train-arg", "train_args", multiple=True, help="An extra huse-train argument (repeatable; smoke runs only: "
                                                               "the figures are for the defaults).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS), default=PRECISIONS,
              help="Reduced precisions to add and measure (repeatable).")
def main(catalog: str, name: str, work: str, out: str, train_args: tuple[str, ...], precisions: tuple[str, ...]) -> None:
    """Train, export and measure the default multi-label recipe against the one-vs-rest baseline."""
    def body():
        from huse.train.data import load_catalog_dataset
        from huse.train.multilabel import multi_hot

        run, bundle = Path(work) / name, Path(work) / f"{name}-bundle"
        click.echo(f"{name}: training (default recipe) ...", err=True)
        m = train(catalog, run, train_args)
        if m.get("task") != "multi-label":
            raise HuseError(f"{catalog} trained as single-label; a multi-label catalog lists several paths per product")
        click.echo(f"{name}: exporting ...", err=True)
        exports = export(run, bundle, precisions)
        ds = load_catalog_dataset(catalog)
        idx = ds.indices("test")
        labels = json.loads((bundle / "manifest.json").read_text())["labels"]
        data = {"images": [ds.images[i] for i in idx], "titles": [ds.titles[i] for i in idx],
                "y": multi_hot([ds.classes[i] for i in idx], labels)}
        models = json.loads((bundle / "manifest.json").read_text())["models"]
        runtime = {p: through_runtime(bundle, data, p) for p in ("fp32", *precisions) if p in models}
        # The shipped model against the LR fitted on the same rows: below 5,000 train + val rows a refit on
        # train + val (k-fold settings) beside the LR refitted there; else the held-out model beside the LR on train.
        ff = m.get("final_fit", {})
        refit = "test" in ff
        run_test = ({"huse": ff["test"], "baseline": ff["baseline_test"]} if refit
                    else {"huse": m["test"], "baseline": m["baseline"]["test"]})
        b = run_test["baseline"]["fused"]
        fused = runtime["fp32"]
        bars = {
            "micro_f1": {"huse": fused["micro_f1"], "baseline": b["micro_f1"],
                         "points": 100 * (fused["micro_f1"] - b["micro_f1"]),
                         "passed": 100 * (fused["micro_f1"] - b["micro_f1"]) >= BARS["micro_f1_points_over_baseline"]},
            "map": {"huse": fused["map"], "baseline": b["map"], "points": 100 * (fused["map"] - b["map"]),
                    "passed": fused["map"] >= b["map"]},
            "precisions": exports,
        }
        result = {"catalog": name, "train_args": list(train_args), "split_sizes": m["split_sizes"], "labels": len(labels),
                  "labels_per_product": m["labels_per_product"], "text_encoder": m["text_encoder"]["chosen"],
                  "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                  "fusion_image_weight": m["fusion_image_weight"],
                  "baseline_info": ff["baseline_info"] if refit else m["baseline_info"],
                  "shipped": {"rows": ff.get("splits", ["train"]), "epochs": ff.get("epochs", m["best_epoch"]),
                              "cv_folds": m.get("cv", {}).get("folds", 0),
                              "thresholds_from": m.get("thresholds_from", "val")},
                  "run_test": run_test,
                  **({"held_out_test": {"huse": m["test"], "baseline": m["baseline"]["test"]}} if refit else {}),
                  "runtime_test_fused": runtime, "bars": bars}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=2))
        table = markdown(result)
        (Path(out) / f"{name}.md").write_text(table + "\n")
        click.echo(table)
    run_cli(body)


def markdown(r: dict) -> str:
    """Test-split table: HUSE (run and runtime precisions) beside the one-vs-rest baseline."""
    lines = [f"{r['catalog']}: {r['split_sizes']['test']} test items, {r['labels']} classes, "
             f"{r['labels_per_product'].get('test', 0):.2f} labels per product (test)", "",
             "| model (test, fused) | micro-F1 | macro-F1 | mAP | subset accuracy |", "|---|---|---|---|---|"]

    def row(name: str, x: dict) -> str:
        return (f"| {name} | {100 * x['micro_f1']:.1f}% | {100 * x['macro_f1']:.1f}% | {100 * x['map']:.1f}% | "
                f"{100 * x['subset_accuracy']:.1f}% |")

    shipped = r.get("shipped", {"rows": ["train"], "cv_folds": 0})
    rows = " + ".join(shipped["rows"])
    chosen = f"{shipped['cv_folds']}-fold out-of-fold predictions" if shipped["cv_folds"] else "val"
    lines.append(row(f"one-vs-rest LR fitted on {rows} (tuned C; image weight "
                     f"{r['baseline_info'].get('fusion_image_weight', 0.5)} and thresholds on {chosen})",
                     r["run_test"]["baseline"]["fused"]))
    lines.append(row(f"HUSE fitted on {rows} (training run, torch; image weight {r['fusion_image_weight']} and thresholds "
                     f"on {chosen})", r["run_test"]["huse"]["fused"]))
    for p, x in r["runtime_test_fused"].items():
        lines.append(row(f"HUSE through the runtime, {p}", x))
    lines.append("")
    for mode in ("image", "text"):
        h, b = r["run_test"]["huse"][mode], r["run_test"]["baseline"][mode]
        lines.append(f"- {mode}: HUSE micro-F1 {100 * h['micro_f1']:.1f}% vs LR {100 * b['micro_f1']:.1f}%, "
                     f"mAP {100 * h['map']:.1f}% vs {100 * b['map']:.1f}%")
    bars = r["bars"]
    lines.append(f"- bar micro-F1 >= LR + 2 points: {bars['micro_f1']['points']:+.1f} points -> "
                 f"{'pass' if bars['micro_f1']['passed'] else 'FAIL'}; bar mAP >= LR: {bars['map']['points']:+.1f} "
                 f"points -> {'pass' if bars['map']['passed'] else 'FAIL'}")
    for p, e in bars["precisions"].items():
        lines.append(f"- {p}: {'added' if e['added'] else 'NOT added'}: {e['message']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
