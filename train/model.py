"""The HUSE model (Hierarchical Universal Semantic Embeddings, arXiv 1911.05978), top to bottom.

image -> backbone (pretrained, frozen by default) -> image tower (5 x 512, ReLU, dropout) -> L2 norm
title -> text encoder (word CNN, or frozen MiniLM) -> text tower (2 x 512) -> L2 norm
each embedding -> ONE shared classification layer (the same nn.Linear for both modalities)
fused prediction = w * softmax(image logits) + (1 - w) * softmax(text logits)
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import split_path
from huse.train.config import HuseConfig


def mlp(in_dim: int, hidden: int, layers: int, out_dim: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
    mods.append(nn.Linear(hidden if layers else in_dim, out_dim))
    return nn.Sequential(*mods)


class WordCNN(nn.Module):
    """The original HUSE project's text encoder: Embedding -> Conv1D -> global max pool -> Dense."""

    def __init__(self, cfg: HuseConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
        self.conv = nn.Conv1d(cfg.word_dim, cfg.conv_channels, cfg.conv_kernel, padding=cfg.conv_kernel // 2)
        self.dense = nn.Linear(cfg.conv_channels, cfg.text_feature_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids).transpose(1, 2)  # (N, word_dim, L)
        h = F.relu(self.conv(h)).amax(dim=2)  # global max pool over positions
        return F.relu(self.dense(h))


class FeatureNorm(nn.Module):
    """Standardises frozen backbone features with statistics of the training set.

    Pooled features of different stages differ in scale by orders of magnitude; without this
    the image tower learns the small ones very slowly. The statistics are buffers, so they
    travel in the checkpoint and the exported graph (a Sub and a Mul).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    def set_stats(self, feats: torch.Tensor) -> None:
        std = feats.std(0)
        self.mean.copy_(feats.mean(0))
        # A feature that never varies in training carries no signal: weight 0, not 1/eps
        # (a 1e6 constant would amplify float noise and overflow FP16).
        self.inv_std.copy_(torch.where(std > 1e-4, 1.0 / std.clamp_min(1e-4), torch.zeros_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class SharedClassifier(nn.Module):
    """The one classification layer both modalities share: a linear layer over the unit-norm
    embedding, with a learned logit scale.

    Unit-norm inputs bound the logits by the weight norms, so without a scale the softmax
    stays flat until the weights have grown, which takes many epochs (NormFace and CLIP
    learn a temperature for the same reason). The scale starts at 10.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb) * self.log_scale.exp()


def class_name_title(label: str) -> str:
    """The words of a class path, as a title: "clothing<tops<t-shirts" -> "clothing tops t-shirts" (a level that repeats
    its parent, as in "arrows<arrows", is said once)."""
    levels = [l.strip() for l in split_path(label)]
    return " ".join(l for i, l in enumerate(levels) if l and l not in levels[:i])


def init_classifier_from_names(classifier: SharedClassifier, name_emb: torch.Tensor) -> None:
    """Start each class's row of the shared layer at its name's embedding (unit norm, bias 0), as CLIP classifies
    with its prompts' embeddings: before any step the classifier answers by the class names.

    Args:
        classifier: the shared classification layer.
        name_emb: (num_classes, embed_dim) the classes' names through the text tower (class_name_title).
    """
    with torch.no_grad():
        classifier.linear.weight.copy_(F.normalize(name_emb, dim=-1))
        classifier.linear.bias.zero_()


def class_name_loss(classifier: SharedClassifier, name_emb: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between each class's row of the shared layer and its name's embedding: a prior that
    keeps the rows where the names point while the data is too small to place them (single- or multi-label).

    Args:
        classifier: the shared classification layer.
        name_emb: (num_classes, embed_dim) the classes' names through the text tower (gradients flow into it).
    Returns:
        A scalar in [0, 2].
    """
    return (1.0 - F.cosine_similarity(classifier.linear.weight, name_emb, dim=-1)).mean()


class HUSE(nn.Module):
    """HUSE: two towers into one L2-normalised space and one shared classifier.

    Args:
        cfg: the configuration.
        backbone: image backbone mapping (N,3,H,W) -> (N, F).
        backbone_dim: F.
        text_encoder: module mapping (input_ids, attention_mask) -> (N, cfg.text_feature_dim).
    """

    def __init__(self, cfg: HuseConfig, backbone: nn.Module, backbone_dim: int, text_encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.feature_norm = FeatureNorm(backbone_dim)
        self.image_tower = mlp(backbone_dim, cfg.hidden, cfg.image_layers, cfg.embed_dim, cfg.dropout)
        self.text_tower = mlp(cfg.text_feature_dim, cfg.hidden, cfg.text_layers, cfg.embed_dim, cfg.dropout)
        self.classifier = SharedClassifier(cfg.embed_dim, cfg.num_classes)  # shared by both modalities
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)

    # Features: what the frozen parts compute (cached during training).
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)

    # Towers: features -> universal embedding.
    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(self.feature_norm(feats)), dim=-1)

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(feats), dim=-1)

    # End to end, as exported.
    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.embed_image_features(self.image_features(image))

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_text_features(self.text_features(input_ids, attention_mask))

    def fuse(self, image_logits: torch.Tensor, text_logits: torch.Tensor, image_weight: float) -> torch.Tensor:
        if self.cfg.multi_label and self.cfg.label_head == "sigmoid":  # per-class probabilities, each in [0, 1]
            return image_weight * image_logits.sigmoid() + (1.0 - image_weight) * text_logits.sigmoid()
        return image_weight * image_logits.softmax(-1) + (1.0 - image_weight) * text_logits.softmax(-1)


def build_model(cfg: HuseConfig, backbone_weights: str | None = None, load_pretrained: bool = True) -> HUSE:
    """Build HUSE from its config.

    Args:
        cfg: the configuration.
        backbone_weights: a weights file for backbones that ship none.
        load_pretrained: load pretrained backbone / MiniLM weights (False when a checkpoint
            with every weight is loaded next).
    """
    from huse.train.backbones import backbone_info, create_backbone

    info = backbone_info(cfg.backbone)
    backbone = create_backbone(cfg.backbone, backbone_weights, pretrained=load_pretrained)
    if cfg.text_encoder == "cnn":
        text = WordCNN(cfg)
    elif cfg.text_encoder == "minilm":
        from huse.train.minilm import MiniLM, load_minilm

        text = load_minilm() if load_pretrained else MiniLM()
        text.requires_grad_(False)
    else:
        raise HuseError(f"Text encoder {cfg.text_encoder!r} not found; available text encoders = ['cnn', 'minilm']")
    return HUSE(cfg, backbone, info.feature_dim, text)
