"""The tuned logistic-regression baselines with BLAS's default threads against one thread.

    python benchmarks/experiments/baseline_threads.py --train-rows 3000 \\
        --out benchmarks/results/cpu-2core/baseline_threads-3000.json
    python benchmarks/experiments/baseline_threads.py --train-rows 0 \\
        --out benchmarks/results/cpu-2core/baseline_threads-all.json   # all 55,000 (about 10 minutes)
    python benchmarks/experiments/baseline_threads.py --data data/phosphor-icons/catalog.csv \
        --out benchmarks/results/cpu-2core/baseline_threads-phosphor-icons.json

Every `huse-train` run fits the baselines of `huse.train.baselines.logistic_baselines` (60 cross-validation
fits and the final ones) with scipy's L-BFGS-B; the toolkit now runs them with BLAS limited to one thread
(`one_blas_thread`). On one fashion-products split and its frozen features (computed once), in interleaved
rounds, this times the same call both ways (the unlimited one is the undecorated function) and checks that
they choose the same settings and give the same probabilities to solver tolerance. Timings are only
meaningful on a quiet machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli


def run(train_rows: int, rounds: int, data: str | None = None) -> dict:
    from threadpoolctl import threadpool_info

    from huse.train import baselines
    from huse.train.data import load_builtin, load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    if data:  # a catalog of your own (split by product as huse-train splits it)
        ds = load_catalog_dataset(data)
    else:
        ds = (load_builtin("fashion-products", train_size=train_rows, val_size=1000, test_size=1000) if train_rows
              else load_builtin("fashion-products"))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(ds, Path(tmp) / "run", HuseConfig(num_classes=0, text_encoder="auto"), TrainConfig(epochs=1))  # as huse-train
        tr._prepare_features()  # the frozen features, as huse-train computes them before training
        image, text = tr._baseline_inputs()
    splits = {s: tr.split[s].numpy() for s in ("val", "test") if len(tr.split[s])}
    args = (image, text, tr.y.numpy(), len(tr.labels), tr.split["train"].numpy(), splits)
    kw = {"groups": tr.product.numpy(), "seed": 0}
    fns = {"blas_default_threads": baselines.logistic_baselines.__wrapped__,
           "one_blas_thread": baselines.logistic_baselines}
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    outs = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn(*args, **kw)
            seconds[name].append(round(time.perf_counter() - t, 2))
            click.echo(f"{name}: {seconds[name][-1]} s", err=True)
    a, b = outs["blas_default_threads"], outs["one_blas_thread"]
    ratio = [x / y for x, y in zip(seconds["blas_default_threads"], seconds["one_blas_thread"])]
    return {
        "data": data or "fashion-products", "train_rows": int(len(args[4])), "image_features": int(image.shape[1]), "rounds": rounds,
        "blas": [(p["filepath"].split("/")[-1], p["num_threads"]) for p in threadpool_info() if p["user_api"] == "blas"],
        "seconds": seconds,
        "default_over_one_thread": {"median": float(np.median(ratio)), "min": min(ratio), "max": max(ratio)},
        "settings": {name: {"C": {m: o["settings"][m]["C"] for m in ("image", "text")},
                            "image_weight": o["settings"]["fused"]["image_weight"],
                            "cv_top1": {m: o["settings"][m]["cv_top1"] for m in ("image", "text")}} for name, o in outs.items()},
        "same_settings": {m: a["settings"][m]["C"] == b["settings"][m]["C"] for m in ("image", "text")}
        | {"fused_image_weight": a["settings"]["fused"]["image_weight"] == b["settings"]["fused"]["image_weight"]},
        "max_abs_prob_diff": max(float(np.abs(a[k][s][m] - b[k][s][m]).max())
                                 for k in ("tuned", "defaults") for s in splits for m in ("image", "text", "fused")),
        "test_top1": {name: {m: float((o["tuned"]["test"][m].argmax(1) == tr.y.numpy()[splits["test"]]).mean())
                             for m in ("image", "text", "fused")} for name, o in outs.items()},
    }


@click.command()
@click.option("--train-rows", default=3000, show_default=True, help="fashion-products training rows; 0: all (55,000)")
@click.option("--data", default=None, help="a catalog (CSV/JSONL/Parquet) instead of fashion-products")
@click.option("--rounds", default=2, show_default=True)
@click.option("--out", default="bench-results/baseline_threads.json", type=click.Path(dir_okay=False), show_default=True)
def main(train_rows, data, rounds, out) -> None:
    def body():
        r = run(train_rows, rounds, data)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps({k: r[k] for k in ("default_over_one_thread", "same_settings", "max_abs_prob_diff")}))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
