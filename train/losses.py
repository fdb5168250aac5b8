"""The three HUSE losses (arXiv 1911.05978, section 3), plus an instance-level term for retrieval.

total = alpha * classification + beta * semantic graph + gamma * cross-modal gap + delta * instance

The paper's losses pull every item toward its class's place in the space and nothing keeps two
products of one class apart, so "find this product" fails. The instance term is the InfoNCE
form of the gap loss, as CLIP trains: each image must pick its own product's title out of the
batch's titles, and each title its product's images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import huse.train.multilabel as multilabel


def cosine_distance_matrix(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cos between rows of L2-normalised `u` and `v` (default `u`), shape (N, M)."""
    v = u if v is None else v
    return 1.0 - u @ v.t()


def classification_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the shared classifier on each modality's embedding, summed."""
    return F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)


def semantic_graph_loss(emb: torch.Tensor, labels: torch.Tensor, class_dist: torch.Tensor, margin: float) -> torch.Tensor:
    """Make embedding distances follow class distances, locally.

    For each pair (i, j) in the batch, with d_ij the cosine distance of their embeddings and
    A_ij the distance of their classes, the loss is (d_ij - A_ij)^2 where both A_ij < margin
    and d_ij < margin, else 0; averaged over all N^2 pairs. Pairs of far-apart classes are
    left to the classification loss; only the neighbourhood structure is imposed.

    Args:
        emb: (N, D) L2-normalised embeddings.
        labels: (N,) class indices, or (N, C) multi-hot label sets (multi-label catalogs).
        class_dist: (C, C) class distances A.
        margin: zeta.
    """
    d = cosine_distance_matrix(emb)
    # Multi-label (labels (N, C) multi-hot): the distance between the items' sets of paths.
    a = class_dist[labels][:, labels] if labels.ndim == 1 else multilabel.set_distance(labels, class_dist)
    mask = ((a < margin) & (d < margin)).to(emb.dtype)
    return (mask * (d - a) ** 2).sum() / (emb.shape[0] ** 2)


def gap_loss(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cross-modal gap: mean cosine distance between each item's image and text embeddings."""
    return (1.0 - (image_emb * text_emb).sum(dim=-1)).mean()


def _info_nce(a: torch.Tensor, b: torch.Tensor, product: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of `a` and `b`; items of the same product are all positives."""
    logits = a @ b.t() / tau
    pos = (product[:, None] == product[None, :]).to(logits.dtype)
    target = pos / pos.sum(1, keepdim=True)  # pos is symmetric, so this serves both directions
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def instance_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, product: torch.Tensor, tau: float,
                  image_view: torch.Tensor | None = None) -> torch.Tensor:
    """Instance-level contrastive term: each image must pick its product's title out of the batch's
    titles (and each title its product's images), CLIP's form of the gap loss.

    With `image_view` (the same images through the tower again, under another dropout mask) each
    image must also pick its other view out of the batch, as SimCSE does with dropout noise: the
    class losses alone collapse a class's products onto one point, and "find this product"
    needs them apart.

    Args:
        image_emb, text_emb: (N, D) L2-normalised embeddings of the same N items.
        product: (N,) product indices.
        tau: temperature.
        image_view: (N, D) a second dropout view of image_emb, or None.
    """
    loss = _info_nce(image_emb, text_emb, product, tau)
    if image_view is not None:
        loss = 0.5 * (loss + _info_nce(image_emb, image_view, product, tau))
    return loss


def huse_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, image_logits: torch.Tensor, text_logits: torch.Tensor,
              labels: torch.Tensor, class_dist: torch.Tensor, *, alpha: float, beta: float, gamma: float,
              margin: float, delta: float = 0.0, tau: float = 0.1, product: torch.Tensor | None = None,
              image_view: torch.Tensor | None = None, head: str = "sigmoid",
              label_loss: str = "asl") -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the losses, and each part for logging.

    The graph loss is applied to each modality's embeddings and averaged. `product` (N,) is
    needed when delta > 0; `image_view` is optional (see instance_loss); `head` and `label_loss` are
    the multi-label head and its loss (train/multilabel.py) when `labels` are (N, C) multi-hot sets.
    """
    if labels.ndim == 1:
        cls = classification_loss(image_logits, text_logits, labels)
    else:  # multi-label: a sigmoid per class (train/multilabel.py)
        cls = multilabel.classification_loss(image_logits, text_logits, labels, head, label_loss)
    graph = 0.5 * (semantic_graph_loss(image_emb, labels, class_dist, margin)
                   + semantic_graph_loss(text_emb, labels, class_dist, margin))
    gap = gap_loss(image_emb, text_emb)
    total = alpha * cls + beta * graph + gamma * gap
    parts = {"loss": total, "cls": cls, "graph": graph, "gap": gap}
    if delta:
        inst = instance_loss(image_emb, text_emb, product, tau, image_view)
        total = total + delta * inst
        parts.update(loss=total, instance=inst)
    return total, {k: float(v.detach()) for k, v in parts.items()}
