"""The vectors of a product, as an index holds them: the one rule `huse index build` and `huse embed --mode index`
share (runtime/index.py, runtime/bulk.py)."""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from huse.runtime.bundle import has_visual

MODALITIES = ("image", "text")
# Each space and the modality whose rows it holds: the visual vectors are the photo rows'.
ROWS_OF = {"image": "image", "text": "text", "visual": "image"}


def vector_widths(bundle_manifest: dict, visual: bool) -> dict[str, int]:
    """The width of each modality's vectors: image and text, and visual when the index has it."""
    dim = int(bundle_manifest["embedding_dim"])
    return {"image": dim, "text": dim, **({"visual": int(bundle_manifest["visual_dim"])} if visual else {})}


def embed_products(clf, records: Sequence[Any], photos=None) -> tuple[dict[str, np.ndarray], dict[str, dict[int, str]]]:
    """Every vector an index holds for `records` (catalog Records): image, text and, when the bundle has visual
    vectors, visual from the same run of the image graph; NaN rows where left out, and why per modality
    ({"image": {position: reason}, "text": {...}}; a photo's image and visual rows go together). `photos`: the
    records' photos decoded already (`Classifier.decode`, one entry per record), else they are read here."""
    if photos is None:
        photos = [None if getattr(r, "error", None) else r.image for r in records]
    if has_visual(clf.manifest):
        e_img, e_vis = clf.embed_image_visual(photos)
        vecs = {"image": e_img.vectors, "visual": e_vis.vectors}
    else:
        e_img = clf.embed_image(photos)
        vecs = {"image": e_img.vectors}
    e_txt = clf.embed_text([None if getattr(r, "error", None) else r.name for r in records])
    vecs["text"] = e_txt.vectors
    why: dict[str, dict[int, str]] = {"image": {}, "text": {}}
    for i, r in enumerate(records):
        row_err = getattr(r, "error", None)  # the catalog's own error for the row wins
        for mod, err in (("image", row_err or (e_img.errors.get(i) if r.image else "no image")),
                         ("text", row_err or e_txt.errors.get(i))):
            held = [v for v in vecs if ROWS_OF[v] == mod]
            if err is None and not all(np.isfinite(vecs[v][i]).all() for v in held):
                err = "embedding is not finite"
            if err is not None:
                for v in held:
                    vecs[v][i] = np.nan
                why[mod][i] = re.sub(r"^item \d+(: | )", "", err)  # a place in this model call names nothing
    return vecs, why
