"""How much of the image answer on a small catalog is the frozen backbone's limit? (issue 19, item 4)

The icon catalogs' photos are line drawings, far from ImageNet: the tuned LR on the frozen EfficientNet-Lite0
features reads 31-58% image top-1. Here an image-only classifier trains the backbone's last blocks (`--from B`:
blocks B.. and the head conv; the earlier blocks' outputs are computed once and cached, so a step costs only the
tail) with a linear classifier on the same 1,984 pooled features, early-stopped on val image top-1, and is
compared with the tuned LR on the frozen features (C by 5-fold cross-validation grouped by product on train).
Both fit on train; top-1 on val and on the held-out test products.

    python benchmarks/experiments/image_tail_finetune.py --catalog phosphor-icons=data/phosphor-icons/catalog.csv \
        --from 11 --epochs 30 --out benchmarks/results/cpu-2core/quality/image_tail_finetune-from11.json
    (and --from 8 --lr 3e-4: image_tail_finetune-from8.json; more catalogs: repeat --catalog NAME=PATH)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from huse.runtime.preprocess import ImageSpec, load_image
from huse.train.backbones import backbone_info, create_backbone
from huse.train.data import load_catalog_dataset

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class Tail(torch.nn.Module):
    """Blocks `start`.. and the head of a Lite0 trunk, over cached inputs: (map at block start, earlier taps)."""

    def __init__(self, net, start: int):
        super().__init__()
        self.net, self.start = net, start

    def forward(self, x, early):
        pooled = list(early)
        for i in range(self.start, len(self.net._blocks)):
            x = self.net._blocks[i](x)
            if i in self.net._taps or i == len(self.net._blocks) - 1:
                pooled.append(x.mean(dim=(2, 3)))
        head = F.relu6(self.net._bn1(self.net._conv_head(x))).mean(dim=(2, 3))
        return torch.cat(pooled + [head], dim=1)


@torch.no_grad()
def cached_inputs(net, images, spec, start):
    maps, taps = [], []
    for s in range(0, len(images), 256):
        x = torch.from_numpy(np.stack([load_image(p, spec) for p in images[s:s + 256]]))
        x = F.relu6(net._bn0(net._conv_stem(x)))
        pooled = []
        for i in range(start):
            x = net._blocks[i](x)
            if i in net._taps:
                pooled.append(x.mean(dim=(2, 3)))
        maps.append(x)
        taps.append(pooled)
    return torch.cat(maps), [torch.cat(t) for t in zip(*taps)]


def tuned_lr(x, y, groups, train, evals):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(c, idx):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x[idx], y[idx])

    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(train, y[train], groups[train]))
    cv = {c: np.mean([(fit(c, train[a]).predict(x[train[b]]) == y[train[b]]).mean() for a, b in folds]) for c in C_GRID}
    best = max(cv, key=cv.get)
    clf = fit(best, train)
    return {"C": best, **{k: round(float((clf.predict(x[i]) == y[i]).mean()), 4) for k, i in evals.items()}}


def tail_finetune(net, start, maps, taps, y, n_classes, train, evals, epochs, lr, seed):
    torch.manual_seed(seed)
    tail = Tail(copy.deepcopy(net), start).eval()  # BatchNorm keeps ImageNet's statistics: small batches of icons
    for p in tail.parameters():
        p.requires_grad_(False)
    trained = [m for i, m in enumerate(tail.net._blocks) if i >= start] + [tail.net._conv_head, tail.net._bn1]
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    head = torch.nn.Linear(1984, n_classes)
    feats = lambda idx: tail(maps[idx], [t[idx] for t in taps])  # noqa: E731
    with torch.no_grad():
        f = feats(train)
        mu, sd = f.mean(0), f.std(0) + 1e-6
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=1e-4)
    yt = torch.from_numpy(y)
    best, history = (-1.0, 0, None), []
    for epoch in range(1, epochs + 1):
        perm = train[torch.randperm(len(train)).numpy()]
        for s in range(0, len(perm), 128):
            idx = perm[s:s + 128]
            loss = F.cross_entropy(head((feats(idx) - mu) / sd), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = {k: float((head((feats(i) - mu) / sd).argmax(1) == yt[i]).float().mean()) for k, i in evals.items()}
        history.append({"epoch": epoch, **{k: round(v, 4) for k, v in acc.items()}})
        if acc["val"] > best[0]:
            best = (acc["val"], epoch, acc)
    return {"best_epoch": best[1], **{k: round(v, 4) for k, v in best[2].items()}, "history": history}


def run(name, path, start, epochs, lr, seed):
    ds = load_catalog_dataset(path)
    labels = sorted(set(ds.classes))
    y = np.asarray([labels.index(c) for c in ds.classes])
    groups = np.unique(ds.product_ids, return_inverse=True)[1]
    splits = np.asarray(ds.splits)
    train, evals = np.flatnonzero(splits == "train"), {s: np.flatnonzero(splits == s) for s in ("val", "test")}
    info = backbone_info("efficientnet_lite0")
    spec = ImageSpec(size=(64, 64), mean=info.mean, std=info.std)
    net = create_backbone("efficientnet_lite0").eval()
    t = time.perf_counter()
    maps, taps = cached_inputs(net, ds.images, spec, start)
    with torch.no_grad():
        frozen = Tail(net, start)(maps, taps).numpy()
    out = {"cache_s": round(time.perf_counter() - t, 1), "lr_frozen": tuned_lr(frozen, y, groups, train, evals)}
    t = time.perf_counter()
    out["tail_finetune"] = tail_finetune(net, start, maps, taps, y, len(labels), train, evals, epochs, lr, seed)
    out["tail_finetune"]["train_s"] = round(time.perf_counter() - t, 1)
    print(name, json.dumps({k: v if k != "tail_finetune" else {a: b for a, b in v.items() if a != "history"}
                            for k, v in out.items()}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", action="append", required=True, help="NAME=PATH (repeat)")
    ap.add_argument("--from", dest="start", type=int, default=11, help="first trained block (Lite0 has 16)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    result = {"from": a.start, "epochs": a.epochs, "lr": a.lr, "seed": a.seed,
              "catalogs": {n: run(n, p, a.start, a.epochs, a.lr, a.seed) for n, p in (c.split("=", 1) for c in a.catalog)}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
