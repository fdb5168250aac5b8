"""Equivalent rewrites of the exported word-CNN text graph, timed against it (issue 24, item 3).

    python benchmarks/experiments/word_cnn_graph_forms.py bundles/demo \\
        --out benchmarks/results/cpu-2core/text-options/word_cnn_graph_forms.json

A one-off experiment behind the title-only figures, kept outside the installed package. The bundle's
text.onnx (export's `FoldedWordCNN`) looks up each kernel tap in its own table (three Gathers over Slices
of the padded ids), adds the three lookups (two Adds), takes the max over positions, then three Gemms; the
embedding is L2-normalised as torch exports `F.normalize` (ReduceL2, Clip, Shape, Expand, Div). With one
intra-op thread at batch 64 onnxruntime's profiler puts about 43% of the graph in the Gathers, Adds and
ReduceMax and 44% in the Gemms, which run near the core's float32 peak. Rewrites of the first part, each
the same function:

- "normalise without Expand": Div broadcasts the (N, 1) norm itself; Shape and Expand go;
- "Sum of the taps": one three-input Sum instead of two Adds (one pass over the lookups);
- "one stacked Gather": the three tables stacked into one, the window of each position gathered from the
  padded ids with each tap's offset added, one Gather to (N, positions, taps, C), ReduceSum over the taps.

Each form's session has one intra-op thread (the runtime's for this graph), spinning off; one batch of the
bundle's held-out titles; --rounds interleaved rounds of --calls calls each; p50 per form and its ratio to
the exported graph's in the same round (median and range). Outputs are checked against the exported graph.
Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from huse.benchmarks.suite import BenchData
from huse.runtime import Classifier
from huse.runtime.cli import run_cli


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _replace_nodes(model, nodes) -> None:
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _taps(model) -> list:
    """The tap lookups: Gather nodes over a 2-D table initializer, in tap order (their Slice's start)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    taps = []
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            window = producer[n.input[1]]
            if window.op_type != "Slice":
                raise click.ClickException(f"{n.name}: expected its ids from a Slice; is this an exported word-CNN graph?")
            taps.append((int(numpy_helper.to_array(inits[window.input[1]])[0]), n, window))
    if len(taps) < 2:
        raise click.ClickException("no tap lookups found: the bundle's text graph is not the folded word CNN")
    return [(n, window) for _, n, window in sorted(taps, key=lambda t: t[0])]


def _tap_sum_nodes(model, taps) -> tuple[list, str]:
    """The Add nodes that sum the taps' lookups, and the name of their final output."""
    gathered = {n.output[0] for n, _ in taps}
    adds, seen = [], set(gathered)
    for n in model.graph.node:
        if n.op_type == "Add" and all(i in seen for i in n.input):
            adds.append(n)
            seen.add(n.output[0])
    if len(adds) != len(taps) - 1:
        raise click.ClickException(f"expected {len(taps) - 1} Adds over the tap lookups, found {len(adds)}")
    return adds, adds[-1].output[0]


def without_expand(model):
    """Div by the (N, 1) norm directly: the Shape and Expand that torch's F.normalize export adds go."""
    m = _copy(model)
    expand = next((n for n in m.graph.node if n.op_type == "Expand"), None)
    if expand is None:
        raise click.ClickException("the graph has no Expand to remove")
    shape_out = expand.input[1]
    nodes = []
    for n in m.graph.node:
        if n is expand or (n.op_type == "Shape" and n.output[0] == shape_out):
            continue
        n.input[:] = [expand.input[0] if i == expand.output[0] else i for i in n.input]
        nodes.append(n)
    _replace_nodes(m, nodes)
    return m


def summed_taps(model):
    """One Sum over the taps' lookups instead of a chain of Adds."""
    from onnx import helper

    m = _copy(model)
    taps = _taps(m)
    adds, out = _tap_sum_nodes(m, taps)
    drop = {id(a) for a in adds}
    nodes = [n for n in m.graph.node if id(n) not in drop]
    nodes.append(helper.make_node("Sum", [n.output[0] for n, _ in taps], [out], name="taps_sum"))
    _replace_nodes(m, _toposort(nodes, m))
    return m


def stacked_gather(model):
    """The taps' tables stacked: window ids (N, positions, taps) with each tap's offset, one Gather, ReduceSum."""
    from onnx import helper, numpy_helper

    m = _copy(model)
    taps = _taps(m)
    adds, out = _tap_sum_nodes(m, taps)
    inits = {i.name: i for i in m.graph.initializer}
    tables = [numpy_helper.to_array(inits[n.input[0]]) for n, _ in taps]
    rows, k = tables[0].shape[0], len(tables)
    padded = taps[0][1].input[0]  # the Slices cut windows out of the padded ids
    positions = int(numpy_helper.to_array(inits[taps[0][1].input[2]])[0]) - int(numpy_helper.to_array(inits[taps[0][1].input[1]])[0])
    m.graph.initializer.extend([
        numpy_helper.from_array(np.concatenate(tables), "stacked_tables"),
        numpy_helper.from_array((np.arange(positions)[:, None] + np.arange(k)[None, :]).astype(np.int64), "window_positions"),
        numpy_helper.from_array((np.arange(k) * rows).astype(np.int32), "tap_offsets"),
        numpy_helper.from_array(np.array([2], np.int64), "tap_axis")])
    drop = {id(a) for a in adds} | {id(n) for t in taps for n in t}
    nodes = [n for n in m.graph.node if id(n) not in drop] + [
        helper.make_node("Gather", [padded, "window_positions"], ["windows"], axis=1),
        helper.make_node("Add", ["windows", "tap_offsets"], ["stacked_ids"]),
        helper.make_node("Gather", ["stacked_tables", "stacked_ids"], ["lookups"], axis=0),
        helper.make_node("ReduceSum", ["lookups", "tap_axis"], [out], keepdims=0)]
    _replace_nodes(m, _toposort(nodes, m))
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _toposort(nodes, model) -> list:
    """`nodes` in an order where every input is produced before it is read."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise click.ClickException(f"cannot order the rewritten graph: {[n.name for n in rest][:3]} wait on missing inputs")
        pending = rest
    return ordered


FORMS = {"exported, again (control)": _copy, "normalise without Expand": without_expand, "Sum of the taps": summed_taps, "one stacked Gather": stacked_gather}


def run(bundle: str, batch: int, rounds: int, calls: int) -> dict:
    import onnx
    import onnxruntime as ort

    with Classifier(bundle) as clf:
        if clf.manifest["model"].get("text_encoder", "cnn") != "cnn":
            raise click.ClickException(f"{bundle} has a {clf.manifest['model']['text_encoder']} text encoder; this compares word-CNN graphs")
        with tempfile.TemporaryDirectory() as tmp:
            _, titles, feeds = BenchData(clf.manifest, clf, batch, Path(tmp)).take(0, batch)
        feed = {"input_ids": feeds["input_ids"]}
    exported = onnx.load(str(Path(bundle) / clf.manifest["models"]["fp32"]["text"]))
    models = {"exported": exported, **{name: make(exported) for name, make in FORMS.items()}}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    for name, m in models.items():
        onnx.checker.check_model(m)
        sessions[name] = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = sessions["exported"].run(None, feed)
    diffs = {name: max(float(np.abs(a - b).max()) for a, b in zip(s.run(None, feed), reference)) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = []
            for _ in range(calls):
                a = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - a)
            times[name].append(float(np.median(t)) * 1e6)
    base = np.asarray(times["exported"])
    forms = {}
    for name, t in times.items():
        r = np.asarray(t) / base
        forms[name] = {"p50_us": round(float(np.median(t)), 1), "ratio_to_exported": round(float(np.median(r)), 3),
                       "ratio_range": [round(float(r.min()), 3), round(float(r.max()), 3)], "max_abs_diff": diffs[name]}
    return {"bundle": str(bundle), "batch": batch, "rounds": rounds, "calls_per_round": calls, "intra_op_threads": 1,
            "onnxruntime": ort.__version__, "forms": forms}


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=15, show_default=True)
@click.option("--calls", default=200, show_default=True, help="calls per form and round")
@click.option("--out", default="bench-results/word_cnn_graph_forms.json", type=click.Path(dir_okay=False), show_default=True)
def main(bundle, batch, rounds, calls, out) -> None:
    def body():
        r = run(bundle, batch, rounds, calls)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1) + "\n")
        for name, f in r["forms"].items():
            click.echo(f"{name:28s} p50 {f['p50_us']:8.1f} us  {f['ratio_to_exported']:.3f}x the exported graph's time "
                       f"({f['ratio_range'][0]:.3f}-{f['ratio_range'][1]:.3f}), max |diff| {f['max_abs_diff']:.2g}")
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
