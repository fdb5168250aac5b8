"""Training data: catalogs and the built-in dataset, validated and split by product."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from huse.runtime.catalog import read_catalog
from huse.runtime.errors import HuseError
from huse.runtime.labels import join_paths, parse_paths
from huse.runtime.preprocess import decode_image
from huse.runtime.tokenizer import normalise_title

DATASETS = ("fashion-products", "fashion-products-open")


@dataclass
class Dataset:
    """Items for training; `images[i]` is a path or a uint8 array, decoded by huse.runtime.preprocess."""

    images: list[Any]
    titles: list[str]
    classes: list[str]  # canonical path per item; several sorted and joined with '|' (runtime/labels.join_paths)
    product_ids: list[str]
    splits: list[str]
    source: dict[str, Any]  # how to load it again (recorded in the run for export)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # rows left out, with the reason
    moved_to_train: list[str] = field(default_factory=list)  # products the split moved so that every class trains
    replaced: int = 0  # rows of a later catalog that replaced an earlier catalog's row of the same photo

    def indices(self, split: str) -> np.ndarray:
        return np.asarray([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def heldout(self, split: str, n: int | None, seed: int = 0) -> tuple[str, np.ndarray]:
        """A seeded sample of at most `n` rows (items) of `split` (0 or None: all), sorted.

        A catalog too small to have test products falls back to val. Returns (split used, indices).
        """
        idx = self.indices(split)
        if not len(idx) and split == "test":
            split, idx = "val", self.indices("val")
        if not len(idx):
            raise HuseError(f"the run's data has no {split!r} split to evaluate on")
        if n and len(idx) > n:
            idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
        return split, idx

    def split_sizes(self) -> dict[str, int]:
        return {s: int((np.asarray(self.splits) == s).sum()) for s in ("train", "val", "test")}

    def split_classes(self, split: str) -> set[str]:
        """Every class path the rows of `split` carry (a multi-label row counts each of its paths)."""
        return {p for i in self.indices(split) for p in parse_paths(self.classes[i])}

    def classes_without_training_rows(self) -> dict[str, int]:
        """Classes that only val or test rows carry, with their row counts: the model never learns them."""
        trained = self.split_classes("train")
        out: dict[str, int] = {}
        for c in self.classes:
            for p in parse_paths(c):
                if p not in trained:
                    out[p] = out.get(p, 0) + 1
        return dict(sorted(out.items()))


    def classes_spelled_apart(self) -> list[dict[str, int]]:
        """Taxonomy nodes written in more than one way, each spelling with its row count.

        Two spellings of one node (`Shoes` and `shoes`, `T-Shirts` and `t shirts`: the same words but for case,
        spaces, '-' and '_') become two classes, and the model splits the products between them. Each group is a
        node whose spellings share their parent as written, so `Shoes<Boots` beside `shoes<boots` is reported
        once, at `Shoes` / `shoes`. Sorted by the group's rows, most first.
        """
        rows: dict[str, int] = {}  # node prefix as written -> rows under it
        for c in self.classes:
            seen = set()
            for p in parse_paths(c):
                levels = p.split("<")
                seen.update("<".join(levels[:k]) for k in range(1, len(levels) + 1))
            for node in seen:
                rows[node] = rows.get(node, 0) + 1
        groups: dict[tuple[str, str], dict[str, int]] = {}
        for node, n in rows.items():
            parent, _, name = node.rpartition("<")
            groups.setdefault((parent, " ".join(name.casefold().replace("-", " ").replace("_", " ").split())), {})[node] = n
        found = [dict(sorted(g.items())) for g in groups.values() if len(g) > 1]
        return sorted(found, key=lambda g: (-sum(g.values()), sorted(g)))


def _split_hash(group: str, seed: int) -> float:
    # A hash of (seed, product) — not a shuffle — so adding rows never moves old products.
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64


def _assign_split(group: str, seed: int, val_frac: float, test_frac: float) -> str:
    u = _split_hash(group, seed)
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def _train_every_class(ds: Dataset, rows: range, seed: int) -> list[str]:
    """Move into train, for each class that no train row carries, the one of its products in `rows` (rows split by
    hash) that hashes lowest; return the products moved.

    A class of one or two products lands wholly in val or test one time in ten or more, and then neither the
    held-out model nor the shipped one (refitted on train + val) ever learns it. Val keeps its last product.
    """
    trained = ds.split_classes("train")
    products: dict[str, list[int]] = {}
    for i in rows:
        products.setdefault(ds.product_ids[i], []).append(i)
    carriers: dict[str, list[str]] = {}  # class -> products (of `rows`) that carry it
    for g, idx in products.items():
        for c in sorted({p for i in idx for p in parse_paths(ds.classes[i])}):
            carriers.setdefault(c, []).append(g)
    moved: list[str] = []
    val = {g for g, idx in products.items() if ds.splits[idx[0]] == "val"}
    for c in sorted(carriers):
        if c in trained:
            continue
        g = min((g for g in carriers[c] if g not in val or len(val) > 1), key=lambda g: _split_hash(g, seed), default=None)
        if g is None:
            continue
        val.discard(g)
        for i in products[g]:
            ds.splits[i] = "train"
            trained.update(parse_paths(ds.classes[i]))
        moved.append(g)
    return moved


def load_catalog_dataset(path: str | Path | Sequence[str | Path],
                         images: str | Path | Sequence[str | Path | None] | None = None, *, skip_bad_rows: bool = False,
                         seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> Dataset:
    """Read, validate and split a catalog, or several as one (yours and `huse review export`'s corrections).

    Splits come from the `split` column where every row of a catalog has one; otherwise each product
    (product_id, else the normalised title, else the photo) goes wholly to train, val or test, seeded, and a
    class whose products all landed in val or test has one of them moved to train (`moved_to_train`).

    Args:
        path: catalog CSV/JSONL/Parquet with image, name, classes (+ product_id, split); or a list of them.
        images: folder relative image paths resolve against (default: each catalog's folder); with several
            catalogs, one folder for all or a list with one per catalog (None: its own folder).
        skip_bad_rows: skip and count bad rows instead of stopping at the first.
        seed, val_frac, test_frac: the split.
    Raises:
        HuseError: for a bad row (file, row, what is wrong) unless skip_bad_rows.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    folders = list(images) if isinstance(images, (list, tuple)) else [images] * len(paths)
    if len(folders) != len(paths):
        raise HuseError(f"give --images once (for every catalog) or once per --data, in the same order: got "
                        f"{len(folders)} for {len(paths)} catalogs")
    catalogs = [str(Path(p).resolve()) for p in paths]
    dirs = [str(Path(f).resolve()) if f else None for f in folders]
    source = ({"catalog": catalogs[0], "images": dirs[0]} if len(paths) == 1  # one catalog: as before
              else {"catalogs": catalogs, "images": dirs})
    ds = Dataset([], [], [], [], [], {**source, "seed": seed, "val_frac": val_frac, "test_frac": test_frac})
    for p, folder in zip(paths, folders):
        first = len(ds.images)
        _read_rows(ds, p, folder, skip_bad_rows, several=len(paths) > 1)
        ds.replaced += _replace_earlier_rows(ds, first)
        if not all(ds.splits[first:]):  # a product's split must be unanimous: decided per group, never per image
            ds.splits[first:] = [_assign_split(g, seed, val_frac, test_frac) for g in ds.product_ids[first:]]
            ds.moved_to_train += _train_every_class(ds, range(first, len(ds.images)), seed)
    name = paths[0] if len(paths) == 1 else " + ".join(map(str, paths))
    if not any(ds.titles):  # some rows without one are fine (their text tower sees an empty title); none is not
        raise HuseError(f"{name}: no row has a title (column name); huse-train trains a text tower beside the "
                        "image tower, so it needs titles")
    _check_splits(ds, name)
    return ds


def _photo_key(image: Any) -> str:
    """A photo by its path, or one held as bytes (Parquet) by its sha256: what makes two rows one photo."""
    return image if isinstance(image, str) else "sha256 " + hashlib.sha256(image).hexdigest()


def _replace_earlier_rows(ds: Dataset, first: int) -> int:
    """Rows from `first` on (a later --data catalog) whose photo an earlier catalog's row has: that row takes their
    classes and title, keeping its product and split, and they are dropped. Returns how many.

    A review of the training catalog itself (`huse review export`) gives corrected rows of photos the catalog
    already holds; added beside them, each photo would train under its old label and its corrected one at once
    (and, hashed into another split than its product's, stop training with a split conflict).
    """
    earlier = {_photo_key(ds.images[j]): j for j in range(first)}
    drop = []
    for i in range(first, len(ds.images)):
        j = earlier.get(_photo_key(ds.images[i]))
        if j is not None:
            ds.classes[j], ds.titles[j] = ds.classes[i], ds.titles[i] or ds.titles[j]
            drop.append(i)
    for i in reversed(drop):
        for column in (ds.images, ds.titles, ds.classes, ds.product_ids, ds.splits):
            del column[i]
    return len(drop)


# Why training needs both columns, and what works without one of them.
TWO_TOWERS = ("huse-train trains an image tower and a text tower on the same products, so it needs their photos "
              "(column image) and titles (column name); it does not train on titles alone or photos alone. A model "
              "trained on both classifies titles alone (huse classify --mode text) and photos alone (--mode image)")


def _read_rows(ds: Dataset, path: str | Path, images: str | Path | None, skip_bad_rows: bool, several: bool) -> None:
    """Append one catalog's rows to `ds` (split "" where the catalog gives none); a bad row raises, or is
    skipped and recorded with `skip_bad_rows` (with its catalog when there are `several`)."""
    records = read_catalog(path, images, require=("image", "name", "classes"), keep_bad_rows=True, why=TWO_TOWERS)
    first = len(ds.images)
    for r in records:
        try:
            if r.error:  # "row 7, column classes: ..." -> "column classes: ..."
                raise HuseError(r.error.removeprefix(f"row {r.row}, ").removeprefix(f"row {r.row}: "))
            try:
                cls = join_paths(parse_paths(r.classes))  # one path, or several separated by '|'
            except HuseError as e:
                raise HuseError(f"column classes: {e}") from None
            if r.image is None:
                raise HuseError("no image")
            decode_image(r.image)  # the training pass decodes it again; this finds bad files up front
        except HuseError as e:
            if not skip_bad_rows:
                sep = ", " if str(e).startswith("column ") else ": "  # "row 7, column classes: ..."
                folder = (f" (photos resolve against --images {images}: is that the folder the catalog's paths "
                          "start from?)" if images is not None and "does not exist" in str(e) else "")
                raise HuseError(f"{path}, row {r.row}{sep}{e}{folder}. Fix the row, or pass --skip-bad-rows to skip "
                                "and count bad rows") from None
            ds.skipped.append({"row": r.row, "image": r.image if isinstance(r.image, str) else None, "reason": str(e),
                               **({"catalog": str(path)} if several else {})})
            continue
        title = normalise_title(r.name) or ""
        # no id, no title: the photo is the product (a photo held as bytes, by its sha256)
        group = r.product_id or title.lower() or f"image {_photo_key(r.image)}"
        ds.images.append(r.image)
        ds.titles.append(title)
        ds.classes.append(cls)
        ds.product_ids.append(group)
        ds.splits.append(r.split or "")
    if len(ds.images) == first:
        mine = [s for s in ds.skipped if s.get("catalog", str(path)) == str(path)]
        shown = f"; the first, row {mine[0]['row']}: {mine[0]['reason']}" if mine else ""
        raise HuseError(f"{path}: no usable rows ({len(mine)} skipped{shown})")


def _check_splits(ds: Dataset, path: str | Path) -> None:
    """What training needs of the splits: whole products in one split, train and val rows, two classes in train."""
    seen: dict[str, str] = {}
    for g, s in zip(ds.product_ids, ds.splits):
        if seen.setdefault(g, s) != s:
            raise HuseError(f"{path}: product {g!r} has rows in both {seen[g]!r} and {s!r}; "
                            "a product's images and title must stay in one split")
    if not len(ds.indices("train")):
        raise HuseError(f"{path}: the train split is empty; add rows or fix the split column")
    if not len(ds.indices("val")):  # else it trains, then fails where it first reads val (epochs, fusion, temperature)
        raise HuseError(f"{path}: the val split is empty; training chooses its epochs, fusion weight and temperatures on "
                        "val: give some products split 'val', or add products and let huse split them")
    classes = ds.split_classes("train")
    if len(classes) < 2:  # else the model trains to the end and the baselines fail on one class
        raise HuseError(f"{path}: the train split has one class, {classes.pop()!r}; a classifier needs at least two: "
                        "add products of other classes")


def load_builtin(name: str, *, fmnist_dir: str | None = None, train_size: int | None = None, val_size: int = 5000,
                 test_size: int | None = None, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name (see DATASETS)."""
    if name not in DATASETS:
        raise HuseError(f"Dataset {name!r} not found; available datasets = {list(DATASETS)}")
    from huse.train.fashion import load_fashion_products

    fp = load_fashion_products(fmnist_dir, train_size=train_size, val_size=val_size, test_size=test_size, seed=seed,
                               open_vocab=name == "fashion-products-open")
    source = {"dataset": name, "fmnist_dir": fmnist_dir, "train_size": train_size, "val_size": val_size,
              "test_size": test_size, "seed": seed}
    return Dataset(list(fp.images), fp.titles, fp.classes, fp.product_ids, fp.splits, source)


def load_source(source: dict[str, Any], skip_bad_rows: bool = True) -> Dataset:
    """Load the dataset a run recorded (export uses it for parity checks and calibration)."""
    if "dataset" in source:
        return load_builtin(source["dataset"], fmnist_dir=source.get("fmnist_dir"), train_size=source.get("train_size"),
                            val_size=source.get("val_size", 5000), test_size=source.get("test_size"), seed=source.get("seed", 0))
    return load_catalog_dataset(source.get("catalogs") or source["catalog"], source.get("images"),
                                skip_bad_rows=skip_bad_rows, seed=source.get("seed", 0),
                                val_frac=source.get("val_frac", 0.1), test_frac=source.get("test_frac", 0.1))
