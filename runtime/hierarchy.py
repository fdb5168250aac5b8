"""Hierarchical class paths such as `clothing<tops<t-shirts` and per-level scores."""

from __future__ import annotations

import numpy as np

from huse.runtime.errors import HuseError

SEPARATOR = "<"
# Google's and Shopify's product taxonomies write "Apparel & Accessories > Clothing > Shirts & Tops"
TAXONOMY_SEPARATOR = ">"


def split_path(path: str) -> tuple[str, ...]:
    """`"a < b<c"` -> ("a", "b", "c"), and a path without `<` split at `>` as product taxonomies write
    it (`"a > b > c"` -> the same); raises HuseError on an empty class or level."""
    text = str(path)
    sep = SEPARATOR if SEPARATOR in text or TAXONOMY_SEPARATOR not in text else TAXONOMY_SEPARATOR
    parts = tuple(p.strip() for p in text.split(sep))
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
        # nodes[k] = the node names at level k+1; _node[k] = each class's node there (-1: its path ends above);
        # _runs[k] = (the leaves in node order, where each node's run of leaves starts, whether every run is one
        # leaf). A level's scores are sums of runs of leaves (np.add.reduceat), not a product with a 0/1
        # membership matrix: that matrix is classes x nodes (at 10,000 leaves, 400 MiB) and so is the product's
        # cost (4,000 leaves, a batch of 64: 18-34 ms; benchmarks/experiments/describe_classes.py).
        self.nodes: list[list[str]] = []
        self._node: list[np.ndarray] = []
        self._runs: list[tuple[np.ndarray, np.ndarray, bool]] = []
        for k in range(self.depth):
            names = sorted({SEPARATOR.join(p[: k + 1]) for p in self.paths if len(p) > k})
            col = {n: i for i, n in enumerate(names)}
            node = np.array([col[SEPARATOR.join(p[: k + 1])] if len(p) > k else -1 for p in self.paths], dtype=np.int64)
            leaf = np.flatnonzero(node >= 0)
            leaf = leaf[np.argsort(node[leaf], kind="stable")]  # node-major, leaves ascending within a node
            starts = np.flatnonzero(np.r_[True, node[leaf][1:] != node[leaf][:-1]])  # every node has a leaf
            self.nodes.append(names)
            self._node.append(node)
            # leaves already in node order (sorted labels, the usual case): no gather, the columns are used as they are
            in_order = len(leaf) == len(node) and (leaf == np.arange(len(node))).all()
            self._runs.append((None if in_order else leaf, starts, len(starts) == len(leaf)))
        # _parent[k][j] = index, among the nodes of level k, of the parent of node j of level k+1
        self._parent = [np.zeros(0, dtype=np.int64)]
        for k in range(1, self.depth):
            up = {n: i for i, n in enumerate(self.nodes[k - 1])}
            self._parent.append(np.array([up[n.rsplit(SEPARATOR, 1)[0]] for n in self.nodes[k]], dtype=np.int64))
        # For top_down_dicts: a node's children are a run of the next level's sorted names (all start with
        # "node<"), so choosing among the chosen parent's children reads that run's columns, not the whole level
        # (a (parents, nodes) 0/-inf table was 38 MiB at 10,000 leaves, and a batch's cost grew with it). Per level
        # below the root: (each parent's first child, its number of children, arange(the most children of any
        # parent), whether some parent has fewer).
        self._children: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = [(np.zeros(0, np.int64),) * 3 + (False,)]
        for k in range(1, self.depth):
            count = np.bincount(self._parent[k], minlength=len(self.nodes[k - 1]))
            first = np.zeros(len(count), dtype=np.int64)
            first[self._parent[k][::-1]] = np.arange(len(self._parent[k]))[::-1]  # each parent's lowest child index
            self._children.append((first, count, np.arange(count.max()), bool((count < count.max()).any())))
        # _has_children[k][i]: node i of level k has children at level k+1 (else it is a leaf: a path ends there)
        self._has_children = [count > 0 for _, count, _, _ in self._children[1:]]
        # _own[k][i]: the class index of node i of level k when that node is a class itself as well as a parent
        # (products filed under "clothing" beside others under "clothing<tops", as taxonomies have it), else -1
        index = {label: i for i, label in enumerate(self.labels)}
        self._own = [np.array([index[n] if n in index and has else -1 for n, has in zip(nodes, children)])
                     for nodes, children in zip(self.nodes, self._has_children)]
        self._inner_classes = any((own >= 0).any() for own in self._own)
        # Every leaf as deep as the deepest (the usual catalog): no path ends early, so top_down_dicts skips
        # the bookkeeping of where each path ends (five array operations a level, a third of a batch of 1's time).
        self._uniform = all(len(p) == self.depth for p in self.paths)

    def level_probs(self, probs: np.ndarray, level: int) -> np.ndarray:
        """Scores (N, nodes) of the nodes at `level` (1-based): each node is the sum of its leaves. Where each
        node of the level is one leaf, in order, this is `probs` itself: do not write to it."""
        leaves, starts, single = self._runs[level - 1]
        taken = probs if leaves is None else probs[..., leaves]
        return taken if single else np.add.reduceat(taken, starts, axis=-1)

    def class_nodes(self, level: int) -> np.ndarray:
        """(C,) each class's node at `level` (1-based; an index into `nodes[level - 1]`), -1 where its path ends
        above that level. Read-only."""
        return self._node[level - 1]

    def path(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """`top_down` for one item: probs (num_leaves,) -> [(node path, score), ...]."""
        return self.top_down(np.asarray(probs)[None])[0]

    def top_down(self, probs: np.ndarray) -> list[list[tuple[str, float]]]:
        """Top-down paths of a batch: the best node at each level among the best parent's children.

        Args:
            probs: (N, num_leaves) leaf probabilities.
        Returns:
            For each item, [(node path, score), ...] from the root level down to a leaf (ties go
            to the first node in sorted order).
        """
        return [[(d["label"], d["score"]) for d in path] for path in self.top_down_dicts(probs)]

    def top_down_dicts(self, probs: np.ndarray) -> list[list[dict]]:
        """`top_down` as the runtime returns it: for each item [{"level", "label", "score"}, ...]."""
        n = len(probs)
        every = np.arange(n)
        rows = every[:, None]
        columns: list[list[dict]] = []  # per level, the dict of each item's chosen node
        depth, chosen = np.full(n, self.depth), None
        for k, nodes in enumerate(self.nodes):
            scores = self.level_probs(probs, k + 1)  # may be probs itself: never written to
            if chosen is None:
                chosen = scores.argmax(axis=1)
            else:  # only the children of the node chosen one level up: (n, most children) of the level's columns
                if not self._uniform:
                    depth[(depth > k) & ~self._has_children[k - 1][chosen]] = k  # it was a leaf: the path ended
                first, count, offsets, uneven = self._children[k]
                start = first[chosen]
                if uneven:  # a parent with fewer children reads past its run, and past the level for the last one
                    sub = scores[rows, np.minimum(start[:, None] + offsets, len(nodes) - 1)]
                    sub[offsets >= count[chosen][:, None]] = -np.inf
                else:
                    sub = scores[rows, start[:, None] + offsets]
                if self._inner_classes:  # a parent that is a class too: the path ends there if it beats every child
                    own = self._own[k - 1][chosen]
                    stay = np.where(own >= 0, probs[every, np.maximum(own, 0)], -np.inf) >= sub.max(axis=1)
                    depth[(depth > k) & stay] = k
                chosen = start + sub.argmax(axis=1)  # a leaf's row has no children: 0, cut off by depth
            level = k + 1
            columns.append([{"level": level, "label": nodes[j], "score": s}
                            for j, s in zip(chosen.tolist(), scores[every, chosen].tolist())])
        # Built a level at a time and zipped into paths: one comprehension per level rather than a Python
        # step per item and level (the dicts are most of what describing a batch costs).
        if self._uniform or (depth == self.depth).all():
            return [list(path) for path in zip(*columns)]
        return [list(path[:d]) for path, d in zip(zip(*columns), depth.tolist())]

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
