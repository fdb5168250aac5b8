"""Tiny generated catalogs for tests (Polygraphy's tests/models habit): no downloads.

Four classes under a 3-level hierarchy. Each image is a 32x32 PNG whose colour and stripe
pattern depend on the class (plus noise); each title names its class noun, a shared noun, or
nothing, so both modalities carry signal and neither is perfect.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {
    "clothing<tops<t-shirts": ((200, 40, 40), ["tee", "t-shirt"]),
    "clothing<tops<shirts": ((40, 160, 40), ["shirt", "button-down"]),
    "shoes<boots<ankle boots": ((40, 40, 200), ["boots", "booties"]),
    "bags<handbags<handbags": ((200, 200, 40), ["handbag", "tote"]),
}


def make_image(cls_index: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    colour = np.asarray(list(CLASSES.values())[cls_index][0], dtype=np.float64)
    img = np.ones((size, size, 3)) * colour
    img[:, :: 2 + cls_index] *= 0.5  # class-specific stripes
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_catalog(folder: Path, per_class: int, seed: int, product) -> Path:
    """Write folder/catalog.csv + folder/images/*.png, one row per product from
    `product(class index, class path, nouns, rng, prng) -> (image, title, classes)`; return the catalog path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    path = folder / "catalog.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id"])
        for c, (cls, (_, nouns)) in enumerate(CLASSES.items()):
            for i in range(per_class):
                img, title, classes = product(c, cls, nouns, rng, prng)
                name = f"img_{c}_{i}.png"
                Image.fromarray(img).save(folder / "images" / name)
                w.writerow([f"images/{name}", title, classes, f"p{c}-{i}"])
    return path


def make_catalog(folder: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Write folder/catalog.csv + folder/images/*.png and return the catalog path."""
    def product(c, cls, nouns, rng, prng):
        img = make_image(c, rng)
        u = prng.random()
        noun = prng.choice(nouns) if u < 0.6 else ("item" if u < 0.8 else "")
        title = f"{prng.choice(['Acme', 'Birch', 'Cobalt'])} {prng.choice(['black', 'navy'])} {noun}".strip()
        return img, title, cls

    return _write_catalog(folder, per_class, seed, product)


def split_catalog(catalog: Path, folder: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    """The catalog's even rows in folder/first.csv and odd rows in folder/rest.csv (a build, then an add)."""
    rows = list(csv.DictReader(open(catalog, newline="")))
    first, rest = folder / "first.csv", folder / "rest.csv"
    for path, part in ((first, rows[::2]), (rest, rows[1::2])):
        write_rows(path, part)
    return first, rest, rows


# Extra classes of the multi-label catalog: each product keeps its class above and may also be on
# sale (its title usually says so) and/or a gift (its photo has a white corner), so each extra
# class has a signal in one modality.
SALE, GIFT = "sale<clearance", "gifts<for her"


def make_multilabel_catalog(folder: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Like `make_catalog`, with several `|`-separated class paths per product (about half have two or three)."""
    def product(c, cls, nouns, rng, prng):
        paths = [cls]
        img = make_image(c, rng)
        if prng.random() < 0.4:
            paths.append(GIFT)
            img[:10, :10] = 255
        sale = prng.random() < 0.4
        if sale:
            paths.append(SALE)
        noun = prng.choice(nouns) if prng.random() < 0.7 else "item"
        tag = "sale" if sale and prng.random() < 0.85 else prng.choice(["new", ""])
        title = f"{prng.choice(['Acme', 'Birch', 'Cobalt'])} {tag} {noun}".replace("  ", " ").strip()
        return img, title, "|".join(paths)

    return _write_catalog(folder, per_class, seed, product)


def photos_in_parquet(catalog: Path, out: Path, form: str = "struct") -> Path:
    """The catalog as Parquet holding its photos' bytes instead of paths: `form` "binary" (a binary
    column) or "struct" ({bytes, path}, as Hugging Face `datasets` writes its Image feature)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(csv.DictReader(open(catalog, newline="")))
    photos = [(catalog.parent / r["image"]).read_bytes() for r in rows]
    image = photos if form == "binary" else [{"bytes": b, "path": r["image"]} for b, r in zip(photos, rows)]
    columns = {"image": image, **{k: [r[k] for r in rows] for k in rows[0] if k != "image"}}
    pq.write_table(pa.table(columns), out)
    return out


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    """Rows (dicts with the same keys) as a CSV catalog at `path`."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
