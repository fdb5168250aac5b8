"""Nearest training products against the tuned LR on frozen MiniLM title features (issue 19: more than a linear probe).

    python benchmarks/experiments/text_knn.py --out benchmarks/results/cpu-2core/quality/text_knn.json \\
        data/phosphor-icons/catalog.csv data/tabler-icons/catalog.csv data/mdi-icons/catalog.csv

A one-off experiment (about 3 minutes). On the small catalogs HUSE's fused answer is the title's, and its text
tower is the same model class as the tuned LR on the frozen MiniLM features; docs/quality.md measures that
averaging runs or mixing in the LR adds nothing. A nearest-neighbour vote is the one cheap non-linear reader of
those features (icon names share words with their neighbours: `arrow badge down`, `arrow badge up`), and what
HUSE's retrieval index could serve. Per catalog: each title's L2-normalised MiniLM embedding, the training
products' mean embeddings, a softmax (temperature t) over the cosine of the k nearest as the vote; k and t, the
LR's C (the baseline's grid, on standardised features as the baseline reads them) and a mixing weight chosen by the baseline's own folds (5, by product) on train + val;
test top-1 of each, fitted on train + val. Needs the catalogs' `split` column (huse.benchmarks.catalogs).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli

KS = (1, 3, 5, 10, 20)
TEMPERATURES = (0.02, 0.05, 0.1)
WEIGHTS = tuple(np.round(np.linspace(0, 1, 11), 2))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_probs(x_train, y_train, groups, x_eval, n_classes: int, k: int, t: float) -> np.ndarray:
    """The k nearest training products' (mean embedding, cosine) votes, each exp(cosine / t); rows sum to 1."""
    products = np.unique(groups)
    centres = _unit(np.stack([x_train[groups == p].mean(0) for p in products]))
    label = np.array([y_train[groups == p][0] for p in products])
    sims = x_eval @ centres.T
    nearest = np.argsort(-sims, axis=1)[:, :k]
    p = np.zeros((len(x_eval), n_classes))
    for i, js in enumerate(nearest):
        np.add.at(p[i], label[js], np.exp((sims[i, js] - sims[i, js].max()) / t))
    return p / p.sum(1, keepdims=True)


@click.command()
@click.argument("catalogs", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def main(catalogs, out) -> None:
    """Test top-1 of the tuned text LR, the nearest-products vote and their CV-weighted mix on each catalog."""
    def body():
        from huse.train.baselines import (C_GRID, CV_FOLDS, _cross_validate, _fit_predict, _pick_c, _standardise,
                                          product_folds)
        from huse.train.minilm import embed_texts

        result = {}
        for path in catalogs:
            rows = list(csv.DictReader(open(path, newline="")))
            labels = sorted({r["classes"] for r in rows})
            y = np.array([labels.index(r["classes"]) for r in rows])
            groups = np.array([r["product_id"] for r in rows])
            split = np.array([r["split"] for r in rows])
            titles = sorted({r["name"] for r in rows})
            emb = _unit(embed_texts(titles, progress=False))
            x = emb[[titles.index(r["name"]) for r in rows]]
            fit, test = np.flatnonzero(split != "test"), np.flatnonzero(split == "test")
            cv_rows, folds = product_folds(y[fit], groups[fit], CV_FOLDS, seed=0, sample=False)
            xf, yf, gf = x[fit][cv_rows], y[fit][cv_rows], groups[fit][cv_rows]
            s_fit, s_test = _standardise(x[fit], x[test])  # the LR reads standardised features, as the baseline does
            sf = s_fit[cv_rows]
            y_oof = np.concatenate([yf[b] for _, b in folds])
            c, _ = _pick_c(_cross_validate(sf, yf, len(labels), folds), y_oof)
            lr_oof = np.concatenate([_fit_predict(c, sf[a], yf[a], len(labels), [sf[b]])[0] for a, b in folds])

            def top1(p, truth):
                return float((p.argmax(1) == truth).mean())

            def knn_oof(k, t):
                return np.concatenate([knn_probs(xf[a], yf[a], gf[a], xf[b], len(labels), k, t) for a, b in folds])

            knn_cv = {(k, t): top1(knn_oof(k, t), y_oof) for k in KS for t in TEMPERATURES}
            k, t = max(knn_cv, key=knn_cv.get)
            kn_oof = knn_oof(k, t)
            mix_cv = {w: top1(w * kn_oof + (1 - w) * lr_oof, y_oof) for w in WEIGHTS}
            w = max(mix_cv, key=lambda v: (mix_cv[v], -v))  # ties to the LR alone
            lr_test = _fit_predict(c, s_fit, y[fit], len(labels), [s_test])[0]
            kn_test = knn_probs(x[fit], y[fit], groups[fit], x[test], len(labels), k, t)
            result[Path(path).parent.name] = {
                "rows": {"fit": int(len(fit)), "test": int(len(test))},
                "lr": {"C": c, "cv_top1": top1(lr_oof, y_oof), "test_top1": top1(lr_test, y[test])},
                "knn": {"k": k, "temperature": t, "cv_top1": knn_cv[(k, t)], "test_top1": top1(kn_test, y[test])},
                "mix": {"knn_weight": float(w), "cv_top1": mix_cv[w],
                        "test_top1": top1(w * kn_test + (1 - w) * lr_test, y[test])},
            }
            r = result[Path(path).parent.name]
            click.echo(f"{Path(path).parent.name}: test top-1 LR (C={c}) {100 * r['lr']['test_top1']:.1f}%, "
                       f"nearest products (k={k}, t={t}) {100 * r['knn']['test_top1']:.1f}%, mix (weight {w}) "
                       f"{100 * r['mix']['test_top1']:.1f}%; CV {100 * r['lr']['cv_top1']:.1f} / "
                       f"{100 * r['knn']['cv_top1']:.1f} / {100 * r['mix']['cv_top1']:.1f}%")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"grid": {"C": list(C_GRID), "k": list(KS), "temperature": list(TEMPERATURES),
                                                  "knn_weight": [float(v) for v in WEIGHTS]}, "catalogs": result},
                                        indent=1) + "\n")
    run_cli(body)


if __name__ == "__main__":
    main()
