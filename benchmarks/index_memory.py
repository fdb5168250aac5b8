"""Peak memory of `huse index build`, per product: how large a catalog one machine can index.

    python -m huse.benchmarks.index_memory BUNDLE --data CATALOG [--images DIR] --out bench-results/index-memory.json
    python -m huse.benchmarks.index_memory BUNDLE --vectors 1000000 --out ...   # the FAISS half alone, synthetic vectors

Runs the build in a child process, as a user would (`huse index build`, or `Index.from_embeddings` on
--vectors synthetic unit vectors, clustered, written to memory-mapped .npy files first), and samples the child's
/proc/PID/status every 50 ms:
- `anon`: RssAnon, memory only this process holds (what the kernel cannot take back: the OOM figure);
- `file`: RssFile, pages of files it maps (the index's own vector files while the build writes and reads
  them: page cache, which the kernel writes back and reclaims under pressure);
- `rss` (VmRSS, = anon + file + shmem) and the kernel's own `ru_maxrss`, the figure `/usr/bin/time -v` prints.
Bytes per product are peak / products. Run it alone on the machine (the timing is only informative).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

__all__ = ["measure"]

FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in FIELDS:
                    out[FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def measure(cmd: list[str], products: int, interval: float = 0.05) -> dict:
    """Run `cmd`, sampling its memory; peaks and bytes per product."""
    peaks = {v: 0 for v in FIELDS.values()}
    t = time.perf_counter()
    child = subprocess.Popen(cmd)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status(child.pid).items():
                peaks[k] = max(peaks[k], v)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = child.wait()
    done.set()
    sampler.join()
    if rc != 0:
        raise click.ClickException(f"{' '.join(cmd)} exited {rc}")
    peaks["ru_maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"products": products, "seconds": round(time.perf_counter() - t, 1),
            "peak_bytes": peaks, "bytes_per_product": {k: round(v / products) for k, v in peaks.items()}}


_FROM_VECTORS = """
import sys, numpy as np
from dataclasses import dataclass
from huse.runtime.index import Index
bundle, folder, out, n, kind = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
@dataclass
class R:
    row: int
    product_id: str
    name: str
    image: None
    classes: None
vecs = {m: np.load(f"{folder}/{m}.npy", mmap_mode="r") for m in ("image", "text")}
Index.from_embeddings(bundle, [R(i + 1, f"p{i}", f"product {i}", None, None) for i in range(n)], vecs, out,
                      kind=kind, max_memory="64G", progress=False, overwrite=True)
"""


def _random_vectors(folder: Path, n: int, dim: int, seed: int = 0, classes: int = 1000) -> None:
    """image.npy and text.npy: n unit vectors each around `classes` random centres (products of one class lie
    together, as in the universal space), written a block at a time (never whole in memory)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    for m in ("image", "text"):
        out = np.lib.format.open_memmap(folder / f"{m}.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for r in range(0, n, 100_000):
            k = min(100_000, n - r)
            v = centres[rng.integers(0, classes, k)] + 0.5 * rng.standard_normal((k, dim), dtype=np.float32)
            out[r:r + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
        out.flush()
        del out


@click.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="A catalog: time `huse index build` on it.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Folder its image paths resolve against.")
@click.option("--vectors", type=int, help="Instead of a catalog: this many products of synthetic vectors (no visual).")
@click.option("--kind", default="auto")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), required=True, help="JSON file to write.")
def main(bundle, data, images, vectors, kind, out_json) -> None:
    if (data is None) == (vectors is None):
        raise click.UsageError("give --data CATALOG or --vectors N")
    with tempfile.TemporaryDirectory(dir=Path(out_json).resolve().parent) as tmp:
        out = Path(tmp) / "idx"
        if data is not None:
            from huse.runtime.catalog import iter_catalog

            n = sum(1 for _ in iter_catalog(data, images))
            cmd = [sys.executable, "-m", "huse.runtime.cli", "index", "build", bundle, "--data", data, "--out", str(out),
                   "--kind", kind, "--overwrite"]
            result = measure(cmd + (["--images", images] if images else []), n)
        else:
            dim = json.loads((Path(bundle) / "manifest.json").read_text())["embedding_dim"]
            _random_vectors(Path(tmp), vectors, dim)
            result = measure([sys.executable, "-c", _FROM_VECTORS, bundle, tmp, str(out), str(vectors), kind], vectors)
        manifest = json.loads((out / "manifest.json").read_text())
        result.update(kind=manifest["kind"], modalities=sorted(manifest["modalities"]),
                      index_bytes=sum(p.stat().st_size for p in out.iterdir()),
                      command=" ".join(sys.argv), data=data, cpus=os.cpu_count())
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=2))
    gib = {k: f"{v / 2**30:.2f} GiB" for k, v in result["peak_bytes"].items()}
    click.echo(f"{result['products']:,} products, {result['kind']}, {result['seconds']} s: peak {gib}; bytes a product "
               f"{result['bytes_per_product']}")


if __name__ == "__main__":
    main()
