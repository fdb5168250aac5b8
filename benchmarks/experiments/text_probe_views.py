"""Can the text side learn more from frozen MiniLM than a linear probe on its sentence embedding? (issue 19, item 4)

On the small catalogs the fused answer is the title's, and HUSE's text tower reads the same frozen MiniLM sentence
embedding as the tuned LR it is measured against. Two things a ten-line probe does not do, tried on the probe
itself (so that the answer does not hang on HUSE's training):
- `views`: every training title also enters as its word-dropout variants (each word left out once, for titles of
  2+ words, embedded by the same frozen MiniLM), labelled as the title: a product never seen names itself with
  other words, and the variants teach which words of a name carry its class;
- `meanmax`: the mean-pooled embedding beside the max over the token states (both unit norm): a feature a pooled
  sentence embedding averages away.

Protocol (as the shipped model's): fit on train + val, C from (0.01 .. 10) by 5-fold cross-validation grouped by
product on those rows (variants only ever on a fold's training side), top-1 on the held-out test products.

    python benchmarks/experiments/text_probe_views.py --catalog phosphor-icons=data/phosphor-icons/catalog.csv \
        --catalog tabler-icons=data/tabler-icons/catalog.csv --catalog mdi-icons=data/mdi-icons/catalog.csv \
        --out benchmarks/results/cpu-2core/quality/text_probe_views.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from huse.runtime.tokenizer import normalise_title, words
from huse.train.data import load_catalog_dataset
from huse.train.minilm import Padded, load_minilm, minilm_tokenizer

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FOLDS = 5


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled, max-pooled) unit-norm MiniLM features of `texts`."""
    means, maxes = [], []
    for s in range(0, len(texts), 256):
        enc = tokenizer.inputs(texts[s:s + 256])
        ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"]).float()
        layout = Padded(mask)
        h = model.encoder(model.embeddings(ids, layout), (1.0 - mask)[:, None, None, :] * -10000.0, layout)
        m = mask.unsqueeze(-1)
        means.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1))
        maxes.append(F.normalize(h.masked_fill(m == 0, -1e4).amax(1), dim=1))
    return torch.cat(means).numpy(), torch.cat(maxes).numpy()


def variants(title: str) -> list[str]:
    w = words(title)
    return [" ".join(w[:i] + w[i + 1:]) for i in range(len(w))] if len(w) > 1 else []


def fit(c: float, x: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=c, max_iter=2000).fit(x, y)


def top1(clf, x: np.ndarray, y: np.ndarray) -> float:
    return float((clf.classes_[clf.predict_proba(x).argmax(1)] == y).mean())


def evaluate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, rows: np.ndarray, test: np.ndarray,
             extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> dict:
    """C by grouped k-fold on `rows`; test top-1 of the fit on all `rows`. `extra`: (features, labels, source row)
    of variants, added to a fit's training side wherever their source row is there."""
    from sklearn.model_selection import StratifiedGroupKFold

    def train_set(idx):
        if extra is None:
            return x[idx], y[idx]
        keep = np.isin(extra[2], idx)
        return np.concatenate([x[idx], extra[0][keep]]), np.concatenate([y[idx], extra[1][keep]])

    folds = list(StratifiedGroupKFold(FOLDS, shuffle=True, random_state=0).split(rows, y[rows], groups[rows]))
    cv = {}
    for c in C_GRID:
        correct = 0
        for tr, va in folds:
            correct += top1(fit(c, *train_set(rows[tr])), x[rows[va]], y[rows[va]]) * len(va)
        cv[c] = correct / len(rows)
    best = max(cv, key=cv.get)
    return {"C": best, "cv_top1": round(cv[best], 4), "test_top1": round(top1(fit(best, *train_set(rows)), x[test], y[test]), 4)}


def run(name: str, path: str) -> dict:
    ds = load_catalog_dataset(path)
    labels = sorted(set(ds.classes))
    y = np.asarray([labels.index(c) for c in ds.classes])
    groups = np.unique(ds.product_ids, return_inverse=True)[1]
    splits = np.asarray(ds.splits)
    rows, test = np.flatnonzero(splits != "test"), np.flatnonzero(splits == "test")
    titles = [normalise_title(t) or "" for t in ds.titles]
    model, tok = load_minilm().eval(), minilm_tokenizer()
    mean, mx = embed(model, tok, titles)
    src = [(i, v) for i in rows for v in variants(titles[i])]
    v_mean, v_max = embed(model, tok, [v for _, v in src])
    src_rows = np.asarray([i for i, _ in src])
    out = {"rows": int(len(rows)), "test_rows": int(len(test)), "variants": len(src)}
    out["mean"] = evaluate(mean, y, groups, rows, test, None)
    out["views"] = evaluate(mean, y, groups, rows, test, (v_mean, y[src_rows], src_rows))
    both = np.hstack([mean, mx])
    out["meanmax"] = evaluate(both, y, groups, rows, test, None)
    out["meanmax+views"] = evaluate(both, y, groups, rows, test, (np.hstack([v_mean, v_max]), y[src_rows], src_rows))
    print(name, json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", action="append", required=True, help="NAME=PATH (repeat)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    result = {name: run(name, path) for name, path in (c.split("=", 1) for c in a.catalog)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
