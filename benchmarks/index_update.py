"""Keeping a large index current: `add` and `remove` of a few products against rebuilding it.

    python -m huse.benchmarks.index_update BUNDLE --vectors 500000 --products 10 --rounds 5 \
        --out benchmarks/results/cpu-2core/index-update/index-update.json

Builds an index of --vectors products from synthetic unit vectors (`Index.from_embeddings`, as
`benchmarks/index_memory.py` makes them: no photos, each with a product_id and a title), then, --rounds times in
turn: `add` of --products new products (titles only, embedded by the bundle), `add --replace` of the same
products (an update), `remove` of them, and the baseline a user without incremental updates has, rebuilding the
index from its vectors (`from_embeddings` again, which skips embedding; a real rebuild also re-embeds every
product). Medians, with min-max, and the ratio of the rebuild to each update. Run it alone on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

from huse.benchmarks.index_memory import _random_vectors

__all__ = ["run"]


def run(bundle: str, vectors: int, products: int, rounds: int, kind: str, work: Path) -> dict:
    import numpy as np

    from huse.runtime.index import Index

    dim = json.loads((Path(bundle) / "manifest.json").read_text())["embedding_dim"]
    _random_vectors(work, vectors, dim)
    vecs = {m: np.load(work / f"{m}.npy", mmap_mode="r") for m in ("image", "text")}
    records = [{"row": i + 1, "product_id": f"sku-{i}", "name": f"product {i}", "image": None,
                "classes": f"catalog<c{i % 1000}"} for i in range(vectors)]
    new = [{"name": f"Acme navy tee {i}", "product_id": f"new-{i}", "classes": "clothing<tops"} for i in range(products)]
    times: dict[str, list[float]] = {"add": [], "add_replace": [], "remove": [], "rebuild": []}

    def timed(key, fn):
        t = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - t)
        return out

    idx = Index.from_embeddings(bundle, records, vecs, work / "idx", kind=kind, progress=False)
    for _ in range(rounds):
        assert timed("add", lambda: idx.add(new, progress=False))["added"] == products
        assert timed("add_replace", lambda: idx.add(new, replace=True, progress=False))["replaced"] == products
        assert timed("remove", lambda: idx.remove([p["product_id"] for p in new]))["removed"] == products
        shutil.rmtree(work / "rebuilt", ignore_errors=True)
        timed("rebuild", lambda: Index.from_embeddings(bundle, records, vecs, work / "rebuilt", kind=kind,
                                                       progress=False))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"products_in_index": vectors, "products_changed": products, "rounds": rounds, "kind": idx.kind,
            "seconds": {k: {"median": round(med[k], 3), "min": round(min(v), 3), "max": round(max(v), 3)}
                        for k, v in times.items()},
            "rebuild_over": {k: round(med["rebuild"] / med[k], 2) for k in ("add", "add_replace", "remove")},
            "items_after": len(idx), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}


@click.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--vectors", type=int, default=500_000, help="Products in the index (synthetic vectors).")
@click.option("--products", type=int, default=10, help="Products each add, update and remove changes.")
@click.option("--rounds", type=int, default=5)
@click.option("--kind", default="flat")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), required=True, help="JSON file to write.")
def main(bundle, vectors, products, rounds, kind, out_json) -> None:
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out_json).resolve().parent) as tmp:
        result = run(bundle, vectors, products, rounds, kind, Path(tmp))
    Path(out_json).write_text(json.dumps(result, indent=2))
    s = result["seconds"]
    click.echo(f"{vectors:,} products, {result['kind']}: " + ", ".join(
        f"{k} {v['median']} s ({v['min']}-{v['max']})" for k, v in s.items())
        + "; rebuild / update: " + ", ".join(f"{k} {v}x" for k, v in result["rebuild_over"].items()))


if __name__ == "__main__":
    main()
