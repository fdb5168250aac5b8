"""What more models buy on a small catalog: seed ensembles of HUSE, and fine-tuned MiniLM (issue 19, item 4).

    OMP_NUM_THREADS=1 python benchmarks/experiments/small_catalog_limits.py --work runs/limits \\
        --catalog phosphor-icons=data/phosphor-icons/catalog.csv --catalog tabler-icons=data/tabler-icons/catalog.csv \\
        --catalog mdi-icons=data/mdi-icons/catalog.csv --out benchmarks/results/cpu-2core/quality/small_catalog_limits.json
    (about 10 minutes a catalog on one thread: the tuned LR's 60 fits take half of it)

Two things a tuned linear probe cannot do, measured against it on the same split and frozen features:

- *Seed ensembles.* The default recipe's held-out model (Trainer as `huse-train` runs it, trained on the train
  split with early stopping on val; `cv_folds=0`: the k-fold default's folds and refit left out) is trained with
  seeds 0..K-1, each read as a run reads itself (the fusion weight chosen on val). The
  ensemble averages the members' image and text probabilities, then chooses its fusion weight on val the
  same way; "+ LR" mixes the ensemble's fused probabilities with the tuned LR's, the mix chosen on val.
  If HUSE trails its probe because one small run is noisy, averaging runs should recover the gap.
- *Fine-tuned MiniLM.* A title-only probe whose encoder trains too: all-MiniLM-L6-v2 and a linear layer over its
  unit embedding (logits x 20), cross-entropy on each training product's title once an epoch, AdamW (encoder
  1e-4, head 1e-2, weight decay 0.01), batch 16, a fixed number of epochs; test top-1 after the last epoch and at the
  epoch val picks. This is what HUSE's text tower could reach if it trained the encoder: an upper bound on
  what fine-tuning would add to the fused answer, whose image weight on these catalogs is 0-0.2.

Per catalog the JSON holds the tuned LR's test top-1 (fused, image, text), each seed's, the ensembles' (1, 3, K
members) and the fine-tuned probes' per epoch. Probabilities of each seed are kept in WORK/NAME/seedS.npz.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

MODES = ("fused", "image", "text")


def top1(p: np.ndarray, y: np.ndarray) -> float:
    return round(float((p.argmax(1) == y).mean()), 4)


def read(val: dict, test: dict) -> dict:
    """Fusion weight on val (huse.train.baselines.best_weight, as a run chooses it), then test top-1 per mode."""
    from huse.train.baselines import best_weight

    w = best_weight(val["image"], val["text"], val["y"])[0]
    fused = w * test["image"] + (1 - w) * test["text"]
    return {"image_weight": w, "fused": top1(fused, test["y"]), "image": top1(test["image"], test["y"]),
            "text": top1(test["text"], test["y"])}


def train_seed(name: str, catalog: str, work: Path, seed: int) -> dict[str, np.ndarray]:
    """The default recipe with one seed, trained once: its val/test probabilities (and the tuned LR's, seed 0)."""
    cached = work / name / f"seed{seed}.npz"
    if cached.is_file():
        return dict(np.load(cached))
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    ds = load_catalog_dataset(catalog, seed=0)  # the benchmark catalogs keep their own split column
    t = Trainer(ds, work / name / f"run{seed}", HuseConfig(num_classes=0, text_encoder="auto", arch="compact"),
                TrainConfig(seed=seed, cv_folds=0), cache=work / name / "cache")
    t.finish = lambda progress=True: {}
    t.fit(progress=False)
    d = {"best_epoch": np.array(t.best["epoch"])}
    for s in ("val", "test"):
        pr = t.predict(s)
        d.update({f"{s}_image": pr["image"], f"{s}_text": pr["text"], f"{s}_y": pr["y"]})
    if seed == 0:  # the tuned LR on the same split and frozen features
        for s, probs in t.baselines()["tuned"].items():
            d.update({f"lr_{s}_{m}": probs[m] for m in MODES})
    np.savez(cached, **d)
    return d


def ensembles(name: str, catalog: str, work: Path, seeds: int) -> dict:
    runs = [train_seed(name, catalog, work, s) for s in range(seeds)]
    y = {s: runs[0][f"{s}_y"] for s in ("val", "test")}
    lr = {m: top1(runs[0][f"lr_test_{m}"], y["test"]) for m in MODES}
    split = lambda r, s: {"image": r[f"{s}_image"], "text": r[f"{s}_text"], "y": y[s]}
    out = {"lr_tuned": lr, "seeds": [dict(read(split(r, "val"), split(r, "test")), best_epoch=int(r["best_epoch"]))
                                     for r in runs], "ensembles": {}}
    for k in sorted({1, min(3, seeds), seeds}):
        avg = {s: {m: np.mean([r[f"{s}_{m}"] for r in runs[:k]], 0) for m in ("image", "text")} | {"y": y[s]}
               for s in ("val", "test")}
        out["ensembles"][k] = read(avg["val"], avg["test"])
        if k == seeds:  # the ensemble mixed with the tuned LR, the mix chosen on val (ties: the smaller LR share)
            w = out["ensembles"][k]["image_weight"]
            fused = {s: w * avg[s]["image"] + (1 - w) * avg[s]["text"] for s in ("val", "test")}
            a = max(np.linspace(1, 0, 11), key=lambda a: top1(a * fused["val"] + (1 - a) * runs[0]["lr_val_fused"], y["val"]))
            out["ensemble_plus_lr"] = {"huse_share": round(float(a), 2),
                                       "fused": top1(a * fused["test"] + (1 - a) * runs[0]["lr_test_fused"], y["test"])}
    out["seed_mean"] = {m: round(float(np.mean([r[m] for r in out["seeds"]])), 4) for m in MODES}
    return out


def finetuned_minilm(catalog: str, seed: int, epochs: int) -> dict:
    """The fine-tuned MiniLM title probe (module docstring): val and test top-1 after each epoch."""
    import torch
    import torch.nn.functional as F

    from huse.runtime.tokenizer import normalise_title
    from huse.train.data import load_catalog_dataset
    from huse.train.minilm import load_minilm, minilm_tokenizer

    ds = load_catalog_dataset(catalog, seed=0)
    labels = sorted(set(ds.classes))
    y = np.array([labels.index(c) for c in ds.classes])
    titles = np.array([normalise_title(t) or "" for t in ds.titles])
    enc = minilm_tokenizer(32).inputs(list(titles))
    ids, mask = torch.from_numpy(enc["input_ids"]).long(), torch.from_numpy(enc["attention_mask"]).long()
    rows = {s: ds.indices(s) for s in ("train", "val", "test")}
    train = rows["train"][np.unique(titles[rows["train"]], return_index=True)[1]]  # each product's title once
    torch.manual_seed(seed)
    encoder, head = load_minilm().train(), torch.nn.Linear(384, len(labels))
    opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 1e-2}],
                            weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def evaluate(split: str) -> float:  # each distinct title once, its answer given to every item that has it
        encoder.eval()
        r = rows[split]
        _, first, inv = np.unique(titles[r], return_index=True, return_inverse=True)
        pred = head(encoder(ids[r[first]], mask[r[first]])).argmax(1).numpy()[inv]
        encoder.train()
        return round(float((pred == y[r]).mean()), 4)

    curve = []
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen).numpy()]
        for s in range(0, len(order), 16):
            b = order[s:s + 16]
            loss = F.cross_entropy(head(encoder(ids[b], mask[b])) * 20.0, torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append({"val": evaluate("val"), "test": evaluate("test")})
    best = max(range(epochs), key=lambda e: curve[e]["val"])  # the first epoch with the best val top-1
    return {"seed": seed, "train_titles": len(train), "test_last": curve[-1]["test"], "val_best_epoch": best + 1,
            "test_at_val_best": curve[best]["test"], "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", action="append", required=True, metavar="NAME=CSV")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, default=5, help="ensemble members (seeds 0..N-1)")
    ap.add_argument("--finetune-seeds", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=12)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    result = json.loads(a.out.read_text()) if a.out.is_file() else {}
    for item in a.catalog:
        name, csv = item.split("=", 1)
        r = ensembles(name, csv, a.work, a.seeds)
        r["finetuned_minilm"] = [finetuned_minilm(csv, s, a.finetune_epochs) for s in range(a.finetune_seeds)]
        ft = r["finetuned_minilm"]
        r["finetuned_minilm_mean"] = {k: round(float(np.mean([f[k] for f in ft])), 4) for k in ("test_last", "test_at_val_best")}
        result[name] = r
        lr, e = r["lr_tuned"], r["ensembles"][a.seeds]
        print(f"{name}: tuned LR fused {lr['fused']:.3f} text {lr['text']:.3f}; HUSE seeds fused {r['seed_mean']['fused']:.3f} "
              f"(mean of {a.seeds}); ensemble of {a.seeds} fused {e['fused']:.3f} text {e['text']:.3f}; + LR "
              f"{r['ensemble_plus_lr']['fused']:.3f}; fine-tuned MiniLM text {r['finetuned_minilm_mean']['test_last']:.3f} "
              f"(last epoch), {r['finetuned_minilm_mean']['test_at_val_best']:.3f} (val-best epoch)", flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
