"""MiniLM with the padding removed inside the graph (issue 24's MiniLM bar): tokens, MACs, parity, speed.

    python benchmarks/experiments/minilm_unpadded.py RUN BUNDLE [--catalog CSV] [--titles-dataset fashion-products-open]
        --out benchmarks/results/cpu-2core/text-options/minilm_unpadded.json

RUN is a MiniLM training run, BUNDLE its bundle exported by this version (text.onnx computes only the
real tokens: `MiniLM.without_padding`). A one-off experiment kept outside the installed package. In one
process, on the bundle's held-out titles (the test split of its catalog), in batches of `--batch`:

1. Tokens and MACs (no timing; these hold on any machine). Per batch: the real tokens T, the width of
   the batch padded to its longest title exactly (what a Hugging Face user gets from `padding=True`) and
   rounded up to the bundle's `pad_multiple` (what the runtime feeds), and the MatMul multiply-adds of
   MiniLM's 6 layers: row-wise (Q/K/V, attention output, the FFN: 4 D^2 + 2 D I per token and layer,
   nearly all of them) on N x width rows when padded, on T rows unpadded; the attention scores and
   context (2 N width^2 D per layer) padded in both. `--titles-dataset` counts a second title set too
   (fashion-products-open's test titles, through the bundle's tokenizer).
2. Parity (fp32): the padded graph (MiniLM as trained, what bundles shipped before) and the unpadded one,
   both exported here from RUN with a dynamic length, against torch eager at several widths.
3. Speed, provisional: thread CPU time (`time.thread_time`) in interleaved rounds, everything on one
   intra-op thread on the calling thread (torch 1 thread, onnxruntime 1 intra-op thread, tokenizers'
   own parallelism off), so other load on the machine disturbs it least. Model only at batch `--batch`:
   torch eager padded to the exact longest, onnxruntime padded graph at the runtime's width, unpadded
   graph at the runtime's width and at the exact longest; end to end: `classify(titles, mode="text")`
   through BUNDLE against huse-bench's PyTorch eager baseline (TorchClassifier). Ratios are the median
   over rounds of (PyTorch / this), with their range. The figures that count come from `huse-bench`
   on an idle machine.
4. Wall clock on every core, model only at batch `--batch` (meaningful on an idle machine only): torch
   eager on all cores, the unpadded graph whole on an all-core session (what the runtime runs), and cut
   by rows into one part per core run at the same time on a 1-thread session (`graph_row_parts`' way for
   the word CNN): the unpadded graph's ops around its Gemms run on one thread per session, so the parts
   may scale better than the whole batch.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenise on the calling thread (thread CPU time)

from huse.benchmarks.stats import interleaved_ms, round_ratios  # noqa: E402
from huse.benchmarks.suite import heldout_titles  # noqa: E402
from huse.runtime.cli import run_cli  # noqa: E402
from huse.runtime.tokenizer import load_tokenizer  # noqa: E402


def token_counts(tokenizer, titles: list[str], batch: int, cfg) -> dict:
    """Real and padded tokens and MiniLM's MatMul MACs per batch of `batch` titles.

    Args:
        tokenizer: the bundle's WordPieceTokenizer (pad "longest"; its pad_multiple is the runtime's).
        titles: normalised titles, in the order batches are taken.
        batch: titles per batch (a last short batch is left out).
        cfg: MiniLMConfig (hidden size D, intermediate size I, layers).
    Returns:
        Totals over the batches, and per-batch medians of the unpadded / padded ratios.
    """
    exact = load_tokenizer(dict(tokenizer.spec(), pad="longest", pad_multiple=1), tokenizer.tokenizer_file.parent)
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    row_macs = layers * (4 * d * d + 2 * d * inter)  # per token: Q, K, V, attention output; FFN in and out

    def attention_macs(n: int, width: int) -> int:  # QK^T and softmax x V, all heads together
        return layers * 2 * n * width * width * d

    rows = []
    for s in range(0, len(titles) - batch + 1, batch):
        part = titles[s:s + batch]
        t = int(exact.inputs(part)["attention_mask"].sum())
        w_exact, w_runtime = exact.inputs(part)["input_ids"].shape[1], tokenizer.inputs(part)["input_ids"].shape[1]
        rows.append({"real_tokens": t, "width_exact": w_exact, "width_runtime": w_runtime,
                     "macs_padded_exact": batch * w_exact * row_macs + attention_macs(batch, w_exact),
                     "macs_padded_runtime": batch * w_runtime * row_macs + attention_macs(batch, w_runtime),
                     "macs_unpadded_runtime": t * row_macs + attention_macs(batch, w_runtime)})
    if not rows:
        raise click.UsageError(f"fewer than {batch} titles: no full batch to count")
    total = {k: int(sum(r[k] for r in rows)) for k in rows[0]}
    n = len(rows) * batch
    return {
        "batches": len(rows), "batch": batch, "pad_multiple": tokenizer.pad_multiple,
        "tokens_per_title": round(total["real_tokens"] / n, 2),
        "width_exact_median": float(np.median([r["width_exact"] for r in rows])),
        "width_runtime_median": float(np.median([r["width_runtime"] for r in rows])),
        "real_fraction_of_padded_exact": round(total["real_tokens"] / (n * np.mean([r["width_exact"] for r in rows])), 3),
        "real_fraction_of_padded_runtime": round(total["real_tokens"] / (n * np.mean([r["width_runtime"] for r in rows])), 3),
        "gmacs_per_batch": {k: round(total[k] / len(rows) / 1e9, 3) for k in total if k.startswith("macs")},
        "macs_unpadded_over_padded_exact": round(total["macs_unpadded_runtime"] / total["macs_padded_exact"], 3),
        "macs_unpadded_over_padded_runtime": round(total["macs_unpadded_runtime"] / total["macs_padded_runtime"], 3),
        "first_batch": rows[0],
    }


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the runtime's default on CPU
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(run_dir: str, bundle: str, batch: int = 64, rounds: int = 7, seconds: float = 0.3, catalog: str | None = None,
        titles_dataset: str | None = None, widths: tuple[int, ...] = (3, 8, 32)) -> dict:
    import torch

    from huse.benchmarks.suite import TorchClassifier
    from huse.export.graphs import export_onnx, graph_specs, optimize_onnx
    from huse.runtime.bundle import load_manifest
    from huse.runtime.classifier import Classifier
    from huse.train.trainer import load_run

    manifest = load_manifest(Path(bundle))
    if manifest.get("model", {}).get("text_encoder") != "minilm" or manifest["tokenizer"].get("pad") != "longest":
        raise click.UsageError(f"{bundle} is not a MiniLM bundle padded to the longest title; re-export it")
    torch.set_num_threads(1)
    tokenizer, titles, _ = heldout_titles(bundle, manifest, catalog)
    model, cfg = load_run(run_dir)
    mcfg = model.text_encoder.cfg
    out: dict = {"run": str(run_dir), "bundle": str(bundle), "batch": batch, "rounds": rounds,
                 "clock": "thread CPU time, 1 thread (provisional: the figures that count come from huse-bench idle)",
                 "tokens": {"heldout": token_counts(tokenizer, titles, batch, mcfg)}}
    if titles_dataset:
        from huse.runtime.tokenizer import normalise_title
        from huse.train.data import load_builtin

        ds = load_builtin(titles_dataset)
        _, idx = ds.heldout("test", 1000)
        out["tokens"][titles_dataset] = token_counts(tokenizer, [normalise_title(ds.titles[i]) or "" for i in idx],
                                                     batch, mcfg)

    # Both forms of the text graph, exported as the bundle export does (dynamic batch and length).
    spec = graph_specs(model, cfg["fusion"]["image_weight"])["text"]
    exact = load_tokenizer(dict(manifest["tokenizer"], pad_multiple=1), bundle)
    feeds = {"runtime": tokenizer.inputs(titles[:batch]), "exact": exact.inputs(titles[:batch])}
    tmp = Path(tempfile.mkdtemp(prefix="minilm-unpadded-"))
    paths = {"padded": tmp / "text-padded.onnx", "unpadded": tmp / "text-unpadded.onnx"}
    for form, path in paths.items():
        export_onnx(spec["module" if form == "padded" else "export"], feeds["runtime"], spec["inputs"], spec["outputs"],
                    path, dynamic_length=True)
        optimize_onnx(path)
    sessions = {form: _session(path) for form, path in paths.items()}

    def torch_run(feed):
        with torch.inference_mode():
            return spec["module"](*(torch.from_numpy(feed[n]) for n in spec["inputs"]))

    # Parity at several widths: titles cut or padded to `w` tokens (fixed padding), and the mixed batch.
    parity = {}
    for w in widths:
        fixed = load_tokenizer(dict(manifest["tokenizer"], pad="fixed", max_len=w), bundle).inputs(titles[:batch])
        for name, feed in ((f"fixed {w}", fixed),):
            ref = [t.numpy() for t in torch_run(feed)]
            parity[name] = {form: max(float(np.abs(a - b).max()) for a, b in zip(ref, s.run(None, feed)))
                            for form, s in sessions.items()}
    for name, feed in feeds.items():
        ref = [t.numpy() for t in torch_run(feed)]
        parity[f"batch longest ({name})"] = {form: max(float(np.abs(a - b).max()) for a, b in zip(ref, s.run(None, feed)))
                                             for form, s in sessions.items()}
    out["parity_max_abs_diff_vs_torch"] = parity

    text = [t for t in titles[:batch]]
    with Classifier(bundle, backend="onnxruntime", threads=1) as ours, \
            TorchClassifier(bundle, run_dir, threads=1) as base:
        fns = {
            "model: torch eager, exact longest": lambda: torch_run(feeds["exact"]),
            "model: onnxruntime padded graph, runtime width": lambda: sessions["padded"].run(None, feeds["runtime"]),
            "model: onnxruntime unpadded graph, runtime width": lambda: sessions["unpadded"].run(None, feeds["runtime"]),
            "model: onnxruntime unpadded graph, exact longest": lambda: sessions["unpadded"].run(None, feeds["exact"]),
            "e2e: PyTorch eager classify (exact longest)": lambda: base.classify(titles=text, mode="text"),
            "e2e: runtime classify (bundle)": lambda: ours.classify(titles=text, mode="text"),
        }
        times = interleaved_ms(fns, rounds, seconds, clock=time.thread_time)
    out["ms"] = {k: round(float(np.median(v)), 3) for k, v in times.items()}

    # 4. Wall clock on every core.
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    whole, single = _session(paths["unpadded"], cores), _session(paths["unpadded"], 1)
    cuts = np.array_split(np.arange(batch), cores)
    parts = [{k: v[c] for k, v in feeds["exact"].items()} for c in cuts]
    with ThreadPoolExecutor(cores) as pool:
        torch.set_num_threads(cores)
        wall = interleaved_ms({
            "wall: torch eager, all cores": lambda: torch_run(feeds["exact"]),
            "wall: unpadded graph whole, all-core session": lambda: whole.run(None, feeds["exact"]),
            f"wall: unpadded graph in {cores} parts, 1-thread session": lambda: list(
                pool.map(lambda f: single.run(None, f), parts)),
        }, rounds, seconds)
    out["wall_ms"] = {k: round(float(np.median(v)), 3) for k, v in wall.items()}
    times.update(wall)

    def speedups(base_name: str, prefix: str) -> dict:
        return round_ratios(times, base_name, [k for k in times if k.startswith(prefix) and k != base_name])
    out["speedup_vs_torch"] = {**speedups("model: torch eager, exact longest", "model:"),
                               **speedups("e2e: PyTorch eager classify (exact longest)", "e2e:"),
                               **speedups("wall: torch eager, all cores", "wall:")}
    return out


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False),
              help="The bundle's training catalog where it is not at the path its manifest records.")
@click.option("--titles-dataset", default=None, help="Also count the test titles of this built-in dataset "
              "(e.g. fashion-products-open) through the bundle's tokenizer.")
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--seconds", default=0.3, show_default=True, help="Thread CPU time per configuration per round.")
@click.option("--out", default="bench-results/minilm_unpadded.json", type=click.Path(dir_okay=False), show_default=True)
def main(run_dir, bundle, catalog, titles_dataset, batch, rounds, seconds, out) -> None:
    def body():
        r = run(run_dir, bundle, batch, rounds, seconds, catalog, titles_dataset)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps({k: r[k] for k in ("tokens", "parity_max_abs_diff_vs_torch", "ms", "wall_ms",
                                                  "speedup_vs_torch")},
                              indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
