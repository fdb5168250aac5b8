"""`huse`: one click group; each command parses, calls one library function, prints.

Subcommands from other stages (train, export, bench, data) are imported only when run, so
`huse --help` and `huse classify` work with just the lean runtime installed.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
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


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when used (the click docs' LazyGroup)."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(list(super().list_commands(ctx)) + list(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            target, help_text = self.lazy[name]
            module, attr = target.split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as e:
                # The stage is not installed: a stub that says which extra brings it.
                extra = module.split(".")[1]
                @click.command(name=name, help=f"{help_text} (needs `pip install 'huse-edge[{extra}]'`)",
                               context_settings={"ignore_unknown_options": True})
                @click.argument("args", nargs=-1, type=click.UNPROCESSED)
                def missing(args, _e=e, _extra=extra):
                    click.echo(f"error: `huse {name}` needs the {_extra} extra ({_e}); "
                               f"pip install 'huse-edge[{_extra}]'", err=True)
                    sys.exit(1)
                return missing
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, lazy={
    "train": ("huse.train.cli:main", "Train a HUSE model"),
    "export": ("huse.export.cli:main", "Export a run to an ONNX bundle"),
    "bench": ("huse.benchmarks.cli:main", "Benchmark a bundle"),
    "data": ("huse.train.cli:data", "Built-in datasets"),
    "doctor": ("huse.benchmarks.doctor:main", "Check the environment; --gpu runs the GPU acceptance"),
})
@click.option("-v", "--verbose", is_flag=True, help="Log backend choices and progress.")
def main(verbose: bool) -> None:
    """huse-edge: HUSE multimodal product classification, from training to the edge."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Products CSV/JSONL with image and/or name columns.")
@click.option("--images", type=click.Path(file_okay=False), help="Folder image paths resolve against (default: the file's folder).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Predictions, one JSON object per row (JSONL).")
@click.option("--mode", type=click.Choice(["auto", "fused", "image", "text"]), default="auto", help="Which inputs to use.")
@click.option("--top-k", default=5)
@click.option("--backend", default="auto", help="auto, onnxruntime or tensorrt.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-cpu"]), default="fp32",
              help="int8: TensorRT's Q/DQ form; int8-cpu: onnxruntime on CPUs only (faster there).")
@click.option("--batch-size", default=64)
@click.option("--threads", type=int, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--show", default=0, help="Also print the first N predictions.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM, repeatable): refuse the bundle unless its manifest is signed by one.")
def classify(bundle, data, images, out, mode, top_k, backend, precision, batch_size, threads, show, trusted_keys) -> None:
    """Classify every product in a catalog file with a bundle; bad rows are reported, never dropped."""
    run_cli(lambda: _classify(bundle, data, images, out, mode, top_k, backend, precision, batch_size, threads, show,
                              trusted_keys))


def _classify(bundle, data, images, out, mode, top_k, backend, precision, batch_size, threads, show=0,
              trusted_keys=()) -> None:
    from huse.runtime.catalog import read_catalog
    from huse.runtime.classifier import Classifier
    from huse.runtime.hierarchy import canonical

    records = read_catalog(data, images)
    clf = Classifier(bundle, backend=backend, precision=precision, batch_size=batch_size, threads=threads,
                     trusted_keys=list(trusted_keys) or None)
    n_err = n_known = n_right = 0
    with clf, open(out, "w", encoding="utf-8") as f:
        for s in range(0, len(records), 1024):  # chunks bound memory on million-row catalogs
            chunk = records[s:s + 1024]
            results = clf.classify(images=[r.image for r in chunk], titles=[r.name for r in chunk], top_k=top_k, mode=mode)
            for r, res in zip(chunk, results):
                res.pop("index")
                row = {"row": r.row, "image": r.image, "name": r.name, **res}
                if r.product_id:
                    row["product_id"] = r.product_id
                if "error" in res:
                    n_err += 1
                elif r.classes:
                    n_known += 1
                    n_right += res["top_k"][0]["label"] == canonical(r.classes)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                if show > 0:
                    show -= 1
                    click.echo(_describe_row(row, r.classes))
    msg = f"classified {len(records) - n_err}/{len(records)} rows with {clf.backend} ({clf.device}, {precision}) -> {out}"
    if n_err:
        msg += f"; {n_err} rows failed (see their 'error' field)"
    if n_known:
        msg += f"; top-1 accuracy on rows with classes: {n_right / n_known:.4f}"
    click.echo(msg)


def _describe_row(row: dict, truth: str | None) -> str:
    head = f"row {row['row']}: {row['name']!r}"
    if "error" in row:
        return f"{head} -> error: {row['error']}"
    best = row["top_k"][0]
    path = " > ".join(f"{p['label'].split('<')[-1]} {p['score']:.2f}" for p in row["path"])
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


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
def info(bundle) -> None:
    """Show what a bundle holds (and verify its files)."""
    def body():
        from huse.runtime.bundle import load_manifest

        m = load_manifest(bundle)
        click.echo(f"bundle {bundle}: {len(m['labels'])} classes, embedding dim {m['embedding_dim']}")
        click.echo(f"precisions: {', '.join(sorted(m['models']))}; engines: {len(m.get('engines', []))}")
        click.echo(f"image input {m['preprocessing']['size']}, tokenizer {m['tokenizer']['type']}, "
                   f"fusion image weight {m['fusion']['image_weight']}")
        for p, acc in m.get("accuracy", {}).items():  # the whole record is in manifest.json
            modes = acc.get("modes", {})
            figures = ", ".join(f"{mode} {modes[mode]['agreement']:.2f}%" for mode in ("fused", "image", "text")
                                if mode in modes)
            fused = modes.get("fused", {})
            click.echo(f"{p}: gate {'passed' if acc.get('passed') else 'FAILED (overridden)'} on {acc.get('n')} "
                       f"{acc.get('split')} products; top-1 agreement with fp32: {figures}; fused top-1 "
                       f"{fused.get('cand_accuracy', float('nan')):.2f}% vs {fused.get('ref_accuracy', float('nan')):.2f}%; "
                       f"size {100 * acc.get('size_ratio_vs_fp32', float('nan')):.1f}% of fp32")
        click.echo(f"{len(m['files'])} files verified (sha256)")
    run_cli(body)


if __name__ == "__main__":
    main()
