"""Frozen image features for training: torch against onnxruntime (what `huse-train` uses on the CPU).

    python benchmarks/experiments/feature_extraction.py --out benchmarks/results/cpu-2core/feature_extraction.json

`huse-train` computes the frozen backbone's features of every photo once (fashion-products: 70,000 at
64 px, the longest step of `make demo` before training). In one process, on the same photos, in
interleaved rounds, this times:

- torch: the backbone as huse-train ran it before (channels_last, no_grad, batches of 128);
- onnxruntime: `huse.train.backbone_features` on the CPU (the backbone exported to ONNX, run by the
  runtime's OnnxrtRunner), what `huse-train` runs now, export included once.

Per round: wall and CPU microseconds per photo (preprocessing excluded: both take the same arrays),
the ratio onnxruntime / torch with its range over rounds, and the largest feature difference. Timings
are only meaningful on a quiet machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli


def run(photos: int = 4096, rounds: int = 5, batch: int = 128, threads: int = 2) -> dict:
    import torch

    from huse.runtime.preprocess import ImageSpec, load_image
    from huse.train import backbone_features, backbone_info, create_backbone, load_builtin

    torch.set_num_threads(threads)
    ds = load_builtin("fashion-products")
    info = backbone_info("efficientnet_lite0")
    spec = ImageSpec(size=(64, 64), mean=info.mean, std=info.std)
    x = np.stack([load_image(im, spec) for im in ds.images[:photos]])
    torch_bb = create_backbone("efficientnet_lite0").to(memory_format=torch.channels_last)

    def torch_features(xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([torch_bb(torch.from_numpy(xs[s:s + batch]).contiguous(memory_format=torch.channels_last))
                              for s in range(0, len(xs), batch)]).numpy()

    t = time.perf_counter()
    with backbone_features(create_backbone("efficientnet_lite0"), spec.size) as ort_bb:
        setup_s = time.perf_counter() - t

        def ort_features(xs: np.ndarray) -> np.ndarray:
            return torch.cat([ort_bb(xs[s:s + batch]) for s in range(0, len(xs), batch)]).numpy()

        fns = {"torch": torch_features, "onnxruntime": ort_features}
        ref = {k: fn(x[:batch]) for k, fn in fns.items()}  # warm-up
        times = {k: {"wall_us": [], "cpu_us": []} for k in fns}
        outs = {}
        for _ in range(rounds):
            for name, fn in fns.items():
                w, c = time.perf_counter(), time.process_time()
                outs[name] = fn(x)
                times[name]["wall_us"].append(1e6 * (time.perf_counter() - w) / photos)
                times[name]["cpu_us"].append(1e6 * (time.process_time() - c) / photos)
                click.echo(f"{name}: {times[name]['wall_us'][-1]:.0f} wall-us/photo", err=True)
    del ref
    ratio = [o / t for o, t in zip(times["onnxruntime"]["wall_us"], times["torch"]["wall_us"])]
    return {
        "photos": photos, "rounds": rounds, "batch": batch, "threads": threads, "image_size": 64,
        "per_photo": {k: {m: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
                          for m, v in d.items()} for k, d in times.items()},
        "onnxruntime_over_torch_wall": {"median": float(np.median(ratio)), "min": float(min(ratio)), "max": float(max(ratio))},
        "onnxruntime_setup_s": round(setup_s, 2),  # the ONNX export and session, once per run
        "max_abs_diff": float(np.abs(outs["onnxruntime"] - outs["torch"]).max()),
        "max_abs_feature": float(np.abs(outs["torch"]).max()),
    }


@click.command()
@click.option("--photos", default=4096, show_default=True, help="fashion-products photos per round")
@click.option("--rounds", default=5, show_default=True)
@click.option("--batch", default=128, show_default=True, help="huse-train's feature batch")
@click.option("--threads", default=2, show_default=True, help="torch and onnxruntime intra-op threads")
@click.option("--out", default="bench-results/feature_extraction.json", type=click.Path(dir_okay=False), show_default=True)
def main(photos, rounds, batch, threads, out) -> None:
    def body():
        r = run(photos, rounds, batch, threads)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(json.dumps(r["onnxruntime_over_torch_wall"]))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
