"""MiniLM's text graph at batch 64: sequence padding, onnxruntime's BERT fusions, FFN-only INT8, session options.

    python benchmarks/experiments/minilm_text_forms.py RUN BUNDLE [--catalog CSV] --out benchmarks/results/cpu-2core/text-options/minilm_forms.json

RUN is the MiniLM training run, BUNDLE its bundle (huse-export RUN --out BUNDLE). A one-off experiment
behind issue 24's MiniLM bar, kept outside the installed package. In one process, on the bundle's
held-out titles (the test split of its catalog), batch 64:

- padding: the bundle's graph takes every title padded to the tokenizer's fixed max_len (32), on our
  side and on the PyTorch side (the baseline shares the tokenizer). A careful user pads a batch to its
  longest title, rounded up to a multiple of 8. That needs a graph exported with a dynamic sequence
  axis: this script exports one from RUN (same weights, legacy exporter, opset 17), checks it against
  torch to 1e-4 at both lengths, and times torch eager and onnxruntime at both.
- `onnxruntime.transformers.optimizer.optimize_model(model_type='bert', num_heads=12, hidden_size=384)`
  on that graph: which fusions it finds (Attention, SkipLayerNormalization, BiasGelu) and its speed.
- INT8 dynamic quantisation of the weight MatMuls only (Q/K/V and output projections, the FFN; the
  attention's activation x activation MatMuls stay fp32), per channel, reduce_range=True (onnxruntime's
  advice for AVX2/AVX-512 without VNNI): top-1 agreement with fp32 over the held-out titles (the export's
  INT8 gate: >= 99%) and its speed.
- session options of the padded-to-longest graph: intra-op threads (all cores vs 1) and graph
  optimisation level (ALL vs EXTENDED).

Ratios are the median over interleaved rounds of (PyTorch eager at fixed length / this), with their
range. Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
import numpy as np

from huse.benchmarks.stats import interleaved_ms, round_ratios
from huse.benchmarks.suite import heldout_titles
from huse.runtime.cli import run_cli

PAD_MULTIPLE = 8
GATE = 99.0  # the export's INT8 gate: top-1 agreement with fp32, percent


def _session(path: str, threads: int, level: str = "ALL"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _to_longest(feed: dict[str, np.ndarray], multiple: int = PAD_MULTIPLE) -> dict[str, np.ndarray]:
    """The batch cut to its longest title, rounded up to `multiple` (the padding a careful user picks)."""
    longest = int(feed["attention_mask"].sum(1).max())
    length = min(feed["input_ids"].shape[1], -(-longest // multiple) * multiple)
    return {k: np.ascontiguousarray(v[:, :length]) for k, v in feed.items()}


def _export_dynamic_length(module, feed: dict[str, np.ndarray], path: Path) -> None:
    """The text graph with dynamic batch and sequence axes (the bundle's has only the batch dynamic)."""
    import warnings

    import torch

    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(torch.from_numpy(feed[n]) for n in names), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["embedding", "logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                                        "embedding": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)


def run(run_dir: str, bundle: str, batch: int = 64, rounds: int = 7, seconds: float = 0.3,
        catalog: str | None = None) -> dict:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from huse.export.graphs import graph_specs
    from huse.runtime.bundle import load_manifest
    from huse.train.trainer import load_run

    manifest = load_manifest(Path(bundle))
    if manifest.get("model", {}).get("text_encoder") != "minilm":
        raise click.UsageError(f"{bundle} is not a MiniLM bundle")
    cores = os.cpu_count() or 1
    tokenizer, titles, y = heldout_titles(bundle, manifest, catalog)
    full = tokenizer.inputs(titles)  # fixed length, as the bundle's graph takes it
    fixed = {k: v[:batch] for k, v in full.items()}
    longest = _to_longest(fixed)

    model, _ = load_run(run_dir)
    text = graph_specs(model, 0.5)["text"]["module"].eval()
    torch.set_num_threads(cores)

    def torch_run(feed):
        with torch.inference_mode():
            return text(*(torch.from_numpy(feed[n]) for n in ("input_ids", "attention_mask")))

    tmp = Path(tempfile.mkdtemp(prefix="minilm-forms-"))
    dyn = tmp / "text-dynamic.onnx"
    _export_dynamic_length(text, fixed, dyn)
    out: dict = {"run": str(run_dir), "bundle": str(bundle), "batch": batch, "cores": cores, "rounds": rounds,
                 "tokens": {"fixed_length": int(fixed["input_ids"].shape[1]), "batch_longest_rounded": int(longest["input_ids"].shape[1]),
                            "title_tokens_median": float(np.median(full["attention_mask"].sum(1))),
                            "title_tokens_max": int(full["attention_mask"].sum(1).max())}}

    # Parity of the dynamic-length graph with torch, at both lengths (fp32: 1e-4, as the export checks).
    s_dyn = _session(str(dyn), cores)
    out["parity_max_abs_diff"] = {}
    for name, feed in (("fixed", fixed), ("longest", longest)):
        ref = [t.numpy() for t in torch_run(feed)]
        got = s_dyn.run(None, feed)
        out["parity_max_abs_diff"][name] = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
    # Padding to the longest changes nothing a user sees: the logits at both lengths.
    a, b = s_dyn.run(None, fixed)[1], s_dyn.run(None, longest)[1]
    out["longest_vs_fixed_max_logit_diff"] = float(np.abs(a - b).max())

    # onnxruntime's BERT optimizer, told MiniLM's shape (config.json: 12 heads, hidden 384).
    opt = optimize_model(str(dyn), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    out["bert_optimizer_fusions"] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(tmp / "opt.onnx"))

    # INT8 dynamic, weight MatMuls only (per channel, reduce_range): attention's activation MatMuls stay fp32.
    graph = onnx.load(str(dyn))
    weights = {i.name for i in graph.graph.initializer}
    act = [n.name for n in graph.graph.node if n.op_type == "MatMul" and not any(x in weights for x in n.input)]
    int8 = tmp / "int8-ffn.onnx"
    quantize_dynamic(str(dyn), str(int8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=act, per_channel=True, reduce_range=True)
    out["int8_excluded_activation_matmuls"] = len(act)

    sessions = {"dynamic, longest": s_dyn, "bert optimizer, longest": _session(str(tmp / "opt.onnx"), cores),
                "int8 weight MatMuls, longest": _session(str(int8), cores)}
    ref = s_dyn.run(None, full)[1].argmax(1)
    out["forms"] = {"fp32": {"n": len(y), "top1": round(100 * float((ref == y).mean()), 2)}}
    for name in ("bert optimizer, longest", "int8 weight MatMuls, longest"):
        pred = sessions[name].run(None, full)[1].argmax(1)
        agree = 100 * float((pred == ref).mean())
        out["forms"][name] = {"n": len(y), "top1": round(100 * float((pred == y).mean()), 2),
                              "agreement_vs_fp32": round(agree, 2), "passes_int8_gate": agree >= GATE}

    bundle_graph = str(Path(bundle) / manifest["models"]["fp32"]["text"])
    fns = {
        "torch eager, fixed": lambda: torch_run(fixed),
        "torch eager, longest": lambda: torch_run(longest),
        "onnxruntime bundle graph, fixed": (lambda s=_session(bundle_graph, cores): s.run(None, fixed)),
        "onnxruntime dynamic, longest": lambda: s_dyn.run(None, longest),
        "onnxruntime bert optimizer, longest": lambda: sessions["bert optimizer, longest"].run(None, longest),
        "onnxruntime int8 weight MatMuls, longest": lambda: sessions["int8 weight MatMuls, longest"].run(None, longest),
        "onnxruntime dynamic, longest, 1 thread": (lambda s=_session(str(dyn), 1): s.run(None, longest)),
        "onnxruntime dynamic, longest, EXTENDED": (lambda s=_session(str(dyn), cores, "EXTENDED"): s.run(None, longest)),
    }
    times = interleaved_ms(fns, rounds, seconds)
    out["ms"] = {k: round(float(np.median(v)), 3) for k, v in times.items()}

    # Speed-up over PyTorch eager padded the same way (> 1: faster than PyTorch).
    out["speedup_vs_torch_fixed"] = round_ratios(times, "torch eager, fixed")
    out["speedup_vs_torch_longest"] = round_ratios(times, "torch eager, longest")
    return out


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False),
              help="The bundle's training catalog where it is not at the path its manifest records.")
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--seconds", default=0.3, show_default=True, help="Time per configuration per round.")
@click.option("--out", default="bench-results/minilm_text_forms.json", type=click.Path(dir_okay=False), show_default=True)
def main(run_dir, bundle, catalog, batch, rounds, seconds, out) -> None:
    def body():
        r = run(run_dir, bundle, batch, rounds, seconds, catalog)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps({k: r[k] for k in ("tokens", "parity_max_abs_diff", "bert_optimizer_fusions", "forms",
                                                  "speedup_vs_torch_fixed", "speedup_vs_torch_longest")}, indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
