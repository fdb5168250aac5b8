"""Built-in dataset `fashion-products`: real Zalando product photos with generated titles.

The photos are Fashion-MNIST's (70,000 28x28 greyscale product photos, MIT licence),
installed by the Debian package `dataset-fashion-mnist`. The titles are generated here from
a seeded template generator, honestly imperfect so that neither modality alone suffices:
a share of titles names no product at all ("Nordic Studio autumn edit 4411") and a share uses
a noun that neighbouring classes share ("top", "knit", "shoe").

`fashion-products-open` is the same photos and splits with an open vocabulary: val and test
titles (new products) take their brands, materials and product nouns from lists that never
occur in training titles ("Greywood merino henley"), as a real catalog's new products do.
Val is open too, so that what is chosen on it (the text encoder, early stopping) sees what
test will. Training titles are those of `fashion-products`.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from huse.runtime.errors import HuseError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "HUSE_FMNIST_DIR"

# Fashion-MNIST label -> (hierarchical class, product nouns that name it, shared-noun group)
CLASSES = [
    ("clothing<tops<t-shirts", ["t-shirt", "tee", "crew neck tee", "graphic tee"], "top"),
    ("clothing<bottoms<trousers", ["trousers", "chinos", "slacks", "joggers"], "bottom"),
    ("clothing<tops<pullovers", ["pullover", "sweater", "jumper", "crewneck sweater"], "knit"),
    ("clothing<dresses<dresses", ["dress", "midi dress", "sundress", "wrap dress"], "bottom"),
    ("clothing<outerwear<coats", ["coat", "parka", "trench coat", "overcoat"], "layer"),
    ("shoes<sandals<sandals", ["sandals", "slides", "flip-flops", "strappy sandals"], "shoe"),
    ("clothing<tops<shirts", ["shirt", "button-down", "oxford shirt", "flannel shirt"], "top"),
    ("shoes<sneakers<sneakers", ["sneakers", "trainers", "running shoes", "low-top sneakers"], "shoe"),
    ("bags<handbags<handbags", ["handbag", "tote", "shoulder bag", "crossbody bag"], "bag"),
    ("shoes<boots<ankle boots", ["ankle boots", "chelsea boots", "booties", "lace-up boots"], "shoe"),
]
# Nouns shared by neighbouring classes: a title with one narrows the class down, no more.
SHARED_NOUNS = {
    "top": ["top", "essential top", "casual top"],
    "knit": ["knit", "knit top", "layering top"],
    "layer": ["layer", "outer layer", "cold-weather layer"],
    "bottom": ["womenswear piece", "capsule piece", "wardrobe staple"],
    "shoe": ["shoe", "footwear", "everyday shoe"],
    "bag": ["accessory", "carry-all", "everyday accessory"],
}
# Which groups a shared noun can come from: a "top" title may be a t-shirt, shirt or pullover.
SHARED_GROUPS = {"top": [0, 6, 2], "knit": [2, 0], "layer": [4, 2], "bottom": [1, 3], "shoe": [5, 7, 9], "bag": [8, 3]}

BRANDS = ["Nordic Studio", "Urban Loom", "Maison Vert", "Kestrel", "Harbor & Pine", "Solstice", "Atelier Nord",
          "Blue Fjord", "Copperline", "Wildmoor", "Linden Row", "Parklane", "Oak & Ivy", "Northbound", "Lumen"]
COLOURS = ["black", "white", "navy", "grey", "beige", "olive", "burgundy", "sand", "charcoal", "cream", "rust", "teal"]
MATERIALS = ["cotton", "organic cotton", "wool-blend", "linen", "recycled", "soft-touch", "lightweight", "premium"]
STYLES = ["classic", "relaxed", "slim", "everyday", "vintage", "modern", "essential", "signature"]
SEASONS = ["autumn edit", "spring drop", "summer capsule", "winter line", "new season", "archive"]

# Open vocabulary (fashion-products-open): per class, nouns that never occur in training titles,
# and brands and materials that never do either.
OPEN_NOUNS = [
    ["henley", "raglan", "ringer", "muscle singlet"],
    ["cargo pants", "culottes", "khakis", "palazzo pants"],
    ["cardigan", "turtleneck", "hoodie", "fleece"],
    ["gown", "shift frock", "pinafore", "maxi frock"],
    ["anorak", "peacoat", "duffle", "windbreaker"],
    ["espadrilles", "mules", "gladiators", "thongs"],
    ["blouse", "polo", "chambray", "camp collar"],
    ["plimsolls", "kicks", "runners", "high-tops"],
    ["clutch", "satchel", "purse", "hobo"],
    ["chukkas", "jodhpurs", "galoshes", "wellingtons"],
]
OPEN_BRANDS = ["Greywood", "Saltmarsh", "Velora", "Kinfolk", "Arden Vale", "Mistral", "Quarry Lane", "Tidewater",
               "Bellhaven", "Corvid", "Elmstead", "Foxglove", "Ravelin", "Stonebridge", "Yarrow"]
OPEN_MATERIALS = ["merino", "cashmere", "denim", "corduroy", "suede", "tweed", "jersey", "seersucker"]

# Fixed settings of the generator, chosen once so that text-only top-1 on the test split is
# 70-80% with the default recipe (README); do not change them, results depend on them.
P_NO_NOUN = 0.19  # the title names no product at all
P_SHARED_NOUN = 0.12  # the title uses a noun shared with neighbouring classes
TITLE_SEED = 1911_05978


def make_title(label: int, rng: random.Random, open_vocab: bool = False) -> str:
    """One product title for a Fashion-MNIST label (`open_vocab`: brands, materials and nouns never seen in training)."""
    brands, materials, nouns = (OPEN_BRANDS, OPEN_MATERIALS, OPEN_NOUNS[label]) if open_vocab else (
        BRANDS, MATERIALS, CLASSES[label][1])
    brand, colour = rng.choice(brands), rng.choice(COLOURS)
    u = rng.random()
    if u < P_NO_NOUN:
        return rng.choice([f"{brand} {rng.choice(SEASONS)} {rng.randint(1000, 9999)}",
                           f"{brand} {colour} {rng.choice(STYLES)} no. {rng.randint(10, 999)}",
                           f"{rng.choice(SEASONS).title()} by {brand} - {colour}"])
    if u < P_NO_NOUN + P_SHARED_NOUN:
        group = rng.choice([g for g, members in SHARED_GROUPS.items() if label in members] or [CLASSES[label][2]])
        noun = rng.choice(SHARED_NOUNS[group])
    else:
        noun = rng.choice(nouns)
    material, style = rng.choice(materials), rng.choice(STYLES)
    return rng.choice([f"{brand} {colour} {material} {noun}", f"{style.title()} {noun} in {colour} by {brand}",
                       f"{brand} {style} {noun} - {colour}", f"{colour.title()} {material} {noun} | {brand}"])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fmnist_dir(override: str | Path | None = None) -> Path:
    folder = Path(override or os.environ.get(ENV_DIR) or DEFAULT_DIR)
    needed = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise HuseError(f"Fashion-MNIST files {missing} not found in {folder}. Install them with "
                        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --fmnist-dir DIR "
                        f"(or set {ENV_DIR}) to a folder with the four .gz files")
    return folder


@dataclass
class FashionProducts:
    """The dataset in memory: images (N, 28, 28) uint8, titles, class paths, product ids, splits."""

    images: np.ndarray
    titles: list[str]
    classes: list[str]
    product_ids: list[str]
    splits: list[str]


def load_fashion_products(fmnist: str | Path | None = None, train_size: int | None = None, val_size: int = 5000,
                          test_size: int | None = None, seed: int = 0, open_vocab: bool = False) -> FashionProducts:
    """Load fashion-products with its splits.

    Every photo is its own product. train/val come from Fashion-MNIST's training set (split by
    product, seeded), test is its t10k set; `train_size`/`test_size` take seeded subsets so a
    demo fits a time budget.

    Args:
        fmnist: folder of the Fashion-MNIST .gz files (default: the Debian package's).
        train_size: products in train (None: all not used by val).
        val_size: products in val.
        test_size: products in test (None: all 10,000).
        seed: split seed.
        open_vocab: val and test titles from the open vocabulary (fashion-products-open).
    """
    folder = fmnist_dir(fmnist)
    tr_x, tr_y = _read_idx(folder / "train-images-idx3-ubyte.gz"), _read_idx(folder / "train-labels-idx1-ubyte.gz")
    te_x, te_y = _read_idx(folder / "t10k-images-idx3-ubyte.gz"), _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(seed).permutation(len(tr_x))
    val_idx = order[:val_size]
    train_idx = order[val_size:] if train_size is None else order[val_size:val_size + train_size]
    test_idx = np.arange(len(te_x)) if test_size is None else np.sort(
        np.random.default_rng(seed + 1).permutation(len(te_x))[:test_size])
    images, titles, classes, pids, splits = [], [], [], [], []
    for split, xs, ys, idx, prefix in (("train", tr_x, tr_y, train_idx, "train"), ("val", tr_x, tr_y, val_idx, "train"),
                                       ("test", te_x, te_y, test_idx, "t10k")):
        for i in idx:
            pid = f"fm-{prefix}-{int(i):05d}"
            # Seeded by product id, so a product's title never depends on split sizes.
            rng = random.Random(f"{TITLE_SEED}-{pid}")
            images.append(xs[i])
            titles.append(make_title(int(ys[i]), rng, open_vocab and split != "train"))
            classes.append(CLASSES[int(ys[i])][0])
            pids.append(pid)
            splits.append(split)
    return FashionProducts(np.stack(images), titles, classes, pids, splits)


EXPORT_HEADER = "image,name,classes,product_id,split"


def _is_export(path: Path) -> bool:
    """Whether a catalog.csv is an earlier `export_catalog` (its header, and its products' fm- ids)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header, first = f.readline().strip(), f.readline()
    return header == EXPORT_HEADER and first.split(",")[0].startswith("images/fm-")


def export_catalog(out: str | Path, fmnist: str | Path | None = None, limit: int | None = None, seed: int = 0,
                   open_vocab: bool = False) -> Path:
    """Write fashion-products as `catalog.csv` + PNG images, so users see the format on real files.

    Args:
        out: output folder (created).
        limit: write only the first `limit` products of each split (None: all).
    Returns:
        The catalog path.
    """
    import csv

    from PIL import Image

    out = Path(out)
    path = out / "catalog.csv"
    if path.is_file() and not _is_export(path):  # a user's own catalog in that folder: never written over
        raise HuseError(f"{path} exists and is not a built-in dataset's export; choose another folder")
    ds = load_fashion_products(fmnist, seed=seed, open_vocab=open_vocab)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(EXPORT_HEADER.split(","))
        for img, title, cls, pid, split in zip(ds.images, ds.titles, ds.classes, ds.product_ids, ds.splits):
            counts[split] = counts.get(split, 0) + 1
            if limit is not None and counts[split] > limit:
                continue
            rel = f"images/{pid}.png"
            Image.fromarray(img, "L").save(out / rel)
            w.writerow([rel, title, cls, pid, split])
    return path
