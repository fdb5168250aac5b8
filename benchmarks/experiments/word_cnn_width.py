"""Whether word-CNN titles should be padded to the batch's longest title instead of max_len (issue 24).

    python benchmarks/experiments/word_cnn_width.py runs/demo bundles/demo --out benchmarks/results/cpu-2core/text-options/word_cnn_width.json

A one-off experiment behind the word CNN's fixed input length, kept outside the installed package.
The word CNN max-pools its convolution over all `max_len` positions, and the padding id's embedding is
zero (`padding_idx`), so a window of padding alone gives the convolution's bias. Padded to the batch's
longest title plus `kernel - padding` ids (2 for the default kernel 3), every title still has such a
window, and the max is the same as at the full length, exactly. This script measures what that width
would buy, on the first held-out batch of the bundle's catalog, in one process, interleaved rounds:

- the text graph alone (onnxruntime, one intra-op thread, the export's folded form written at each width)
  and the trained torch model (PyTorch eager, all threads) at the full width and at the batch's width;
- `classify(titles, mode="text")` end to end through the runtime and through the PyTorch eager baseline of
  `huse-bench` (`TorchClassifier`), each with the tokenizer's ids cut to the batch's width and the runtime's
  text session swapped for the graph written at that width.

It checks that every form gives the full width's logits (torch: exactly; onnxruntime: to 1e-4) and the same
top-1 end to end. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import click
import numpy as np

from huse.benchmarks.stats import interleaved_ms, round_ratios
from huse.benchmarks.suite import BenchData, TorchClassifier
from huse.runtime import Classifier
from huse.runtime.cli import run_cli


def _cut(clf: Classifier, width: int) -> Classifier:
    """`clf` with its tokenizer's ids cut to `width` columns (titles that fit lose only padding)."""
    encode = clf.tokenizer.encode
    clf.tokenizer.encode = lambda titles: encode(titles)[:, :width].copy()
    return clf


def run(run_dir: str, bundle: str, batch: int = 64, rounds: int = 7, seconds: float = 0.5) -> dict:
    import onnxruntime as ort
    import torch

    from huse.export.graphs import FoldedWordCNN, TextGraph, export_onnx
    from huse.train.trainer import load_run

    model, cfg = load_run(run_dir)
    model.eval()
    if cfg["model"]["text_encoder"] != "cnn":
        raise click.UsageError(f"{run_dir} has a {cfg['model']['text_encoder']} text encoder; this experiment is the word CNN's")
    conv = model.text_encoder.conv
    extra = int(conv.kernel_size[0] - conv.padding[0])
    with Classifier(bundle) as clf, tempfile.TemporaryDirectory() as tmp:
        _, titles, _ = BenchData(clf.manifest, clf, batch, Path(tmp)).take(0, batch)
        full = clf.tokenizer.encode(titles)
        longest = int((full > 0).sum(1).max())
    width = min(full.shape[1], longest + extra)
    reference = TextGraph(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions, fns, check = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        want = reference(torch.from_numpy(full))[1].numpy()
        for w in sorted({full.shape[1], width}):
            form = copy.copy(model)  # shares every module, as the export's form does
            form._modules = dict(model._modules, text_encoder=FoldedWordCNN(model.text_encoder, w))
            path = Path(tmp) / f"text{w}.onnx"
            export_onnx(TextGraph(form), {"input_ids": full[:, :w]}, ["input_ids"], ["embedding", "logits"], path)
            sessions[w] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            ids = np.ascontiguousarray(full[:, :w])
            check[f"onnxruntime width {w}"] = float(np.abs(sessions[w].run(None, {"input_ids": ids})[1] - want).max())
            check[f"torch width {w}"] = float(np.abs(reference(torch.from_numpy(ids))[1].numpy() - want).max())
            fns[f"onnxruntime graph, width {w}"] = lambda s=sessions[w], x=ids: s.run(None, {"input_ids": x})
            fns[f"torch model, width {w}"] = lambda x=torch.from_numpy(ids): reference(x)
        model_times = interleaved_ms(fns, rounds, seconds)

    runtime, runtime_cut = f"runtime, width {full.shape[1]}", f"runtime, width {width}"
    torch_full, torch_cut = f"torch, width {full.shape[1]}", f"torch, width {width}"
    classifiers = {runtime: Classifier(bundle), runtime_cut: _cut(Classifier(bundle), width),
                   torch_full: TorchClassifier(Path(bundle), Path(run_dir)),
                   torch_cut: _cut(TorchClassifier(Path(bundle), Path(run_dir)), width)}
    classifiers[runtime_cut]._runner("text").session = sessions[width]
    top1 = {k: [r["top_k"][0]["label"] for r in c.classify(titles=titles, mode="text")] for k, c in classifiers.items()}
    e2e = interleaved_ms({k: (lambda c=c: c.classify(titles=titles, mode="text")) for k, c in classifiers.items()},
                         rounds, seconds)
    for c in classifiers.values():
        c.close()
    vs_full, vs_cut = round_ratios(e2e, torch_full, [runtime, runtime_cut]), round_ratios(e2e, torch_cut, [runtime_cut])
    return {"bundle": str(bundle), "batch": batch, "max_len": int(full.shape[1]), "longest_title_words": longest,
            "width": width, "max_abs_logit_diff_vs_full_torch": check,
            "same_top1_end_to_end": all(v == top1[runtime] for v in top1.values()),
            "model_ms": model_times, "model_speedup_of_width": round_ratios(model_times, f"onnxruntime graph, width {full.shape[1]}"),
            "end_to_end_ms": e2e,
            "end_to_end_vs_pytorch": {"both at full width": vs_full[runtime]["median"],
                                      "both at the batch's width": vs_cut[runtime_cut]["median"],
                                      "runtime at the batch's width, PyTorch at full": vs_full[runtime_cut]["median"]}}


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--out", default="bench-results/word_cnn_width.json", type=click.Path(dir_okay=False), show_default=True)
def main(run_dir, bundle, batch, rounds, out) -> None:
    def body():
        r = run(run_dir, bundle, batch, rounds)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps({k: v for k, v in r.items() if k not in ("model_ms", "end_to_end_ms")}, indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
