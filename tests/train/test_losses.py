"""Each HUSE loss on small hand-computed cases: value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from huse.train.losses import classification_loss, gap_loss, huse_loss, semantic_graph_loss

ATOL = 1e-6  # float32 arithmetic on numbers of order 1


def test_gap_loss_value_and_gradient():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    txt = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    loss = gap_loss(img, txt)
    assert loss.item() == pytest.approx((1.0 + 0.0) / 2, abs=ATOL)  # orthogonal pair 1, identical pair 0
    loss.backward()
    torch.testing.assert_close(img.grad, -txt / 2)  # d/dimg (1 - img.txt) / N


def test_semantic_graph_loss_value_and_gradient():
    # d(u1, u2) = 1 - 0.8 = 0.2, A = 0.3: both inside the margin 0.5 -> (0.2 - 0.3)^2 on 2 of 4 pairs.
    u = torch.tensor([[1.0, 0.0], [0.8, 0.6]], requires_grad=True)
    labels = torch.tensor([0, 1])
    a = torch.tensor([[0.0, 0.3], [0.3, 0.0]])
    loss = semantic_graph_loss(u, labels, a, margin=0.5)
    assert loss.item() == pytest.approx(2 * 0.01 / 4, abs=ATOL)
    loss.backward()
    # dL/du2 = -(d - A) * u1 = [0.1, 0]; dL/du1 = -(d - A) * u2 = [0.08, 0.06]
    torch.testing.assert_close(u.grad, torch.tensor([[0.08, 0.06], [0.1, 0.0]]))


@pytest.mark.parametrize("margin,cos", [(0.25, 0.8), (0.5, 0.2)])
def test_semantic_graph_loss_ignores_pairs_outside_the_margin(margin, cos):
    # margin 0.25 < A = 0.3; or embeddings far apart (d = 0.8 > margin 0.5): nothing to impose.
    u = torch.tensor([[1.0, 0.0], [cos, math.sqrt(1 - cos**2)]])
    loss = semantic_graph_loss(u, torch.tensor([0, 1]), torch.tensor([[0.0, 0.3], [0.3, 0.0]]), margin=margin)
    assert loss.item() == pytest.approx(0.0, abs=ATOL)


def test_semantic_graph_loss_pulls_same_class_together():
    u = torch.tensor([[1.0, 0.0], [0.9, math.sqrt(1 - 0.81)]])
    loss = semantic_graph_loss(u, torch.tensor([2, 2]), torch.zeros(3, 3), margin=0.5)
    assert loss.item() == pytest.approx(2 * 0.1**2 / 4, abs=ATOL)


def test_classification_loss_value_and_gradient():
    li = torch.zeros(1, 4, requires_grad=True)
    lt = torch.zeros(1, 4, requires_grad=True)
    loss = classification_loss(li, lt, torch.tensor([1]))
    assert loss.item() == pytest.approx(2 * math.log(4), abs=ATOL)
    loss.backward()
    expected = torch.tensor([[0.25, -0.75, 0.25, 0.25]])  # softmax - one-hot
    torch.testing.assert_close(li.grad, expected)
    torch.testing.assert_close(lt.grad, expected)


def test_huse_loss_weights_the_parts():
    torch.manual_seed(0)
    ie = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    te = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    li, lt, y, a = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 1, 3]), torch.rand(5, 5)
    total, parts = huse_loss(ie, te, li, lt, y, a, alpha=2.0, beta=3.0, gamma=5.0, margin=0.9)
    assert total.item() == pytest.approx(2 * parts["cls"] + 3 * parts["graph"] + 5 * parts["gap"], rel=1e-5)
    assert parts["graph"] == pytest.approx(0.5 * (semantic_graph_loss(ie, y, a, 0.9) + semantic_graph_loss(te, y, a, 0.9)).item(), rel=1e-6)
