"""Hierarchical class paths: per-level scores, the top-down path, the distance matrix."""

from __future__ import annotations

import numpy as np
import pytest

from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import Hierarchy, canonical, split_path

# Leaves of mixed depth: two at depth 3, one at depth 2, one root that is itself a leaf.
LABELS = ["a<b<c", "a<b<d", "a<e", "f"]
A_B_C, A_B_D, A_E, F = range(4)


@pytest.fixture
def h() -> Hierarchy:
    return Hierarchy(LABELS)


def test_levels_and_depth(h):
    assert h.depth == 3
    assert h.nodes == [["a", "f"], ["a<b", "a<e"], ["a<b<c", "a<b<d"]]


def test_level_probs_sum_leaves_into_parents(h):
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=5).astype(np.float32)  # (5 items, 4 leaves)
    l1, l2, l3 = (h.level_probs(probs, k) for k in (1, 2, 3))
    assert l1.shape == (5, 2) and l2.shape == (5, 2) and l3.shape == (5, 2)
    tol = dict(rtol=0, atol=1e-6)  # fp32 sums of 4 values in [0, 1]
    # level 1: a = a<b<c + a<b<d + a<e ; f = f
    np.testing.assert_allclose(l1[:, 0], probs[:, A_B_C] + probs[:, A_B_D] + probs[:, A_E], **tol)
    np.testing.assert_allclose(l1[:, 1], probs[:, F], **tol)
    # level 2: a<b = a<b<c + a<b<d ; a<e = a<e ; f has no level-2 node
    np.testing.assert_allclose(l2[:, 0], probs[:, A_B_C] + probs[:, A_B_D], **tol)
    np.testing.assert_allclose(l2[:, 1], probs[:, A_E], **tol)
    # level 3: the deep leaves themselves
    np.testing.assert_allclose(l3, probs[:, [A_B_C, A_B_D]], **tol)
    # each parent equals the sum of its children one level down
    np.testing.assert_allclose(l1[:, 0], l2.sum(axis=1), **tol)
    np.testing.assert_allclose(l2[:, 0], l3.sum(axis=1), **tol)
    # the whole mass is at level 1
    np.testing.assert_allclose(l1.sum(axis=1), probs.sum(axis=1), **tol)


def test_path_goes_top_down_to_a_deep_leaf(h):
    probs = np.array([0.1, 0.35, 0.25, 0.3])  # a = 0.7 beats f = 0.3; a<b = 0.45 beats a<e
    path = h.path(probs)
    assert [n for n, _ in path] == ["a", "a<b", "a<b<d"]
    np.testing.assert_allclose([s for _, s in path], [0.7, 0.45, 0.35], rtol=0, atol=1e-12)


def test_path_follows_the_best_parent_not_the_best_leaf(h):
    # f is the single best leaf, but a's leaves together outweigh it
    probs = np.array([0.2, 0.2, 0.2, 0.4])
    assert [n for n, _ in h.path(probs)] == ["a", "a<b", "a<b<c"]


def test_path_stops_at_a_leaf_of_smaller_depth(h):
    probs = np.array([0.1, 0.1, 0.5, 0.3])  # a<e (depth 2) wins under a
    path = h.path(probs)
    assert [n for n, _ in path] == ["a", "a<e"]
    np.testing.assert_allclose(path[-1][1], 0.5, rtol=0, atol=1e-12)


def test_path_stops_at_a_root_leaf(h):
    probs = np.array([0.1, 0.1, 0.1, 0.7])
    path = h.path(probs)
    assert [n for n, _ in path] == ["f"]
    np.testing.assert_allclose(path[0][1], 0.7, rtol=0, atol=1e-12)


def test_top_down_of_a_batch_is_each_row_s_path(h):
    """Rows ending at different depths (root leaf, depth 2, depth 3) in one batch, as classify runs them."""
    probs = np.array([[0.1, 0.35, 0.25, 0.3], [0.1, 0.1, 0.5, 0.3], [0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.2, 0.4]])
    paths = h.top_down(probs)
    assert [[n for n, _ in p] for p in paths] == [["a", "a<b", "a<b<d"], ["a", "a<e"], ["f"], ["a", "a<b", "a<b<c"]]
    for row, p in zip(probs, paths):
        assert p == h.path(row)


def _path_one_item(labels: list[str], row: np.ndarray) -> list[dict]:
    """The top-down rule written plainly for one item: at each level the best child of the node chosen above
    (a node's score is the sum of its leaves, in float32 and class order as the runtime sums them, with
    np.add.reduceat, whose order differs from ndarray.sum's in the last bit; ties to the first in order),
    unless the node chosen above is a class itself whose own probability is at least that child's."""
    out, parent = [], None
    for level in range(1, max(l.count("<") + 1 for l in labels) + 1):
        nodes = sorted({"<".join(l.split("<")[:level]) for l in labels if l.count("<") + 1 >= level})
        if parent is not None:
            nodes = [n for n in nodes if n.rsplit("<", 1)[0] == parent]
        if not nodes:
            break
        scores = np.array([np.add.reduceat(row[[i for i, l in enumerate(labels) if l == n or l.startswith(n + "<")]], [0])[0]
                           for n in nodes])
        best = int(scores.argmax())
        if parent in labels and row[labels.index(parent)] >= scores[best]:
            break
        parent = nodes[best]
        out.append({"level": level, "label": parent, "score": float(scores[best])})
    return out


def test_a_class_that_is_also_a_parent_ends_the_path_when_it_beats_its_children():
    """Taxonomies file some products under "clothing" and others under "clothing<tops": the path stops at
    "clothing" when that class itself is likelier than any child (it went down to the child before)."""
    h = Hierarchy(["a", "a<b", "a<c", "d<e"])
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.3, 0.3, 0.1, 0.3]], np.float32)
    assert [[n for n, _ in p] for p in h.top_down(probs)] == [["a"], ["a", "a<b"], ["a"]]  # a tie stays
    assert h.path(probs[0])[0][1] == pytest.approx(0.9)  # the node's score is still the sum of its leaves


def test_top_down_dicts_follow_the_rule_on_random_hierarchies():
    rng = np.random.default_rng(0)
    for i in range(80):
        depth = rng.integers(1, 5)  # half the hierarchies have every leaf at one depth (top_down_dicts' fast case)
        # "n1 x" sorts between "n1" and "n1<...": a node's children must still be found as its own
        labels = sorted({"<".join(f"n{rng.integers(3)}{' x' * (rng.random() < 0.2)}"
                                  for _ in range(depth if i % 2 else rng.integers(1, 5)))
                         for _ in range(rng.integers(2, 30))})
        if i % 4 >= 2:  # a model's classes in another order than sorted
            labels = [labels[j] for j in rng.permutation(len(labels))]
        h = Hierarchy(labels)
        assert h._uniform == (len({l.count("<") for l in labels}) == 1)
        probs = rng.random((40, len(labels)), dtype=np.float32)
        probs[::3] = np.round(probs[::3], 1)  # ties
        before = probs.copy()
        got, want = h.top_down_dicts(probs), [_path_one_item(labels, row) for row in probs]
        np.testing.assert_array_equal(probs, before)  # the caller's probabilities are read, never written
        assert [[(d["level"], d["label"]) for d in p] for p in got] == [[(d["level"], d["label"]) for d in p] for p in want]
        assert [d["score"] for p in got for d in p] == pytest.approx([d["score"] for p in want for d in p], rel=1e-6)
        assert got == [h.top_down_dicts(probs[r:r + 1])[0] for r in range(len(probs))]  # each row's, alone or batched


def test_level_scores_of_a_large_taxonomy_are_its_membership_sums():
    """4,000 leaves under 20 x 10 nodes (level scores are sums of runs of leaves, not a matrix product)."""
    labels = [f"a{i}<b{j}<c{k}" for i in range(20) for j in range(10) for k in range(20)]
    h = Hierarchy(labels)
    probs = np.random.default_rng(1).dirichlet(np.ones(len(labels)), size=64).astype(np.float32)
    for level, nodes in enumerate(h.nodes, start=1):
        m = (h.class_nodes(level)[:, None] == np.arange(len(nodes))).astype(np.float32)  # (classes, nodes) 0/1
        got = h.level_probs(probs, level)
        assert got.shape == (64, len(nodes)) and got.dtype == np.float32
        np.testing.assert_allclose(got, probs.astype(np.float64) @ m, rtol=1e-5, atol=1e-7)
    leaves = [labels.index(n) for n in h.nodes[2]]  # nodes sort by name: c10 before c2
    np.testing.assert_array_equal(h.level_probs(probs, 3), probs[:, leaves])  # one leaf a node: the leaves themselves


def test_a_large_taxonomy_holds_no_table_of_its_size():
    """10,000 leaves: what Hierarchy keeps grows with the classes, not with classes x nodes (a (parents, nodes)
    table per level for the top-down step held 38 MiB here, and 0/1 membership matrices 400 MiB before that)."""
    labels = [f"a{i}<b{j}<c{k}" for i in range(25) for j in range(20) for k in range(20)]
    h = Hierarchy(labels)

    def arrays(x):
        if isinstance(x, np.ndarray):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from arrays(y)

    held = sum(a.nbytes for v in vars(h).values() for a in arrays(v))
    assert held < 100 * len(labels), held  # bytes: a few int64 per class and node
    probs = np.random.default_rng(2).dirichlet(np.ones(len(labels)), size=8).astype(np.float32)
    want = [_path_one_item(labels, row) for row in probs]
    assert [[d["label"] for d in p] for p in h.top_down_dicts(probs)] == [[d["label"] for d in p] for p in want]


def test_distance_matrix_values(h):
    d = h.distance_matrix()
    assert d.shape == (4, 4) and d.dtype == np.float32
    third = np.float32(1 / 3)
    expected = np.array([
        # a<b<c  a<b<d    a<e      f
        [0.0,    third,   2 * third, 1.0],  # a<b<c: siblings share 2 of 3; a<e shares 1 of 3
        [third,  0.0,     2 * third, 1.0],
        [2 * third, 2 * third, 0.0,  1.0],  # a<e vs a<b<x: shared 1 / deeper depth 3
        [1.0,    1.0,     1.0,     0.0],    # different roots
    ], dtype=np.float32)
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.diag(d), np.zeros(4, np.float32))
    np.testing.assert_array_equal(d, d.T)
    assert d.min() >= 0.0 and d.max() <= 1.0


def test_split_path_strips_spaces():
    assert split_path(" clothing < tops<t-shirts ") == ("clothing", "tops", "t-shirts")
    assert split_path("f") == ("f",)


def test_product_taxonomy_paths_split_at_greater_than():
    """Google's and Shopify's taxonomies write levels with ' > '; a path that uses '<' keeps '>' in names."""
    assert canonical("Apparel & Accessories > Clothing > Shirts & Tops") == "Apparel & Accessories<Clothing<Shirts & Tops"
    assert canonical("a<b>c") == "a<b>c"
    with pytest.raises(HuseError, match="empty level"):
        split_path("a >> b")


@pytest.mark.parametrize("bad", ["", "a<<b", "<a", "a<", "a< <b", "   "])
def test_split_path_refuses_empty_levels(bad):
    with pytest.raises(HuseError, match="empty") as e:
        split_path(bad)
    assert repr(bad) in str(e.value)
    assert "clothing<tops<t-shirts" in str(e.value)  # says what a good path looks like


def test_canonical_strips_spaces():
    assert canonical(" a <b < c") == "a<b<c"
    assert canonical("a<b<c") == "a<b<c"


def test_hierarchy_refuses_a_bad_label():
    with pytest.raises(HuseError, match="'a<<b'"):
        Hierarchy(["a<b", "a<<b"])
