"""Whether a fused batch's image and text branches should run at the same time (issue 24, item 2).

    python benchmarks/experiments/fused_branches.py bundles/demo --out benchmarks/results/cpu-2core/fused-branches/demo.json
    python benchmarks/experiments/fused_branches.py BUNDLE_MINILM --out benchmarks/results/cpu-2core/fused-branches/minilm.json

A one-off experiment behind the runtime's fused-graph session settings, kept outside the installed
package. The fused graph holds two branches that meet only at the end (the image backbone and tower,
the text encoder and tower) and the runtime runs it with onnxruntime's sequential executor, each node
on all intra-op threads. onnxruntime's parallel executor (`ExecutionMode.ORT_PARALLEL`) runs
independent nodes at once on its inter-op threads. In one process, interleaved rounds, the fused graph
of each precision on real held-out products (photos preprocessed, titles tokenised as classify does),
at each batch size:

- sequential, all intra-op threads (the runtime's setting: the baseline of every ratio);
- parallel, 2 inter-op threads, all intra-op threads;
- parallel, 2 inter-op threads, 1 intra-op thread (each branch on a core of its own).

It also checks that every setting gives the baseline's probabilities (max abs difference). Ratios are
baseline time / setting time (> 1: the setting is faster), median and range over rounds. Timings are
only meaningful on a quiet machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
import numpy as np

from huse.benchmarks.stats import interleaved_ms, round_ratios
from huse.benchmarks.suite import BenchData
from huse.runtime import Classifier
from huse.runtime.cli import run_cli

BASE = "sequential, all threads"


def _session(path: Path, inter: int = 0, intra: int | None = None):
    """The runtime's session for the graph (`OnnxrtRunner`: ORT_ENABLE_ALL, all intra-op threads, the
    sequential executor) when `inter` is 0; else the same options with the parallel executor."""
    from huse.runtime.backends.onnxrt.runner import OnnxrtRunner

    if not inter:
        runner = OnnxrtRunner(path, device="cpu")
        runner.activate()
        return runner.session
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.inter_op_num_threads = inter
    if intra:
        opts.intra_op_num_threads = intra
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(bundle: str, batches=(1, 64), precisions=("fp32", "int8-cpu"), rounds: int = 7, seconds: float = 0.3) -> dict:
    cores = os.cpu_count() or 1
    clf = Classifier(bundle)
    manifest = clf.manifest
    out: dict = {"bundle": str(bundle), "text_encoder": manifest.get("model", {}).get("text_encoder", "cnn"),
                 "cores": cores, "rounds": rounds, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = BenchData(manifest, clf, max(batches), Path(tmp))
        for precision in precisions:
            if precision not in manifest["models"] or precision == "fp16":
                continue  # fp16 runs on a CPU as the fp32 graph with other weights: the fp32 row says it
            path = Path(bundle) / manifest["models"][precision]["fused"]
            inputs = manifest["graphs"]["fused"]["inputs"]
            sessions = {BASE: _session(path),
                        "parallel, 2 inter-op, all intra-op threads": _session(path, inter=2),
                        "parallel, 2 inter-op, 1 intra-op thread": _session(path, inter=2, intra=1)}
            for batch in batches:
                _, _, feeds = data.take(0, batch)
                feed = {k: feeds[k] for k in inputs}
                ref = sessions[BASE].run(None, feed)
                diff = {name: max(float(np.abs(a - b).max()) for a, b in zip(ref, s.run(None, feed)))
                        for name, s in sessions.items()}
                fns = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
                times = interleaved_ms(fns, rounds, seconds)
                out["results"][f"{precision}, batch {batch}"] = {
                    "ms": {k: round(float(np.median(v)), 4) for k, v in times.items()},
                    "speedup_vs_sequential": round_ratios(times, BASE),
                    "max_abs_diff_vs_sequential": diff}
    clf.close()
    return out


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--batches", default="1,64", show_default=True)
@click.option("--precisions", default="fp32,int8-cpu", show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--seconds", default=0.3, show_default=True, help="Time per configuration per round.")
@click.option("--out", default="bench-results/fused_branches.json", type=click.Path(dir_okay=False), show_default=True)
def main(bundle, batches, precisions, rounds, seconds, out) -> None:
    def body():
        r = run(bundle, tuple(int(b) for b in batches.split(",")), tuple(precisions.split(",")), rounds, seconds)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps({k: v["speedup_vs_sequential"] for k, v in r["results"].items()}, indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
