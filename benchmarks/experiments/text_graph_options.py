"""How a bundle's text graph should run at batch 64: whole or cut by rows, and (MiniLM) which graph form.

    python benchmarks/experiments/text_graph_options.py bundles/demo --out benchmarks/results/cpu-2core/text-options/demo.json
    python benchmarks/experiments/text_graph_options.py BUNDLE_MINILM [--catalog CSV] --out benchmarks/results/cpu-2core/text-options/minilm.json

A one-off experiment behind the runtime's text-graph settings (issue 24), kept outside the installed
package. In one process, interleaved rounds, on the bundle's held-out titles:

- sessions: the whole batch on 1 and on all intra-op threads, and the batch cut by rows into one part
  per core run at the same time (`graph_row_parts`), on a 1-thread and on an all-threads session;
- MiniLM only, graph forms: `onnxruntime.transformers.optimizer.optimize_model(model_type='bert')`, and
  dynamic INT8 of the MatMul weights (per tensor and per channel), each with its top-1 agreement with
  the FP32 graph (the INT8 gate: >= 99%) and its speed relative to the FP32 graph.

Ratios are against the whole batch on all threads (what onnxruntime does by default); spreads are the
range over rounds. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from huse.benchmarks.stats import interleaved_ms
from huse.benchmarks.suite import heldout_titles
from huse.runtime.cli import run_cli


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _cut(session, feed: dict, parts: int, pool: ThreadPoolExecutor):
    """The runner's row cut: parts run at the same time, the calling thread runs the first."""
    n = len(next(iter(feed.values())))
    cuts = np.linspace(0, n, parts + 1).astype(int).tolist()
    feeds = [{k: v[a:b] for k, v in feed.items()} for a, b in zip(cuts, cuts[1:])]
    others = [pool.submit(session.run, None, f) for f in feeds[1:]]
    outs = [session.run(None, feeds[0])] + [f.result() for f in others]
    return [np.concatenate(o) for o in zip(*outs)]


def run(bundle: str, batch: int = 64, rounds: int = 7, seconds: float = 0.3, catalog: str | None = None) -> dict:
    from huse.runtime.bundle import load_manifest

    manifest = load_manifest(Path(bundle))
    text_path = str(Path(bundle) / manifest["models"]["fp32"]["text"])
    encoder = manifest.get("model", {}).get("text_encoder", "cnn")
    cores = os.cpu_count() or 1
    tokenizer, titles, y = heldout_titles(bundle, manifest, catalog)
    feed = {k: v[:batch] for k, v in tokenizer.inputs(titles).items()}
    one, all_ = _session(text_path, 1), _session(text_path, cores)
    pool = ThreadPoolExecutor(cores)
    fns = {f"whole, {cores} threads": lambda: all_.run(None, feed), "whole, 1 thread": lambda: one.run(None, feed),
           f"{cores} parts, 1-thread session": lambda: _cut(one, feed, cores, pool),
           f"{cores} parts, {cores}-thread session": lambda: _cut(all_, feed, cores, pool)}
    out: dict = {"bundle": str(bundle), "text_encoder": encoder, "batch": batch, "cores": cores, "rounds": rounds}
    forms: dict = {}
    if encoder == "minilm":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers.optimizer import optimize_model

        import onnx

        tmp = Path(tempfile.mkdtemp())
        opt = optimize_model(text_path, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        out["bert_optimizer_fusions"] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(tmp / "opt.onnx"))
        forms["bert optimizer"] = str(tmp / "opt.onnx")
        graph = onnx.load(text_path)
        weights = {i.name for i in graph.graph.initializer}
        act = [n.name for n in graph.graph.node if n.op_type == "MatMul" and not any(x in weights for x in n.input)]
        for name, per_channel in (("int8 dynamic, per tensor", False), ("int8 dynamic, per channel", True)):
            dst = tmp / f"int8-{per_channel}.onnx"  # activation x activation MatMuls (attention) stay float
            quantize_dynamic(text_path, str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=act, per_channel=per_channel)
            forms[name] = str(dst)
        full = tokenizer.inputs(titles)
        ref = all_.run(None, full)[1].argmax(1)
        out["forms"] = {"fp32": {"n": len(y), "top1": round(100 * float((ref == y).mean()), 2)}}
        for name, path in forms.items():
            s = _session(path, cores)
            pred = s.run(None, full)[1].argmax(1)
            out["forms"][name] = {"n": len(y), "top1": round(100 * float((pred == y).mean()), 2),
                                  "agreement_vs_fp32": round(100 * float((pred == ref).mean()), 2)}
            fns[f"whole, {cores} threads, {name}"] = lambda s=s: s.run(None, feed)
    times = interleaved_ms(fns, rounds, seconds)
    base = np.asarray(times[f"whole, {cores} threads"])
    out["ms"] = {k: round(float(np.median(v)), 4) for k, v in times.items()}
    out["vs_whole_all_threads"] = {k: {"median": round(float(np.median(np.asarray(v) / base)), 3),
                                       "range": [round(float(np.min(np.asarray(v) / base)), 3),
                                                 round(float(np.max(np.asarray(v) / base)), 3)]}
                                   for k, v in times.items()}
    pool.shutdown()
    return out


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False),
              help="The bundle's training catalog where it is not at the path its manifest records.")
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--seconds", default=0.3, show_default=True, help="Time per configuration per round.")
@click.option("--out", default="bench-results/text_graph_options.json", type=click.Path(dir_okay=False), show_default=True)
def main(bundle, catalog, batch, rounds, seconds, out) -> None:
    def body():
        r = run(bundle, batch, rounds, seconds, catalog)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps(r["vs_whole_all_threads"], indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
