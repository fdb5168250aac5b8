"""What holds photo-to-photo retrieval back: the image tower or the backbone's features?

    python benchmarks/experiments/image_features.py --out benchmarks/results/cpu-2core/image_features.json

A one-off experiment, kept outside the installed package so its committed result stays reproducible.
It takes the tower out of the question: one 512-wide layer and the shared cosine classifier, trained on
image classification alone (no title, no graph, gap or instance term), over EfficientNet-Lite0 at
huse-train's default 64x64 input. Per variant it reports test top-1 and photo-to-photo class-level R@1
over all test photos (each photo against the others), the metric of `huse-bench retrieval`:

- global: the default features, the last four stages and the head averaged over the whole map (1,984-d);
- grid: the same maps averaged over each quarter of the map (2x2 grid, 7,936-d).

Measured (benchmarks/results/cpu-2core/image_features.json): test R@1 0.889 global, 0.897 grid; HUSE's
default recipe gives 0.874 over the global features. A one-off run that also fine-tuned blocks 11-15 and
the head from cached block-10 outputs (BN frozen, lr 1e-4) reached 0.898, at ~2 minutes per epoch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli


def grid_pool(x):
    """(N, C, H, W) -> (N, 4C): the mean of each quarter of the map (overlapping when H or W is odd)."""
    import torch

    h, w = x.shape[2], x.shape[3]
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    quarters = [x[:, :, :h2, :w2], x[:, :, :h2, w - w2:], x[:, :, h - h2:, :w2], x[:, :, h - h2:, w - w2:]]
    return torch.cat([q.mean(dim=(2, 3)) for q in quarters], 1)


def run(dataset: str = "fashion-products", size: int = 64, epochs: int = 8, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    from huse.runtime.preprocess import ImageSpec, load_image
    from huse.train.backbones import backbone_info, create_backbone
    from huse.train.data import load_builtin
    from huse.train.model import FeatureNorm, SharedClassifier, mlp

    torch.manual_seed(seed)
    ds = load_builtin(dataset)
    info = backbone_info("efficientnet_lite0")
    spec = ImageSpec(size=(size, size), mean=info.mean, std=info.std)
    bb = create_backbone("efficientnet_lite0").eval().requires_grad_(False)
    labels = sorted(set(ds.classes))
    y = torch.tensor([labels.index(c) for c in ds.classes])
    split = {s: torch.from_numpy(ds.indices(s)) for s in ("train", "val", "test")}
    last = len(bb._blocks) - 1

    # One pass over every photo: the tapped maps and the head, pooled both ways.
    t0 = time.perf_counter()
    pooled = {"global": [], "grid": []}
    with torch.no_grad():
        for s in range(0, len(ds.images), 256):
            x = torch.from_numpy(np.stack([load_image(im, spec) for im in ds.images[s:s + 256]]))
            x = F.relu6(bb._bn0(bb._conv_stem(x)))
            maps = []
            for i, block in enumerate(bb._blocks):
                x = block(x)
                if i in bb._taps or i == last:
                    maps.append(x)
            maps.append(F.relu6(bb._bn1(bb._conv_head(x))))
            pooled["global"].append(torch.cat([m.mean(dim=(2, 3)) for m in maps], 1))
            pooled["grid"].append(torch.cat([grid_pool(m) for m in maps], 1))
    feats = {k: torch.cat(v) for k, v in pooled.items()}
    out = {"dataset": dataset, "image_size": size, "epochs": epochs, "test_size": len(split["test"]),
           "extract_s": round(time.perf_counter() - t0, 1), "variants": {}}

    def train(name, features):
        torch.manual_seed(seed)
        dim = features.shape[1]
        norm = FeatureNorm(dim)
        norm.set_stats(features[split["train"]])
        tower, clf = mlp(dim, 512, 1, 512, 0.5), SharedClassifier(512, len(labels))

        def embed(idx):
            return F.normalize(tower(norm(features[idx])), dim=-1)

        opt = torch.optim.AdamW([*tower.parameters(), *clf.parameters()], lr=1e-3, weight_decay=1e-4)
        train_idx, gen = split["train"], torch.Generator().manual_seed(seed)
        steps = math.ceil(len(train_idx) / 256)
        t = time.perf_counter()
        for ep in range(epochs):
            tower.train()
            perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
            for s in range(0, len(perm), 256):
                for g in opt.param_groups:
                    g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * (ep * steps + s // 256) / (epochs * steps)))
                idx = perm[s:s + 256]
                loss = F.cross_entropy(clf(embed(idx)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        tower.eval()
        row = {"dim": dim, "train_s": round(time.perf_counter() - t, 1)}
        for sp in ("val", "test"):
            with torch.no_grad():
                e = torch.cat([embed(split[sp][s:s + 1024]) for s in range(0, len(split[sp]), 1024)])
            yy = y[split[sp]]
            sim = e @ e.T
            sim.fill_diagonal_(-2.0)  # the query itself is not a result
            row[sp] = {"top1": round(float((clf(e).argmax(1) == yy).float().mean()), 4),
                       "i2i_r1": round(float((yy[sim.argmax(1)] == yy).float().mean()), 4)}
        out["variants"][name] = row
        click.echo(f"{name}: {json.dumps(row)}", err=True)

    train("global", feats["global"])
    train("grid", feats["grid"])
    return out


@click.command()
@click.option("--dataset", type=click.Choice(["fashion-products", "fashion-products-open"]), default="fashion-products",
              show_default=True)
@click.option("--image-size", default=64, show_default=True)
@click.option("--epochs", default=8, show_default=True)
@click.option("--out", default="bench-results/image_features.json", type=click.Path(dir_okay=False), show_default=True)
def main(dataset, image_size, epochs, out) -> None:
    def body():
        r = run(dataset, image_size, epochs)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
