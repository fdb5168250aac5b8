"""What a HUSE model is and how it is trained: the settings, without torch.

`huse-train --help` shows these defaults, so they live here, where reading them imports nothing heavy;
`huse.train.model` builds the model from a `HuseConfig` and `huse.train.trainer` trains it with a `TrainConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from huse.runtime.errors import HuseError, check_ranges


@dataclass
class HuseConfig:
    num_classes: int
    backbone: str = "efficientnet_lite0"
    # Fashion-MNIST photos are 28x28; 64x64 keeps EfficientNet-Lite0's last stages above 1x1
    # while costing ~1/12 of 224x224. Catalog photos can use 224 (--image-size).
    image_size: int | str = 64  # "auto": resolved by the trainer from the photos (choose_image_size)
    freeze_backbone: bool = True  # the paper trains towers over frozen features; fast on CPU
    embed_dim: int = 512  # D of the universal embedding space (paper: 512)
    hidden: int = 512  # tower width (paper: 512)
    image_layers: int = 5  # paper: 5 hidden layers in the image tower
    text_layers: int = 2  # paper: 2 hidden layers in the text tower
    dropout: float = 0.15  # paper: 0.15
    # "custom": the tower fields above as given; "paper" or "compact" (huse-train's default) set them
    # (ARCHS, resolve_arch; README "Model quality").
    arch: str = "custom"
    text_encoder: str = "cnn"  # "cnn" (original project's word CNN), "minilm", or "auto" (resolved by the trainer)
    vocab_size: int = 0  # word-CNN vocabulary incl. padding and OOV ids
    max_len: int = 24  # tokens per title: product titles are short
    word_dim: int = 64  # word-CNN embedding width: titles use a few hundred words
    conv_channels: int = 128  # word-CNN filters
    conv_kernel: int = 3  # word-CNN n-gram width
    text_feature_dim: int = 512  # word-CNN Dense output (MiniLM: 384)
    # Several class paths per product (train/multilabel.py): a sigmoid per class instead of one softmax.
    multi_label: bool = False
    # Its head: "sigmoid" (a probability per class) or "softmax" (cross-entropy against the multi-hot
    # target spread evenly over the product's classes; Mahajan et al. 2018 found it better for tags).
    label_head: str = "sigmoid"
    # The sigmoid head's training loss: "asl" (asymmetric loss) or "bce" (train/multilabel.py, LOSSES).
    label_loss: str = "asl"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # 32 px: the backbones downsample 32x, so smaller photos leave them nothing to read
        check_ranges(self, {"embed_dim": (1, True), "image_size": (32, True)})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.multi_label:  # single-label runs' config.json stays what it always was
            del d["multi_label"], d["label_head"], d["label_loss"]
        return d


# Tower presets. "paper": 5 x 512 image layers, 2 x 512 text layers, dropout 0.15. "compact" (huse-train's
# default): one 512-wide image layer, a linear text projection, dropout 0.5. Measured with the default
# recipe (README, "Model quality"): on phosphor-icons (1,600 training images) the paper's image tower
# memorised the training set within a few epochs (val image top-1 20%) and its embeddings found another
# photo of the same product at rank 1 for 70% of queries against 90% for compact; on fashion-products
# (55,000) compact classifies as well (fused 97.2% vs 97.3%) and keeps more of each product apart.
ARCHS = {"paper": {"image_layers": 5, "text_layers": 2, "dropout": 0.15},
         "compact": {"image_layers": 1, "text_layers": 0, "dropout": 0.5}}


def resolve_arch(cfg: HuseConfig) -> None:
    """Set the tower sizes of cfg.arch (in place); "custom" keeps the fields as given."""
    if cfg.arch == "custom":
        return
    if cfg.arch not in ARCHS:
        raise HuseError(f"arch {cfg.arch!r} not found; available = {[*ARCHS, 'custom']}")
    for k, v in ARCHS[cfg.arch].items():
        setattr(cfg, k, v)


FINAL_FITS = {"train": ("train",), "train+val": ("train", "val"), "all": ("train", "val", "test")}


# Below this many train + val rows, `cv_folds=None` ("auto") chooses the epochs, the fusion weight and the
# temperatures by k-fold cross-validation by product instead of on the one val split. On the small real
# catalogs (616-1,986 train + val rows) val holds 55-64 products, one product moves val top-1 by 1.6-1.8
# points, and the tuned LR's top-1 moves 4-17 points between folds of ~50 products (docs/quality.md,
# "Small catalogs"). fashion-products (60,000 rows) has a 5,000-product val split where one product is 0.02
# points, and each of k+1 more trainings would cost what its one training does. 5,000 rows (a 15% val
# split of 125-190 products at 4-6 images each, one product 0.5-0.8 points) lies between the two; no
# catalog between 2,000 and 55,000 rows has been measured, so the exact value is not tuned.
KFOLD_MAX_ROWS = 5000


@dataclass
class TrainConfig:
    # None: a budget of steps, not epochs, so a 1,600-image catalog gets as many optimisation
    # steps as fashion-products (10 epochs of 55,000 = 2,150 steps; 10 epochs of 1,600 would be
    # 70), with early stopping on validation loss and the best checkpoint restored.
    epochs: int | None = None
    min_steps: int = 2000  # the step budget when epochs is None: max(min_steps, 10 epochs)
    patience: int = 300  # steps (at least 3 epochs) without a better val loss before stopping; 0: never
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    alpha: float = 1.0  # classification loss weight
    beta: float = 1.0  # semantic-graph loss weight
    gamma: float = 0.2  # cross-modal gap loss weight (large values pull the towers to one mode)
    # Instance-level contrastive (InfoNCE) weight: image vs title and image vs a second dropout view. 0.5
    # took fashion-products' multi-view "same product" I->I R@1 from 0.16 to 0.38 at the same fused
    # top-1 (97.2%); on phosphor-icons fused 72.3% vs 74.1% without, within one test-set standard error.
    delta: float = 0.5
    tau: float = 0.1  # temperature of the instance-level contrastive term
    margin: float = 0.7  # zeta: hierarchy distances are 0 (same), 1/3 (siblings), 2/3, 1
    class_distance: str = "hierarchy"  # or "minilm": cosine distance of class-name embeddings
    # Class-name prior (as CLIP classifies with its prompts): start each class's row of the shared layer at the
    # text tower's embedding of its path's words ("clothing tops t-shirts"), and with a weight > 0 keep pulling it
    # there (model.class_name_loss). The tuned LR cannot read class names; HUSE's shared space can.
    class_name_init: bool = False
    class_name_prior: float = 0.0
    # Image views (train/views.py): K random crops of each training photo through the frozen backbone, computed once
    # and cached; each step trains on one of the K + 1 (plain included) per row. 0: the plain photo only.
    image_views: int = 0
    # Which rows the shipped model is trained on once the epochs, the fusion weight and the temperatures
    # have been chosen on val and test has been reported (FINAL_FITS): "train" ships the held-out model
    # itself; "train+val" refits a fresh model on both with those settings; "all" folds in test too.
    final_fit: str = "train"
    # k-fold cross-validation by product over train + val for the epochs, the fusion weight and the
    # temperatures (then the shipped model is refitted on train + val, or all with final_fit="all"):
    # 0 never, K >= 2 always with K folds, None ("auto", the default) with CV_FOLDS folds below KFOLD_MAX_ROWS
    # rows (multi-label too: the thresholds come from the folds). README, "Model quality" and "Multi-label
    # products", and docs/quality.md say what it measured and what it costs.
    cv_folds: int | None = None
    seed: int = 0
    feature_batch: int = 128  # images per backbone call during feature extraction
    device: str = "cpu"  # or "cuda": an NVIDIA GPU (where fine-tuning the backbone becomes practical)

    def __post_init__(self):
        if self.final_fit not in FINAL_FITS:
            raise HuseError(f"final fit {self.final_fit!r} not found; available = {list(FINAL_FITS)}")
        check_ranges(self, {"epochs": (1, True), "patience": (0, True), "batch_size": (1, True), "lr": (0, False),
                            "weight_decay": (0, True), "alpha": (0, True), "beta": (0, True), "gamma": (0, True),
                            "delta": (0, True), "margin": (0, False), "class_name_prior": (0, True),
                            "image_views": (0, True)})
        if self.cv_folds is not None and (self.cv_folds < 0 or self.cv_folds == 1):
            raise HuseError(f"cv folds {self.cv_folds} is not a number of folds; pass 0 (no cross-validation), "
                            "2 or more, or auto")

    def total_epochs(self, steps_per_epoch: int) -> int:
        if self.epochs is not None:
            return self.epochs
        return max(10, math.ceil(self.min_steps / steps_per_epoch))
