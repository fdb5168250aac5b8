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
    assert [nodes for nodes, _ in h.levels] == [["a", "f"], ["a<b", "a<e"], ["a<b<c", "a<b<d"]]


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
