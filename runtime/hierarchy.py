"""Hierarchical class paths such as `clothing<tops<t-shirts` and per-level scores."""

from __future__ import annotations

import numpy as np

from huse.runtime.errors import HuseError

SEPARATOR = "<"


def split_path(path: str) -> tuple[str, ...]:
    """`"a < b<c"` -> ("a", "b", "c"); raises HuseError on an empty class or level."""
    parts = tuple(p.strip() for p in str(path).split(SEPARATOR))
    if not path or not all(parts):
        raise HuseError(f"class path {path!r} is empty or has an empty level; expected e.g. 'clothing<tops<t-shirts'")
    return parts


def canonical(path: str) -> str:
    return SEPARATOR.join(split_path(path))


class Hierarchy:
    """Leaf labels (full paths) and the prefix nodes above them.

    Leaves may have different depths; a leaf of depth d counts toward levels 1..d only.

    Args:
        labels: canonical leaf paths, in the classifier's output order.
    """

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.paths = [split_path(l) for l in self.labels]
        self.depth = max(len(p) for p in self.paths)
        # levels[k] = (node names at level k+1, matrix (num_leaves, num_nodes) of 0/1 membership)
        self.levels: list[tuple[list[str], np.ndarray]] = []
        for k in range(self.depth):
            nodes = sorted({SEPARATOR.join(p[: k + 1]) for p in self.paths if len(p) > k})
            col = {n: i for i, n in enumerate(nodes)}
            m = np.zeros((len(self.labels), len(nodes)), dtype=np.float32)
            for i, p in enumerate(self.paths):
                if len(p) > k:
                    m[i, col[SEPARATOR.join(p[: k + 1])]] = 1.0
            self.levels.append((nodes, m))

    def level_probs(self, probs: np.ndarray, level: int) -> np.ndarray:
        """Scores of the nodes at `level` (1-based): each node is the sum of its leaves."""
        return probs @ self.levels[level - 1][1]

    def path(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """Top-down path for one item: the best node at each level among the best parent's children.

        Args:
            probs: (num_leaves,) leaf probabilities.
        Returns:
            [(node path, score), ...] from the root level down to a leaf.
        """
        out: list[tuple[str, float]] = []
        prefix = ""
        for nodes, m in self.levels:
            scores = probs @ m
            candidates = [i for i, n in enumerate(nodes) if not prefix or n.startswith(prefix + SEPARATOR)]
            if not candidates:
                break  # the chosen parent is itself a leaf
            best = max(candidates, key=lambda i: scores[i])
            out.append((nodes[best], float(scores[best])))
            prefix = nodes[best]
        return out

    def distance_matrix(self) -> np.ndarray:
        """Class-to-class distance from the hierarchy, in [0, 1].

        A_ij = 1 - (length of the shared path prefix) / (depth of the deeper class):
        0 for the same class, 1 for classes under different roots.
        """
        n = len(self.paths)
        a = np.zeros((n, n), dtype=np.float32)
        for i, p in enumerate(self.paths):
            for j, q in enumerate(self.paths):
                shared = 0
                for x, y in zip(p, q):
                    if x != y:
                        break
                    shared += 1
                a[i, j] = 1.0 - shared / max(len(p), len(q))
        return a
