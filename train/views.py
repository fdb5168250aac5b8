"""Image views: extra frozen-backbone features of each training photo, seen through a random crop.

A small catalog has a few photos per product; with a frozen backbone every epoch shows the image
tower the same few feature vectors, and it memorises them. Here each training photo also gets K
views (a seeded random resized crop: part of the photo, shifted and rescaled to the model's input),
each decoded and preprocessed by the runtime's own path (huse.runtime.preprocess) and passed
through the frozen backbone once, then cached beside the plain features. Training draws one of the
K + 1 (plain included) per row and step; val, test, the baselines and serving see the plain photo.
No flips: icons and product photos have a direction (an arrow pointing left is another product).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from huse.runtime.preprocess import ImageSpec, decode_image, load_image

# The crop's share of the photo's area and its aspect ratio: torchvision's RandomResizedCrop draws
# area from (0.08, 1); an icon or a product photo cut to 8% is another picture, so a view keeps at
# least 60% of it, a mild shift and zoom.
AREA = (0.6, 1.0)
RATIO = (3 / 4, 4 / 3)


def random_view(img, rng: np.random.Generator):
    """A random resized crop of a decoded RGB Pillow image (the caller resizes it to the model's input).

    Args:
        img: the photo (RGB `PIL.Image.Image`).
        rng: the random generator (seeded by the caller: views are reproducible).
    Returns:
        The cropped `PIL.Image.Image`.
    """
    w, h = img.size
    area = w * h * rng.uniform(*AREA)
    ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def view_features(backbone: torch.nn.Module, images: list, rows: np.ndarray, spec: ImageSpec, views: int,
                  seed: int, batch: int = 128) -> torch.Tensor:
    """Backbone features of `views` random crops of each image in `rows` (the trainer caches them).

    Args:
        backbone: the frozen backbone (eval mode).
        images: every image of the dataset (paths or images, as `load_image` takes them).
        rows: the dataset rows to compute views of (the training rows); the others stay zero.
        spec: the preprocessing spec (the runtime's).
        views: K, the number of views per image.
        seed: seeds the crops: view k of row i is the same in every run with this seed, whichever rows are computed.
        batch: images per backbone call.
    Returns:
        (views, len(images), feature_dim) float32; rows not in `rows` are zero.
    """
    from huse.train.trainer import backbone_features  # the plain photos' features come from the same function

    out = None
    jobs = [(k, int(i)) for k in range(views) for i in np.asarray(rows)]
    with backbone_features(backbone, spec.size) as features:
        for s in tqdm(range(0, len(jobs), batch), desc=f"image views (x{views})", unit="batch", mininterval=2):
            part = jobs[s:s + batch]
            x = np.stack([load_image(random_view(decode_image(images[i]), np.random.default_rng([seed, k, i])), spec)
                          for k, i in part])
            f = features(x)
            if out is None:
                out = torch.zeros(views, len(images), f.shape[1])
            for (k, i), v in zip(part, f):
                out[k, i] = v
    return out
