"""`huse`: one click group; each command parses, calls one library function, prints.

Subcommands from other stages (train, export, bench, data) are imported only when run, so
`huse --help` and `huse classify` work with just the lean runtime installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import click

from huse.runtime.errors import HuseError


def run_cli(fn: Callable[[], None]) -> None:
    """Run a command body; a HuseError becomes one line on stderr and exit code 1."""
    try:
        fn()
    except HuseError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def _extra_line(name: str, extra: str, err: BaseException | None = None) -> str:
    found = f" ({type(err).__name__}: {err})" if err is not None else ""
    return f"`huse {name}` needs the {extra} extra{found}; pip install 'huse-edge[{extra}]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when used (the click docs' LazyGroup).

    Each lazy command names the extra it needs and a module that extra installs. An ImportError
    while loading or running the command (e.g. `huse train` without torch) becomes one line that
    names the extra, exit code 1; `--help` still works and says when the extra is missing.

    Args:
        lazy: command name -> (module:attr, extra, module the extra installs or None, help).
    """

    def __init__(self, *args, lazy: dict[str, tuple[str, str, str | None, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(list(super().list_commands(ctx)) + list(self.lazy))

    def get_command(self, ctx: click.Context | None, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        target, extra, probe, help_text = self.lazy[name]
        module, attr = target.split(":")
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            if (e.name or "").startswith("huse"):  # our own module is missing: a bug, not an extra
                raise

            @click.command(name=name, help=f"{help_text}. {_extra_line(name, extra)}.", context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def cmd(args, _e=e):
                click.echo(f"error: {_extra_line(name, extra, _e)}", err=True)
                sys.exit(1)
            return cmd
        if probe is not None and not _installed(probe) and "not installed here" not in (cmd.help or ""):
            cmd.help = f"{_extra_line(name, extra)} (not installed here: {probe} is missing).\n\n{cmd.help or ''}"
        invoke = cmd.invoke

        def guarded(ctx: click.Context):  # the stage imports its heavy modules only when it runs
            try:
                return invoke(ctx)
            except ImportError as e:
                if (e.name or "").startswith("huse"):
                    raise
                click.echo(f"error: {_extra_line(name, extra, e)}", err=True)
                sys.exit(1)
        cmd.invoke = guarded
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, lazy={
    "train": ("huse.train.cli:main", "train", "torch", "Train a HUSE model"),
    "export": ("huse.export.cli:main", "export", "onnx", "Export a run to an ONNX bundle"),
    "bench": ("huse.benchmarks.cli:main", "bench", "psutil", "Benchmark a bundle"),
    "data": ("huse.train.cli:data", "train", None, "Built-in datasets"),  # Fashion-MNIST to PNGs: numpy + Pillow
    "doctor": ("huse.runtime.doctor:main", "bench,export", None, "Check the environment; --gpu runs the GPU acceptance"),
})
@click.option("-v", "--verbose", is_flag=True, help="Log backend choices and progress.")
def main(verbose: bool) -> None:
    """huse-edge: HUSE multimodal product classification, from training to the edge."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _bulk_options(fn):
    """The options `huse classify` and `huse embed` share (one copy, applied to both)."""
    options = [
        click.argument("bundle", type=click.Path(file_okay=False)),
        click.option("--data", "data", type=click.Path(),
                     help="Products CSV, JSONL or Parquet with image and/or name columns.  [required]"),
        click.option("--images", type=click.Path(file_okay=False), help="Folder image paths resolve against (default: the file's folder)."),
        click.option("--encoding", help="Text encoding of a CSV/JSONL catalog (default UTF-8; e.g. latin-1, cp1252, utf-16)."),
        click.option("--confine-images", is_flag=True,
                     help="For catalogs from third parties: refuse image paths that are absolute, contain '..' or "
                          "resolve through a link outside --images (default: the catalog's folder); such a row gets "
                          "an error naming it and its image is never read. Off by default: your own catalog may name "
                          "images anywhere."),
        click.option("--out", type=click.Path(),
                     help="Output folder of shards + _manifest.json (+ _SUCCESS when complete); classify also takes one file: .jsonl, or .csv (a flat row per product, for spreadsheets).  [required]"),
        click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default="parquet", help="Shard file format."),
        click.option("--backend", default="auto", help="auto, onnxruntime or tensorrt."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-cpu"]), default="fp32",
                     help="int8: TensorRT's Q/DQ form; int8-cpu: onnxruntime on CPUs only (faster there)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), help="onnxruntime device (default: what --backend picks)."),
        click.option("--batch-size", default=64, help="Items per model call."),
        click.option("--shard-rows", default=10_000, help="Rows per output shard: the unit of --resume and of Ray work."),
        click.option("--threads", type=int, help="onnxruntime intra-op threads (default: all cores; per actor with Ray: 1)."),
        click.option("--workers", type=int, help="Threads preparing the next batches (decode, tokenise) and describing "
                     "finished ones while the model runs (default: sized with --threads to the cores; 0: no pool; "
                     "Ray actors: 0 on CPU, 1 with --device cuda)."),
        click.option("--prepare-priority", type=click.Choice(["normal", "idle"]), default="normal",
                     help="Priority of the --workers threads. idle (Linux SCHED_IDLE): they run only on cores "
                     "onnxruntime leaves; for a machine doing nothing else, as they starve when other "
                     "processes want the cores."),
        click.option("--spin/--no-spin", default=False, help="onnxruntime thread spinning (off: it costs far more than it gains when cores are shared)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run: finished shards are verified and kept."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", help="local threads, or Ray Data actors."),
        click.option("--address", help="Ray cluster to join (--engine ray): HOST:PORT of its head's GCS, or auto for the one this node "
                     "belongs to; default: a new local Ray instance. Not ray:// (Ray Data does not run over Ray Client)."),
        click.option("--actors", default=2, help="Ray actors, one Classifier each (--engine ray)."),
        click.option("--max-error-rate", default=0.05, help="Exit 1 when more than this fraction of rows failed."),
        click.option("--progress/--no-progress", default=True, help="Progress bar on stderr."),
        click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
                     help="Ed25519 public key (PEM, repeatable): refuse the bundle unless its manifest is signed by one."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@main.command(context_settings={"show_default": True})
@_bulk_options
@click.option("--mode", type=click.Choice(["auto", "fused", "image", "text"]), default="auto", help="Which inputs to use.")
@click.option("--top-k", default=5, help="Leaf classes per prediction.")
@click.option("--min-confidence", default=0.0, help="Mark predictions whose top-1 score is below this `needs_review` (kept, not dropped); "
                                                 "multi-label bundles mark each label, and the row if any label is below.")
@click.option("--show", default=0, help="Also print the first N predictions.")
@click.option("--image", "one_image", type=click.Path(dir_okay=False),
              help="Instead of --data and --out: classify this one photo (with --title, or alone) and print the answer.")
@click.option("--title", "one_title", help="Instead of --data and --out: classify this one title (with --image, or alone).")
@click.option("--json", "as_json", is_flag=True, help="With --image/--title: print the answer as one JSON line.")
def classify(show, one_image, one_title, as_json, **kw) -> None:
    """Classify every product in a catalog; bad rows get an `error`, never dropped.

    Streams the catalog, decodes images in a thread pool while the model runs, writes sharded
    output and resumes after a kill (--resume). Or one product: --image and/or --title.
    """
    if one_image is not None or one_title is not None:
        run_cli(lambda: _classify_one(one_image, one_title, as_json, **kw))
    else:
        run_cli(lambda: _bulk("classify", show=show, as_json=as_json, **kw))


def _classify_one(image, title, as_json, *, bundle, data, out, backend, precision, device, threads, trusted_keys, mode,
                  top_k, min_confidence, **_bulk_only) -> None:
    """`huse classify BUNDLE --image X --title T`: one product, answered on stdout (no output files)."""
    from huse.runtime.bulk import prediction_fields
    from huse.runtime.classifier import Classifier

    if data is not None or out is not None:
        raise HuseError("give --image/--title for one product, or --data and --out for a catalog, not both")
    if not 0.0 <= min_confidence <= 1.0:
        raise HuseError(f"--min-confidence must be between 0 and 1; got {min_confidence}")
    with Classifier(bundle, backend=backend, precision=precision, device=device, threads=threads,
                    trusted_keys=list(trusted_keys) or None) as clf:
        res = clf.classify(images=None if image is None else [image], titles=None if title is None else [title],
                           top_k=top_k, mode=mode)[0]
    row = {"image": image, "name": title, **({"error": res["error"]} if "error" in res
                                            else prediction_fields(res, min_confidence))}
    if "warning" in res:
        row["warning"] = res["warning"]
    if as_json:  # the error too: a script reads one JSON line either way (and the exit code)
        click.echo(json.dumps(row, ensure_ascii=False))
    if "error" in row:
        raise HuseError(row["error"])
    if not as_json:
        click.echo(_describe_row(row, None, head=" ".join(x for x in (image, repr(title) if title else None) if x)))
        click.echo("  top-k: " + ", ".join(f"{t['label']} {t['score']:.2f}" for t in row["top_k"]))
    if row.get("warning"):
        click.echo(f"warning: {row['warning']}", err=True)


@main.command(context_settings={"show_default": True})
@_bulk_options
@click.option("--mode", type=click.Choice(["auto", "image", "text", "index"]), default="auto",
              help="auto: the image's embedding, else the title's (with a warning). index: every vector an index "
                   "holds (image, text, visual), for `huse index build --embeddings`.")
def embed(**kw) -> None:
    """Universal embeddings of every product in a catalog: .npy shards + a metadata table per shard."""
    run_cli(lambda: _bulk("embed", **kw))


def _bulk(task, *, bundle, data, images, encoding, confine_images, out, fmt, backend, precision, device, batch_size, shard_rows,
          threads, workers, prepare_priority, spin, resume, engine, address, actors, max_error_rate, progress, mode,
          trusted_keys=(),
          top_k=5, min_confidence=0.0, show=0, as_json=False) -> None:
    from huse.runtime.bulk import BulkJob, run_bulk

    if as_json:
        raise HuseError("--json is for one product (--image/--title); a catalog's answers go to --out")

    if data is None or out is None:
        raise HuseError(f"huse {task} needs --data CATALOG and --out"
                        + (" (or --image and/or --title for one product)" if task == "classify" else ""))
    if not 0.0 <= max_error_rate <= 1.0:
        raise HuseError(f"--max-error-rate must be between 0 and 1; got {max_error_rate}")
    job = BulkJob(bundle=bundle, data=data, out=out, task=task, images=images, encoding=encoding,
                  confine_images=confine_images, mode=mode,
                  top_k=top_k, min_confidence=min_confidence, batch_size=batch_size, shard_rows=shard_rows, format=fmt,
                  precision=precision, backend=backend, device=device, threads=threads, spinning=spin,
                  workers=workers, prepare_priority=prepare_priority, engine=engine, address=address, actors=actors,
                  resume=resume, progress=progress,
                  trusted_keys=tuple(trusted_keys))
    try:
        r = run_bulk(job)
    except KeyboardInterrupt:  # Ctrl+C: the finished shards are kept, say how to go on (not click's "Aborted!")
        click.echo(f"\ninterrupted: the finished shards are kept; run the same command with --resume to go on "
                   f"from them", err=True)
        sys.exit(130)
    verb = "classified" if task == "classify" else "embedded"
    how = f"with {r.backend}" if r.backend else "(complete already: nothing to redo)"
    msg = (f"{verb} {r.classified}/{r.rows} rows {how} -> {r.out}; {r.errors} with errors, "
           f"{r.warnings} with warnings")
    if task == "classify" and min_confidence > 0:
        msg += f", {r.needs_review} need review (top-1, or with a multi-label bundle any label, < {min_confidence})"
    if r.shards_resumed:
        msg += f"; {r.shards_resumed} of {r.shards} shards kept from the interrupted run"
    if r.shards_retried:
        msg += f"; {r.shards_retried} shards retried"
    if r.rows_done_now:
        msg += f"; {r.items_per_s:.0f} items/s"
    if r.known:
        msg += f"; top-1 accuracy on rows with classes: {r.right / r.known:.4f}"
    if r.labels_given:  # a multi-label bundle: how its label sets match the rows' classes
        msg += (f"; label sets: micro-F1 {2 * r.labels_right / (r.labels_predicted + r.labels_given):.4f} "
                f"(precision {r.labels_right / max(r.labels_predicted, 1):.4f}, recall {r.labels_right / r.labels_given:.4f})")
    if r.unknown_classes:
        msg += (f"; {r.unknown_classes} rows have classes the bundle does not have (left out of the accuracy: "
                "another taxonomy, or classes it was not trained on)")
    click.echo(msg)
    if not r.rows:  # a delta feed may be empty; a truncated export is too, so say so
        click.echo(f"warning: catalog {data} has no rows; the output is empty", err=True)
    _warn_unusable_images(r.image_failures, r.rows, r.first_image_error)
    if show > 0 and task == "classify":
        for row in _first_rows(r.out, show):
            click.echo(_describe_row(row, row.get("classes")))
    if r.rows and r.errors / r.rows > max_error_rate:
        raise HuseError(f"{r.errors} of {r.rows} rows failed ({100 * r.errors / r.rows:.1f}% > --max-error-rate "
                        f"{100 * max_error_rate:g}%); see their 'error' field in {r.out}")


def _first_rows(out, n: int) -> list[dict]:
    """The first n rows of a classify output (a JSONL or CSV file, or a shard folder), read no further than them."""
    import itertools

    from huse.runtime.bulk import iter_predictions

    return list(itertools.islice(iter_predictions(out), n))


def _describe_row(row: dict, truth: str | None, head: str | None = None) -> str:
    # JSONL rows leave out what a row lacks: a photo-only product has no name (shown by its photo instead)
    head = head or f"row {row['row']}: " + (repr(row["name"]) if row.get("name") else row.get("image") or "(no title)")
    if row.get("error"):
        return f"{head} -> error: {row['error']}"
    best = row["top_k"][0]
    path = " > ".join(f"{p['label'].split('<')[-1]} {p['score']:.2f}" for p in row["path"])
    if row.get("labels"):  # multi-label bundle: every predicted class
        chosen = ", ".join(f"{x['label']} {x['score']:.2f}" + (" (review)" if x.get("needs_review") else "")
                           for x in row["labels"])
        return f"{head} -> {chosen} ({row['mode']})" + (f"  truth: {truth}" if truth else "")
    return f"{head} -> {best['label']} ({best['score']:.2f}, {row['mode']}) [{path}]" + (f"  truth: {truth}" if truth else "")


@main.command()
@click.argument("stem", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing keypair.")
def keygen(stem, force) -> None:
    """Write an Ed25519 keypair STEM.key (private, 0600) + STEM.pub for signed bundles."""
    def body():
        from huse.runtime.signing import write_keypair

        priv, pub = write_keypair(stem, force=force)
        click.echo(f"wrote {priv} (private: keep it on the build machine; `huse-export BUNDLE --sign {priv}`) "
                   f"and {pub} (public: give it to devices; `huse classify --trusted-key {pub}`)")
    run_cli(body)


def _spread(values: list[float]) -> str:
    """One mode's per-class thresholds: the value they share, or their range."""
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g} ({len(set(values))} values over {len(values)} classes)"


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM, repeatable): refuse the bundle unless its manifest is signed by one.")
def info(bundle, trusted_keys) -> None:
    """Show what a bundle holds (and verify its files and, with --trusted-key, its signature)."""
    def body():
        from huse.runtime.bundle import check_bundle_graphs, is_multi_label, load_manifest
        from huse.runtime.files import MANIFEST
        from huse.runtime.signing import describe_signature

        m = load_manifest(bundle, trusted_keys=list(trusted_keys) or None)
        graphs = check_bundle_graphs(bundle, m)
        task = " (multi-label: every class above its threshold)" if is_multi_label(m) else ""
        click.echo(f"bundle {bundle}: {len(m['labels'])} classes{task}, embedding dim {m['embedding_dim']}")
        click.echo(f"precisions: {', '.join(sorted(m['models']))}; engines: {len(m.get('engines', []))}")
        click.echo(f"image input {m['preprocessing']['size']}, tokenizer {m['tokenizer']['type']}, "
                   f"fusion image weight {m['fusion']['image_weight']}")
        if is_multi_label(m):  # scores are per-class sigmoids read against thresholds; no temperature applies
            # bundles exported before the manifest said where: the training run's choice, val or its folds
            tuned = m["multilabel"].get("tuned_on")
            click.echo(f"thresholds ({f'tuned on {tuned}' if tuned else 'tuned by training'}; a class is given at or "
                       "above its own): " + ", ".join(f"{mode} {_spread(t)}" for mode, t in m["multilabel"]["thresholds"].items()))
        elif temps := m.get("calibration", {}).get("temperature", {}):
            fitted = m["calibration"].get("fitted_on")
            click.echo(f"calibration temperatures ({f'fitted on {fitted}' if fitted else 'fitted by training'}): "
                       + ", ".join(f"{k} {v:g}" for k, v in temps.items()))
        # the gate's figures (export/precision.py): a multi-label bundle's compare label sets, by micro-F1
        agreement, score = (("label-set agreement (mean Jaccard)", "micro-F1") if is_multi_label(m)
                            else ("top-1 agreement", "top-1"))
        for p, acc in m.get("accuracy", {}).items():  # the whole record is in manifest.json
            modes = acc.get("modes", {})
            figures = ", ".join(f"{mode} {modes[mode]['agreement']:.2f}%" for mode in ("fused", "image", "text")
                                if mode in modes)
            fused = modes.get("fused", {})
            click.echo(f"{p}: gate {'passed' if acc.get('passed') else 'FAILED (overridden)'} on {acc.get('n')} "
                       f"{acc.get('split')} items; {agreement} with fp32: {figures}; fused {score} "
                       f"{fused.get('cand_accuracy', float('nan')):.2f}% vs {fused.get('ref_accuracy', float('nan')):.2f}%; "
                       f"size {100 * acc.get('size_ratio_vs_fp32', float('nan')):.1f}% of fp32"
                       # what an index built at this precision finds by photo (--space visual)
                       + (f"; visual vectors: nearest other photo as fp32's for {acc['visual']['nn_agreement']:.2f}%"
                          if "visual" in acc else ""))
        click.echo(f"{len(m['files'])} files verified (sha256); labels match the stamp in {graphs} graphs")
        click.echo(f"signature: {describe_signature(bundle, (Path(bundle) / MANIFEST).read_bytes(), bool(trusted_keys))}")
    run_cli(body)


# -- retrieval: `huse index build|add|remove|info` and `huse search` (issue 10) --------------------------
@main.group("index")
def index_group() -> None:
    """Build, update and inspect a retrieval index (needs `pip install 'huse-edge[index]'`)."""


# `huse index build` and `add`: one copy of the option
_NO_PHOTOS = click.option("--no-photos", "keep_photos", is_flag=True, flag_value=False, default=True,
                          show_default=False,  # "[default: True]" read as if --no-photos were on by default
                          help="Keep no copy of the photos a Parquet catalog holds as bytes (they are embedded all the "
                               "same; by default the index keeps them, so that the page can show them: as many bytes "
                               "as the photos).")


def _data_or_embeddings(data, embeddings, data_options: tuple[str, ...]) -> None:
    """`huse index build` and `add` take --data or --embeddings; the options that only --data uses are refused
    with --embeddings (they were the huse embed run's to choose)."""
    if (data is None) == (embeddings is None):
        raise HuseError("give the products to index: --data CATALOG (embedded now) or --embeddings FOLDER "
                        "(from huse embed --mode index), one of the two")
    if embeddings is not None:
        ctx = click.get_current_context()
        given = [f"--{p.replace('_', '-')}" for p in data_options
                 if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise HuseError(f"{', '.join(given)} apply to --data; --embeddings were made with the settings huse embed "
                            "was given")


@index_group.command("build", context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(), help="Catalog CSV, JSONL or Parquet (image, name, classes, product_id).")
@click.option("--embeddings", type=click.Path(file_okay=False),
              help="Instead of --data: the output folder of `huse embed BUNDLE --mode index` (run on a Ray cluster, or "
                   "resumed after a crash), read a shard at a time.")
@click.option("--images", type=click.Path(file_okay=False), help="Folder image paths resolve against (default: the file's folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf"]), default="auto",
              help="auto: exact (flat) under 50,000 products, else IVF-SQ8 within --max-memory (cross-modal queries "
                   "are hard on a graph: hnsw only when asked).")
@click.option("--max-memory", default="4G", help="RAM budget for the whole index (photos, titles and visual vectors).")
@click.option("--precision", default="fp32", help="Bundle precision used to embed (fp32, fp16, int8-cpu, ...).")
@click.option("--batch-size", default=64)
@click.option("--threads", type=int, help="onnxruntime and FAISS threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing index directory.")
@click.option("--confine-images", is_flag=True,
              help="For catalogs from third parties: refuse image paths that are absolute, contain '..' or resolve "
                   "through a link outside --images; such a row is left out of the index and listed in "
                   "excluded.jsonl with the reason. Off by default.")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False),
              help="Ed25519 private key (PEM, from `huse keygen`): sign the index manifest (default: unsigned).")
@_NO_PHOTOS
@click.option("--progress/--no-progress", default=True, help="Progress on stderr.")
def index_build(bundle, data, embeddings, images, out, kind, max_memory, precision, batch_size, threads, overwrite,
                confine_images, sign_key, keep_photos, progress) -> None:
    """Embed every product of a catalog with BUNDLE and write a self-describing index directory."""
    def body():
        from huse.runtime.index import Index

        _data_or_embeddings(data, embeddings, ("images", "precision", "batch_size", "confine_images"))
        if embeddings is not None:
            idx = Index.from_embed_output(bundle, embeddings, out, kind=kind, max_memory=max_memory, threads=threads,
                                          overwrite=overwrite, sign_key=sign_key, progress=progress)
        else:
            idx = Index.build(bundle, data, out, images=images, kind=kind, max_memory=max_memory, precision=precision,
                              batch_size=batch_size, threads=threads, overwrite=overwrite, sign_key=sign_key,
                              confine_images=confine_images, keep_photos=keep_photos, progress=progress)
        _echo_index(idx)
        _warn_excluded_images(idx)
    run_cli(body)


@index_group.command("add")
@click.argument("index", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(), help="Catalog CSV, JSONL or Parquet of the products to add.")
@click.option("--embeddings", type=click.Path(file_okay=False),
              help="Instead of --data: the output folder of `huse embed BUNDLE --mode index` (the index's bundle, at "
                   "its precision).")
@click.option("--images", type=click.Path(file_okay=False), help="Folder image paths resolve against.")
@click.option("--bundle", type=click.Path(file_okay=False), help="The index's bundle, if it moved.")
@click.option("--confine-images", is_flag=True,
              help="For catalogs from third parties: refuse image paths that are absolute, contain '..' or resolve "
                   "through a link outside --images; such a row is left out of the index and listed in "
                   "excluded.jsonl with the reason. Off by default.")
@click.option("--replace", is_flag=True,
              help="Update products already in INDEX: their items are removed and the catalog's rows added "
                   "(without it, a catalog with such products is refused).")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False),
              help="Ed25519 private key (PEM): re-sign the updated manifest. Without it a signed index loses its "
                   "signature (trusted-key searches then refuse it until it is re-signed).")
@_NO_PHOTOS
@click.option("--progress/--no-progress", default=True, help="Progress on stderr.")
def index_add(index, data, embeddings, images, bundle, confine_images, replace, sign_key, keep_photos,
              progress) -> None:
    """Add the products of a catalog to INDEX without a rebuild."""
    def body():
        from huse.runtime.index import Index

        _data_or_embeddings(data, embeddings, ("images", "confine_images"))
        idx = Index.open(index, bundle=bundle)
        if embeddings is not None:
            r = idx.add_embed_output(embeddings, sign_key=sign_key, replace=replace, progress=progress)
        else:
            r = idx.add(data, images=images, sign_key=sign_key, confine_images=confine_images, replace=replace,
                        keep_photos=keep_photos, progress=progress)
        click.echo(f"added {r['added']} items ({r['image']} photos, {r['text']} titles; {r['excluded']} left out, "
                   f"listed in {index}/excluded.jsonl)" + (f"; replaced {r['replaced']} items" if replace else ""))
        _warn_excluded_images(idx, first_item=len(idx) - r["added"])  # this add's items are the last ones
        _echo_index(idx)
    run_cli(body)


@index_group.command("remove")
@click.argument("index", type=click.Path(file_okay=False))
@click.option("--product-id", "product_ids", multiple=True, help="A product to remove (repeatable).")
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False),
              help="A text file of products to remove, one product_id per line (a day's discontinued products, "
                   "say); blank lines are skipped.")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False),
              help="Ed25519 private key (PEM): re-sign the updated manifest. Without it a signed index loses its "
                   "signature (trusted-key searches then refuse it until it is re-signed).")
def index_remove(index, product_ids, ids_file, sign_key) -> None:
    """Remove every item of the given products from INDEX (HNSW: tombstones, never returned)."""
    def body():
        from huse.runtime.index import Index

        ids = list(product_ids)
        if ids_file:
            try:
                ids += [line.strip() for line in Path(ids_file).read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise HuseError(f"--ids {ids_file} cannot be read as UTF-8 text ({e})") from None
        if not ids:
            raise HuseError("give the products to remove: --product-id ID (repeatable) or --ids FILE")
        idx = Index.open(index, bundle=None)
        r = idx.remove(ids, sign_key=sign_key)
        click.echo(f"removed {r['removed']} items ({idx.manifest['removal']})")
        if r["unknown"]:
            more = f" and {len(r['unknown']) - 10:,} more" if len(r["unknown"]) > 10 else ""
            click.echo(f"not in the index (or already removed): {', '.join(r['unknown'][:10])}{more}", err=True)
    run_cli(body)


@index_group.command("info")
@click.argument("index", type=click.Path(file_okay=False))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM, repeatable): refuse the index (and its bundle) unless signed by one.")
def index_info(index, trusted_keys) -> None:
    """Show what INDEX holds and verify every file."""
    def body():
        from huse.runtime.index import Index

        idx = Index.open(index, bundle=None, trusted_keys=list(trusted_keys) or None)
        n = idx.verify_all()
        _echo_index(idx)
        click.echo(f"{n} files verified (sha256)" + (", manifest signature verified" if trusted_keys else ""))
    run_cli(body)


# `huse search --out hits.csv`: a row per hit (rank 1..k of each query), for spreadsheets; a query without hits or
# with an error is one row. `--out hits.jsonl` (any other name): one JSON object per query.
HITS_CSV = ("query", "text", "image", "rank", "score", "product_id", "row", "name", "hit_image", "classes", "modality",
            "item", "error")


# --out names of formats huse search does not write: refused, not filled with JSON Lines under that name.
NOT_HITS = (".parquet", ".pq", ".xlsx", ".xls", ".ods", ".tsv")


def _check_hits_out(out: Path, batch: str | None) -> None:
    """`huse search --out` replaces only earlier hits (or an empty file), never the queries it reads."""
    from huse.runtime.files import is_own_csv, is_own_jsonl

    if out.suffix.lower() in NOT_HITS:
        raise HuseError(f"--out {out}: huse search writes JSON Lines (one object per query) or, with a .csv name, a row "
                        f"per hit for spreadsheets; give --out {out.with_suffix('.jsonl')} or {out.with_suffix('.csv')}")
    if batch and out.resolve() == Path(batch).resolve():
        raise HuseError(f"--out {out} is the --batch file; choose another file")
    if out.is_dir():
        raise HuseError(f"--out {out} is a folder; give a .jsonl or .csv file name")
    own = is_own_csv(out, HITS_CSV) if out.suffix.lower() == ".csv" else is_own_jsonl(out, "query", ("hits", "error"))
    if not own:
        raise HuseError(f"--out {out} exists and is not hits of huse search; choose another file")


def _hits_file(out: str):
    """The --out file, opened, and write(query, text, image, hits or None, error or None) for it: JSONL lines, or
    with a .csv name CSV rows (HITS_CSV)."""
    from huse.runtime.files import CSV_ENCODING, sheet_cell

    if Path(out).suffix.lower() != ".csv":
        f = open(out, "w", encoding="utf-8")

        def write(query, text, image, hits, error):
            answer = {"error": error} if error else {"hits": [h.to_dict() for h in hits]}
            f.write(json.dumps({"query": query, "text": text, "image": image, **answer}, ensure_ascii=False) + "\n")
        return f, write
    import csv

    f = open(out, "w", encoding=CSV_ENCODING, newline="")
    w = csv.writer(f)
    w.writerow(HITS_CSV)

    def row(cells: list) -> None:
        w.writerow([sheet_cell(str(c)) for c in cells])

    def write(query, text, image, hits, error):
        head = [query, text or "", image or ""]
        if error or not hits:
            row(head + [""] * (len(HITS_CSV) - 4) + [error or ""])
        for rank, h in enumerate(hits or (), 1):
            row(head + [rank, repr(float(h.score)), h.product_id or "", "" if h.row is None else h.row, h.name or "",
                        h.image or "", h.classes or "", h.modality, h.item, ""])
    return f, write


def _warn_unusable_images(failed: int, rows: int, first: str | None) -> None:
    """Half the rows' photos unusable is most often a wrong --images: say so (the run itself succeeded)."""
    if rows and failed >= max(1, rows // 2):
        hint = "; is --images right?" if first and "does not exist" in first else ""
        click.echo(f"warning: the image of {failed} of {rows} rows could not be used (first: {first}){hint}", err=True)


def _warn_excluded_images(idx, first_item: int = 0) -> None:
    """`_warn_unusable_images` for the rows from item `first_item` on (an add's) that an index left out for a photo
    that failed (not for no photo), read a line of excluded.jsonl at a time."""
    failed, first = 0, None
    for e in idx.excluded():
        if e["item"] >= first_item and e["modality"] == "image" and e["error"] != "no image":
            failed += 1
            first = first or f"row {e['row']}: {e['error']}"
    _warn_unusable_images(failed, len(idx) - first_item, first)


def _echo_index(idx) -> None:
    info = idx.info()
    c = info["counts"]
    visual = f", visual dim {info['visual_dim']}" if info.get("visual_dim") else ""
    click.echo(f"index {info['folder']}: {c['items']} items ({c['removed']} removed), kind {info['kind']}, "
               f"dim {info['dim']}{visual}, "
               f"{info['precision']}; bundle {info['bundle']['path']} ({info['bundle']['fingerprint'][:12]})")
    for mod, m in info["modalities"].items():
        recall = "n/a" if m["recall_at_10"] is None else f"{m['recall_at_10']:.3f}"
        click.echo(f"  {mod}: {m['count']} vectors, {m['factory']}, params {m['search_params'] or 'exact'}, "
                   f"recall@10 vs exact {recall}" + (f", {m['tombstones']} tombstones" if m.get("tombstones") else ""))
    if info["photo_bytes"]:
        n = info["photo_bytes"]
        click.echo("  photos kept in the index (its catalogs held them as bytes): "
                   + (f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"))


@main.command(context_settings={"show_default": True})
@click.argument("index", type=click.Path(file_okay=False))
@click.option("--title", "--text", "text", help="Query title, as `huse classify --title` and /v1/search name it "
                                                "(--text is the same option).")
@click.option("--image", type=click.Path(dir_okay=False), help="Query photo (with --title: a fused query).")
@click.option("--batch", type=click.Path(dir_okay=False), help="CSV/JSONL of queries (columns image and/or name).")
@click.option("--target", type=click.Choice(["image", "text", "product"]), default="image",
              help="What is searched: product photos, product titles, or products (best of both).")
@click.option("--space", type=click.Choice(["universal", "visual"]), default="universal",
              help="universal: products of this kind (class level; any query against any target, photo or "
                   "title). visual: this same product or its duplicates, from a photo (--image, or the photos "
                   "of --batch; --target image or product; an index built with a bundle that has visual vectors).")
@click.option("--filter", "prefix", help="Only products under this hierarchy prefix, e.g. 'clothing<tops'.")
@click.option("-k", "--k", "--top-k", "k", default=10, help="Hits per query (-k, --k as /v1/search names it, or --top-k as `huse classify`).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the hits to a file: JSONL (one object per "
              "query), or with a .csv name a row per hit (query, rank, score, the product), for spreadsheets.")
@click.option("--bundle", type=click.Path(file_okay=False), help="The index's bundle, if it moved.")
@click.option("--threads", type=int, help="FAISS threads.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the index files used (trusted, read-only media).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM, repeatable): refuse the index (and its bundle) unless signed by one.")
def search(index, text, image, batch, target, space, prefix, k, out, bundle, threads, no_verify, trusted_keys) -> None:
    """Search INDEX by title, photo or both and print ranked products."""
    def body():
        from huse.runtime.index import Index

        if batch:
            if text or image:
                raise HuseError("give --batch or --title/--image, not both")
            import itertools

            from huse.runtime.catalog import iter_catalog

            rows = iter_catalog(batch)  # a bad row is that query's error, not the batch's
            # SEARCH_CHUNK queries at a time: decoded photos and hits of a whole file took ~70 KB a query
            chunks = iter(lambda: [(f"row {r.row}", r.name, r.image, r.error)
                                   for r in itertools.islice(rows, SEARCH_CHUNK)], [])
        elif text or image:
            chunks = iter([[("query", text, image, None)]])
        else:
            raise HuseError("search needs --title, --image (both: a fused query) or --batch FILE")
        if no_verify and trusted_keys:
            raise HuseError("--no-verify and --trusted-key contradict each other: a signature vouches for files only "
                            "through their sha256; drop --no-verify")
        if out:
            _check_hits_out(Path(out), batch)
        idx = Index.open(index, bundle=bundle, verify=not no_verify, threads=threads,
                         trusted_keys=list(trusted_keys) or None)
        f, write = _hits_file(out) if out else (None, None)
        n, failed, first_error = 0, 0, None
        try:
            chunk, following = next(chunks, []), None
            while chunk:
                following = next(chunks, [])
                errors = _search_chunk(idx, chunk, batch, write, show=f is None or (n == 0 and len(chunk) == 1
                                                                                    and not following),
                                       k=k, target=target, filter=prefix, space=space)
                n, failed = n + len(chunk), failed + len(errors)
                first_error = first_error or (errors[min(errors)] if errors else None)
                if following or n > SEARCH_CHUNK:
                    click.echo(f"{n:,} queries searched", err=True)
                chunk = following
        finally:
            if f is not None:
                f.close()
        if n and failed == n:
            raise HuseError(first_error + (f"; all {n} queries failed" if batch else ""))
        if out:
            click.echo(f"{n} queries -> {out}" + (f"; {failed} failed, with an `error`" if failed else ""))
        elif failed:
            click.echo(f"{failed} of {n} queries failed", err=True)
    run_cli(body)


SEARCH_CHUNK = 1024  # queries of a --batch file searched at once


def _search_chunk(idx, chunk: list[tuple], batch: str | None, write, show: bool, **search) -> dict[int, str]:
    """Search one chunk of (label, title, photo, the row's own error) queries; `write` each query's hits (or error)
    (`_hits_file`), print them when `show`, and each error to stderr. Returns the errors by position."""
    labels, texts, images = [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk]
    errors = {i: c[3] for i, c in enumerate(chunk) if c[3]}
    # A --batch file's titles are not queries in the visual space: its photos are.
    use_texts = any(t is not None for t in texts) and not (batch and search["space"] == "visual")
    use_images = any(i is not None for i in images) or (not use_texts and search["space"] == "visual")
    if not use_texts and not use_images:  # a chunk without a query to search: each gets search_batch's reason
        use_texts = True
    # One bad query (a missing photo, an empty title, a bad row) fails alone; the others are answered.
    found = idx.search_batch(texts=texts if use_texts else None, images=images if use_images else None, **search)
    hits, errors = found.hits, {**found.errors, **errors}
    errors = {i: e if e.startswith(labels[i]) else f"{labels[i]}: {e}" for i, e in errors.items()}
    for i, (label, q_text, q_image, _) in enumerate(chunk):
        q_image = q_image if isinstance(q_image, str) else None  # a photo held in a Parquet file: its row
        if i in errors:
            click.echo(errors[i], err=True)
        if write is not None:
            write(label, q_text, q_image, None if i in errors else hits[i], errors.get(i))
        if show and i not in errors:
            click.echo(f"{label}: {q_text or ''} {q_image or ''}".rstrip())
            for rank, h in enumerate(hits[i], 1):
                click.echo(f"  {rank:2d}. {h.score:.4f} {h.product_id or '-'} row {h.row} [{h.modality}] "
                           f"{h.name!r} {h.classes or ''} {h.image or ''}".rstrip())
    return errors


# -- serving: `huse serve` (issue 18) -----------------------------------------------------------
@main.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--index", type=click.Path(file_okay=False), help="Also answer /v1/search from this index.")
@click.option("--host", default="127.0.0.1", help="Address to bind; another than loopback needs --token-file or --insecure.")
@click.option("--port", default=8000)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-cpu"]), default="fp32")
@click.option("--backend", default="auto", help="auto, onnxruntime or tensorrt.")
@click.option("--max-batch", default=64, help="Most items per model batch (1: batching off).")
@click.option("--max-delay-ms", default=3.0, help="How long a batch may wait after its oldest request for more to join.")
@click.option("--max-queue", default=1024, help="Most items admitted at once; beyond it requests get 503 + Retry-After.")
@click.option("--instances", default=1, help="Model instances in the model process, each on its own thread (sessions "
              "of their own).")
@click.option("--threads", type=int, help="onnxruntime threads per instance (default: cores / instances).")
@click.option("--workers", type=int, help="Threads decoding and tokenising in the model process (default: min(4, cores)).")
@click.option("--spin/--no-spin", default=True, help="onnxruntime thread spinning (on: lower latency and more "
              "throughput under load; --no-spin serves more under overload and leaves the cores to other processes).")
@click.option("--worker-nice", default=10, help="Run the model process (decoding and the model) this much below the HTTP "
              "front's priority, so health probes and refusals stay prompt under overload (0: the same priority).")
@click.option("--max-body-mb", default=64.0, help="Largest request body (413 beyond).")
@click.option("--max-items", default=256, help="Most items per request (413 beyond).")
@click.option("--timeout", "timeout_s", default=30.0, help="Per-request deadline in seconds (504 and its work dropped beyond).")
@click.option("--grace", "grace_s", default=30.0, help="On SIGTERM: seconds for in-flight requests to finish.")
@click.option("--min-confidence", default=0.0, help="Top-1 below this sets needs_review (a multi-label bundle: any "
              "label below it, as `huse classify`).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token clients must send.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token (a trusted network only).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM, repeatable): refuse the bundle and index unless signed by one.")
@click.option("--review", type=click.Path(), help="Review queue at /#review: PREDS from `huse classify "
              "--min-confidence P` (JSONL or CSV file, or shard folder); its needs_review rows, least confident first.")
@click.option("--catalog", type=click.Path(dir_okay=False), help="The catalog PREDS was made from (with --review).")
@click.option("--images", type=click.Path(file_okay=False), help="The only folder the page shows photos from "
              "(review rows, search results) (default: --catalog's folder).")
@click.option("--journal", type=click.Path(dir_okay=False), help="The review's decision journal (default: "
              "PREDS.review.jsonl beside PREDS); reopening it continues the review.")
def serve(bundle, token_file, review, catalog, images, journal, **kw) -> None:
    """Serve BUNDLE over HTTP: Open Inference Protocol (/v2, models huse and huse_embed; tritonclient
    works) and JSON (/v1/classify, /v1/embed, /v1/search), with dynamic batching. Needs
    `pip install 'huse-edge[serve]'`."""
    def body():
        from pathlib import Path

        from huse.runtime.serve.app import ServeConfig, serve as run
        from huse.runtime.serve.page import page_for

        token = None
        if token_file:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise HuseError(f"cannot read --token-file {token_file}: {e}") from None
            if len(token) < 16:
                raise HuseError(f"the token in {token_file} has {len(token)} characters; use at least 16 "
                                f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > {token_file}`)")
        run(ServeConfig(bundle=bundle, token=token, **kw), page_for(review, catalog, images, journal))
    run_cli(body)


# -- review: `huse review export` (issue 21; the review itself runs in `huse serve --review`) ---------------
@main.group("review")
def review_group() -> None:
    """Work with the journal of a review (`huse serve BUNDLE --review PREDS --catalog CATALOG`)."""


@review_group.command("export")
@click.argument("journal", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The corrections catalog to write: CSV, .jsonl, or .parquet (which also holds photos a Parquet catalog holds as bytes).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (never the reviewed catalog or the journal).")
def review_export(journal, out, force) -> None:
    """Write the accepted and corrected rows of JOURNAL as a catalog huse-train reads.

    Columns image,name,classes,product_id; the last decision per row counts; skipped rows are
    left out. Image paths are as the reviewed catalog names them: train with --images set to its
    images folder (`huse-train --data CATALOG --data OUT --images CATALOG_IMAGES --images THAT_FOLDER`).
    """
    def body():
        from huse.runtime.serve.review import export_corrections

        r = export_corrections(journal, out, force=force)
        click.echo(f"wrote {r['written']} reviewed rows to {r['out']} ({r['accept']} accepted, {r['correct']} "
                   f"corrected; {r['skip']} skipped, left out)")
        click.echo(f"train the next model on your catalog and these: huse-train --data CATALOG --data {r['out']} "
                   f"--images CATALOG_IMAGES --images {r['images']} --out runs/NEXT")
    run_cli(body)


def _stage_entry(name: str) -> Callable[[], None]:
    def entry() -> None:  # `huse-NAME ARGS` is `huse NAME ARGS`, with the same extra handling
        main.get_command(None, name).main(prog_name=f"huse-{name}")
    return entry


train_main, export_main, bench_main = _stage_entry("train"), _stage_entry("export"), _stage_entry("bench")


if __name__ == "__main__":
    main()
