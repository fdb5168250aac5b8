"""Describing a batch (top-k classes and the top-down path) as the taxonomy grows: before and after.

    python benchmarks/experiments/describe_classes.py --out benchmarks/results/cpu-2core/describe_classes.json

After the model, `Classifier.classify` turns each row of probabilities into its top-k leaves and its top-down
path (`Classifier._top_k_and_paths`). Real taxonomies hold thousands of leaves (Google's product taxonomy
about 5,500). This times that step on synthetic three-level taxonomies of 10 to 4,000 leaves, batch 1 and
64, in one process, interleaved rounds, BLAS at its default threads:

- before: a full stable argsort for the top-k, every level's scores as a product with its 0/1 membership
  matrix, and the top-down step through a (parents, nodes) 0/-inf table per level (what the runtime did
  before session 32);
- after: `top_classes` (a partition first, for large batches), `Hierarchy.level_probs` (sums of runs of
  leaves) and the chosen parent's run of children (session 33), what it does now.

It also builds a 10,000-leaf hierarchy and says how much the dense matrices and tables of the old form held.
Both give the same top-k and paths (checked here on every configuration; scores to float32 rounding). Timings
are only meaningful on a quiet machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from huse.runtime.cli import run_cli

TAXONOMIES = {10: (2, 5, 1), 100: (5, 4, 5), 1000: (10, 10, 10), 4000: (20, 10, 20)}  # leaves: nodes per level


def run(batches: tuple[int, ...] = (1, 64), rounds: int = 5, top_k: int = 5) -> dict:
    from huse.runtime.classifier import top_classes
    from huse.runtime.hierarchy import Hierarchy

    class TablesHierarchy(Hierarchy):  # session 32: the top-down step through a (parents, nodes) 0/-inf table
        def __init__(self, labels):
            super().__init__(labels)
            self.outside = [None] + [np.where(self._parent[k][None, :] == np.arange(len(self.nodes[k - 1]))[:, None],
                                              0.0, -np.inf) for k in range(1, self.depth)]

        def level_probs(self, probs, level):  # session 32 gathered the leaves even when they were in order
            leaves, starts, single = self._runs[level - 1]
            taken = probs[..., np.arange(probs.shape[-1]) if leaves is None else leaves]
            return taken if single else np.add.reduceat(taken, starts, axis=-1)

        def top_down_dicts(self, probs):  # session 32's, line for line
            n = len(probs)
            every = np.arange(n)
            columns = []
            depth, chosen = np.full(n, self.depth), None
            for k, nodes in enumerate(self.nodes):
                scores = self.level_probs(probs, k + 1)
                if chosen is not None:
                    if not self._uniform:
                        depth[(depth > k) & ~self._has_children[k - 1][chosen]] = k
                    scores += self.outside[k][chosen]
                    if self._inner_classes:
                        own = self._own[k - 1][chosen]
                        stay = np.where(own >= 0, probs[every, np.maximum(own, 0)], -np.inf) >= scores.max(axis=1)
                        depth[(depth > k) & stay] = k
                chosen = scores.argmax(axis=1)
                level = k + 1
                columns.append([{"level": level, "label": nodes[j], "score": s}
                                for j, s in zip(chosen.tolist(), scores[every, chosen].tolist())])
            if self._uniform or (depth == self.depth).all():
                return [list(path) for path in zip(*columns)]
            return [list(path[:d]) for path, d in zip(zip(*columns), depth.tolist())]

    class BeforeHierarchy(TablesHierarchy):  # and before it, the dense 0/1 matrices and their products
        def __init__(self, labels):
            super().__init__(labels)
            self.matrices = [(self.class_nodes(k)[:, None] == np.arange(len(self.nodes[k - 1]))).astype(np.float32)
                             for k in range(1, self.depth + 1)]

        def level_probs(self, probs, level):
            return probs @ self.matrices[level - 1]

    def describe(h, labels, probs, top):
        order = top(probs, top_k)
        scores = probs[np.arange(len(probs))[:, None], order]
        flat = [{"label": labels[j], "score": s} for j, s in zip(order.ravel().tolist(), scores.ravel().tolist())]
        k = order.shape[1]
        return [dict(top_k=flat[i:i + k], path=p) for i, p in zip(range(0, len(flat), k), h.top_down_dicts(probs))]

    rng = np.random.default_rng(0)
    rows = []
    for n_classes, (a, b, c) in TAXONOMIES.items():
        labels = [f"a{i}<b{j}<c{k}" for i in range(a) for j in range(b) for k in range(c)]
        forms = {"before": (BeforeHierarchy(labels), lambda p, k: np.argsort(-p, axis=1, kind="stable")[:, :k]),
                 "session32": (TablesHierarchy(labels), top_classes), "after": (Hierarchy(labels), top_classes)}
        for batch in batches:
            probs = rng.dirichlet(np.ones(len(labels)), size=batch).astype(np.float32)
            out = {name: describe(h, labels, probs, top) for name, (h, top) in forms.items()}
            same = all(_same(x, y) and _same(z, y) for x, z, y in zip(out["before"], out["session32"], out["after"]))
            reps = max(3, int(2000 / (batch * max(1, n_classes // 100))))
            us: dict[str, list[float]] = {name: [] for name in forms}
            for _ in range(rounds):
                for name, (h, top) in forms.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        describe(h, labels, probs, top)
                    us[name].append(1e6 * (time.perf_counter() - t) / reps)
            ratios = {f"{name}_over_after": [x / y for x, y in zip(us[name], us["after"])] for name in ("before", "session32")}
            row = {"classes": len(labels), "batch": batch, "reps": reps, "same_answers": bool(same),
                   "us_per_batch": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in us.items()},
                   **{k: {"median": float(np.median(r)), "min": min(r), "max": max(r)} for k, r in ratios.items()}}
            med = {k: v["median"] for k, v in row["us_per_batch"].items()}
            click.echo(f"{len(labels)} classes, batch {batch}: before {med['before']:.0f} us, session 32 "
                       f"{med['session32']:.0f} us, after {med['after']:.0f} us ({row['before_over_after']['median']:.2f}x "
                       f"and {row['session32_over_after']['median']:.2f}x)", err=True)
            rows.append(row)
    labels = [f"a{i}<b{j}<c{k}" for i in range(25) for j in range(20) for k in range(20)]  # 10,000 leaves
    build = []
    for _ in range(3):
        t = time.perf_counter()
        h = Hierarchy(labels)
        build.append(time.perf_counter() - t)
    dense = sum(len(labels) * len(nodes) * 4 for nodes in h.nodes)  # the float32 0/1 matrices the old form kept
    tables = sum(len(up) * len(nodes) * 8 for up, nodes in zip(h.nodes, h.nodes[1:]))  # and its float64 0/-inf tables
    click.echo(f"10,000 leaves: built in {min(build):.3f} s; the old form kept {dense / 2**20:.0f} MiB of matrices "
               f"and {tables / 2**20:.0f} MiB of tables", err=True)
    return {"rounds": rounds, "top_k": top_k, "rows": rows,
            "hierarchy_10000_leaves": {"build_s": build, "dense_matrices_mib_before": dense / 2**20,
                                       "top_down_tables_mib_before": tables / 2**20}}


def _same(x: dict, y: dict) -> bool:
    """The same top-k labels and path labels, scores equal to float32 rounding."""
    labels = [t["label"] for t in x["top_k"]] == [t["label"] for t in y["top_k"]]
    path = [p["label"] for p in x["path"]] == [p["label"] for p in y["path"]]
    scores = np.allclose([p["score"] for p in x["path"]], [p["score"] for p in y["path"]], rtol=1e-5, atol=1e-7)
    return labels and path and scores


@click.command()
@click.option("--rounds", default=5, show_default=True)
@click.option("--out", default="bench-results/describe_classes.json", type=click.Path(dir_okay=False), show_default=True)
def main(rounds, out) -> None:
    def body():
        r = run(rounds=rounds)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
        click.echo(f"wrote {out}")
    run_cli(body)


if __name__ == "__main__":
    main()
