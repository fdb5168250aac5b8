"""Which text encoder should be the default? Word CNN (trained) vs MiniLM (pretrained, frozen).

    python benchmarks/experiments/text_encoders.py --out benchmarks/results/cpu-2core/text_encoders.json

A one-off experiment (it decided the default text encoder), kept outside the installed package
so its committed result stays reproducible.

Trains HUSE twice on the same fashion-products subset (same image side: the tiny CNN, so the
comparison is about text), exports both, and measures on held-out products: text-only top-1
through the runtime, and text-graph latency (tokenise + model) at batch 1 and 64 on
onnxruntime CPU, side by side in one process, with interleaved rounds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from huse.benchmarks import stats
from huse.runtime.cli import run_cli


def compare_encoders(train_size: int = 10000, val_size: int = 2000, test_size: int = 3000, epochs: int | None = 10,
                     dataset: str = "fashion-products",
                     work: Path | None = None, rounds: int = 5) -> dict:
    from huse.export.api import ExportOptions, export
    from huse.runtime import Classifier
    from huse.train.data import load_builtin
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    work = Path(work or tempfile.mkdtemp())
    ds = load_builtin(dataset, train_size=train_size, val_size=val_size, test_size=test_size)
    test = ds.indices("test")
    titles = [ds.titles[i] for i in test]
    out = {"dataset": dataset, "train_size": train_size, "test_size": len(test), "epochs": epochs, "encoders": {}}
    clfs = {}
    for enc in ("cnn", "minilm"):
        run, bundle = work / f"run-{enc}", work / f"bundle-{enc}"
        metrics = Trainer(ds, run, HuseConfig(num_classes=0, backbone="tiny", image_size=32, text_encoder=enc),
                          TrainConfig(epochs=epochs or None)).fit()
        export(run, bundle, ExportOptions(engine="skip", force=True, say=lambda s: None))
        clf = Classifier(bundle, backend="onnxruntime", batch_size=64)
        y = np.asarray([clf.labels.index(ds.classes[i]) for i in test])
        top1 = float((clf.predict_proba(titles=titles).argmax(1) == y).mean())
        size = (bundle / "text.onnx").stat().st_size
        out["encoders"][enc] = {"text_top1_test": top1, "text_top1_test_trainer": metrics["test"]["text"]["top1"],
                                "text_onnx_mib": size / 2**20, "latency_ms": {}}
        clfs[enc] = clf
    for batch in (1, 64):
        samples = {enc: [] for enc in clfs}
        for _ in range(rounds):  # interleaved: drift of a noisy machine hits both alike
            for enc, clf in clfs.items():
                batch_titles = titles[:batch]
                samples[enc].append(stats.time_fn(lambda: clf.classify(titles=batch_titles, mode="text"), warmup=2,
                                                  min_iters=3, max_seconds=2.0))
        for enc in clfs:
            out["encoders"][enc]["latency_ms"][str(batch)] = {
                **stats.summarize(np.concatenate(samples[enc]), scale=1e3),
                "repeat_spread": stats.repeat_summary(samples[enc], scale=1e3)["spread"]}
    for clf in clfs.values():
        clf.close()
    return out


@click.command()
@click.option("--out", default="bench-results/text_encoders.json", type=click.Path(dir_okay=False), show_default=True)
@click.option("--train-size", default=10000, show_default=True)
@click.option("--test-size", default=3000, show_default=True)
@click.option("--epochs", default=10, show_default=True, help="0: huse-train's default (a step budget, early stopping).")
@click.option("--dataset", type=click.Choice(["fashion-products", "fashion-products-open"]), default="fashion-products",
              show_default=True, help="-open: test titles use words never seen in training.")
def main(out, train_size, test_size, epochs, dataset) -> None:
    """Measure word CNN vs MiniLM text encoders: held-out text-only top-1 and latency."""
    def body():
        r = compare_encoders(train_size=train_size, test_size=test_size, epochs=epochs, dataset=dataset)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(f"{'encoder':8} {'text top-1':>10} {'b1 p50 ms':>10} {'b64 p50 ms':>11} {'text.onnx MiB':>14}")
        for enc, e in r["encoders"].items():
            click.echo(f"{enc:8} {e['text_top1_test']:10.4f} {e['latency_ms']['1']['p50']:10.2f} "
                       f"{e['latency_ms']['64']['p50']:11.2f} {e['text_onnx_mib']:14.1f}")
    run_cli(body)


if __name__ == "__main__":
    main()
