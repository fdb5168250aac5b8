"""A fresh `huse search` at catalog scale: wall time from process start to printed hits, index load included.

    python -m huse.benchmarks.search_startup BUNDLE [--data test.csv] --scale 200000 --out bench-results/search-startup
    python -m huse.benchmarks.search_startup BUNDLE --data test.csv --scale 500 --runs 2   # a correctness check

Issue 10's bar: under 1 s at 200,000 products on 2 cores, torch never imported. The index is the
retrieval benchmark's synthetic catalog (the bundle's real test embeddings repeated with Gaussian
perturbation, benchmarks/retrieval.py), built once and reused while its size matches. Each row is
the median of --runs fresh processes running `huse search INDEX --text ... --target T`:
- `first`: the first search of a new file version: every file it opens is hashed (and stamped,
  runtime/stamps.py); what the first search after a build or a copy costs;
- `stamped`: the searches after it: files are only stat()ed, the usual case on a device;
- `hash always` (HUSE_VERIFY_CACHE=0): every search hashes, the behaviour before stamps;
- `no verify` (--no-verify): the floor, nothing checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from huse.runtime.cli import run_cli

__all__ = ["build_synthetic_index", "fresh_search", "run"]

BAR_S = 1.0


@dataclass
class _Record:
    row: int
    product_id: str
    name: str | None
    image: str | None
    classes: str | None


def build_synthetic_index(bundle: str | Path, folder: Path, n: int, data=None, images=None, kind: str = "auto",
                          limit: int | None = None) -> dict[str, Any]:
    """Write (or reuse, when it already holds `n` items of `bundle`) a synthetic index of `n` products."""
    from huse.benchmarks.retrieval import embed_bundle, load_items, synthetic_vectors
    from huse.runtime.index import Index

    manifest = folder / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m["counts"]["items"] == n and Path(m["bundle"]["path"]) == Path(bundle).resolve():
            return {"built": False, "kind": m["kind"], "seconds": 0.0}
    items = load_items(bundle, data, images, limit)
    emb = embed_bundle(bundle, items)
    vecs = {m: synthetic_vectors(emb[m], n, seed=s) for s, m in enumerate(("image", "text"))}
    recs = [_Record(i + 1, f"{items.product_ids[i % len(items.product_ids)]}#{i}", items.titles[i % len(items.titles)],
                    None, items.classes[i % len(items.classes)]) for i in range(n)]
    t = time.perf_counter()
    idx = Index.from_embeddings(bundle, recs, vecs, folder, kind=kind, progress=True, overwrite=True)
    return {"built": True, "kind": idx.kind, "seconds": round(time.perf_counter() - t, 2)}


def fresh_search(folder: Path, text: str, target: str, env: dict[str, str], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `huse search` in a new Python process: wall seconds, and whether torch was imported."""
    args = ["search", str(folder), "--text", text, "--target", target, "-k", "10", *extra]
    code = ("import sys\nfrom huse.runtime.cli import main\n"
            f"try:\n    main({args!r}, standalone_mode=False)\n"
            "finally:\n    print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode or "TORCH" not in p.stderr:
        raise click.ClickException(f"huse search failed: {(p.stderr or p.stdout)[-800:]}")
    hits = sum(1 for line in p.stdout.splitlines() if line.startswith("  "))
    return {"wall_s": wall, "torch_imported": "TORCH True" in p.stderr, "hits": hits}


def run(bundle: str | Path, data=None, images=None, scale: int = 200_000, runs: int = 5, kind: str = "auto",
        targets: tuple[str, ...] = ("image", "product"), text: str = "black leather ankle boots", limit: int | None = None,
        out: str | Path = "bench-results/search-startup") -> dict[str, Any]:
    """Build or reuse the index, then time fresh searches in each verification mode (see the module docstring)."""
    from huse.runtime.stamps import RACY_SECONDS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"index-{scale}"
    build = build_synthetic_index(bundle, folder, scale, data, images, kind, limit)
    time.sleep(RACY_SECONDS + 0.1)  # files younger than this are hashed but never stamped
    size = sum(p.stat().st_size for p in folder.iterdir())
    result: dict[str, Any] = {"bundle": str(bundle), "n": scale, "index": build, "index_bytes": size, "runs": runs,
                              "bar_s": BAR_S, "targets": {}}
    for target in targets:
        rows: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(dir=out) as stamps:
            env = {**os.environ, "HUSE_CACHE_DIR": stamps}
            env.pop("HUSE_VERIFY_CACHE", None)
            first = fresh_search(folder, text, target, env)
            later = [fresh_search(folder, text, target, env) for _ in range(runs)]
        always = [fresh_search(folder, text, target, {**env, "HUSE_VERIFY_CACHE": "0"}) for _ in range(runs)]
        floor = [fresh_search(folder, text, target, env, ("--no-verify",)) for _ in range(runs)]
        for name, rs in (("first", [first]), ("stamped", later), ("hash always", always), ("no verify", floor)):
            rows[name] = {"median_s": round(float(np.median([r["wall_s"] for r in rs])), 3),
                          "max_s": round(max(r["wall_s"] for r in rs), 3),
                          "torch_imported": any(r["torch_imported"] for r in rs), "hits": rs[0]["hits"]}
        result["targets"][target] = rows
    (out / "search_startup.json").write_text(json.dumps(result, indent=2))
    (out / "search_startup.md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Fresh-process `huse search`: {result['n']:,} products, {result['index']['kind']} index, "
             f"{result['index_bytes'] / 2**20:.0f} MiB on disk ({result['bundle']})", "",
             f"Median of {result['runs']} fresh processes (first: one); the bar is < {result['bar_s']:g} s.", "",
             "| target | verification | median s | max s | torch imported | hits |", "|---|---|---|---|---|---|"]
    for target, rows in result["targets"].items():
        for name, r in rows.items():
            lines.append(f"| {target} | {name} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['torch_imported']} | {r['hits']} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test catalog whose embeddings seed the synthetic one (default: the bundle's test split).")
@click.option("--images", type=click.Path(file_okay=False), help="Folder image paths resolve against.")
@click.option("--scale", default=200_000, help="Products in the synthetic index.")
@click.option("--runs", default=5, help="Fresh processes per verification mode.")
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf"]), default="auto")
@click.option("--target", "targets", multiple=True, default=("image", "product"), help="What is searched (repeatable).")
@click.option("--limit", type=int, help="Use only the first N test items to seed the catalog.")
@click.option("--out", default="bench-results/search-startup", type=click.Path(file_okay=False))
def main(bundle, data, images, scale, runs, kind, targets, limit, out) -> None:
    """Time a fresh `huse search` at catalog scale (see the module docstring)."""
    def body():
        r = run(bundle, data, images, scale, runs, kind, tuple(targets), limit=limit, out=out)
        click.echo(to_markdown(r))
        slow = [(t, n) for t, rows in r["targets"].items() for n in ("stamped",) if rows[n]["median_s"] >= BAR_S]
        torch = [t for t, rows in r["targets"].items() if any(x["torch_imported"] for x in rows.values())]
        click.echo(f"bar (< {BAR_S:g} s stamped, no torch): {'MISSED ' + str(slow + torch) if slow or torch else 'met'}")
    run_cli(body)


if __name__ == "__main__":
    main()
