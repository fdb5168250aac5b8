"""Catalog validation (bad rows name the file and row) and product-level splits."""

from __future__ import annotations

import csv
import hashlib
import shutil

import pytest

from huse.runtime.errors import HuseError
from huse.train.data import load_catalog_dataset
from tests.models.make_data import write_rows


def _copy(tiny_catalog, tmp_path):
    folder = tmp_path / "cat"
    shutil.copytree(tiny_catalog.parent, folder)
    return folder / "catalog.csv"


def _append(path, row):
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(row)
    return sum(1 for _ in open(path)) - 1  # the data row number of the appended row


@pytest.mark.parametrize("row,expected", [
    (["images/nope.png", "Acme tee", "clothing<tops<t-shirts", "x1"], "does not exist"),
    (["images/img_0_0.png", "Acme tee", "", "x2"], "empty class"),
    (["images/img_0_0.png", "Acme tee", "clothing<<t-shirts", "x3"], "empty level"),
    (["images/corrupt.png", "Acme tee", "clothing<tops<t-shirts", "x4"], "could not be decoded"),
])
def test_bad_row_stops_training_naming_file_and_row(tiny_catalog, tmp_path, row, expected):
    path = _copy(tiny_catalog, tmp_path)
    (path.parent / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    n = _append(path, row)
    with pytest.raises(HuseError) as e:
        load_catalog_dataset(path)
    msg = str(e.value)
    assert f"{path}, row {n}" in msg and expected in msg and "--skip-bad-rows" in msg


def test_skip_bad_rows_counts_them(tiny_catalog, tmp_path):
    path = _copy(tiny_catalog, tmp_path)
    good = sum(1 for _ in open(path)) - 1
    _append(path, ["images/nope.png", "Acme tee", "clothing<tops<t-shirts", "x1"])
    _append(path, ["images/img_0_0.png", "Acme tee", "", "x2"])
    _append(path, ["images/img_0_0.png", "Acme tee", "clothing<<t-shirts", "x3"])  # the catalog's error now
    ds = load_catalog_dataset(path, skip_bad_rows=True)
    assert len(ds.images) == good
    assert [s["row"] for s in ds.skipped] == [good + 1, good + 2, good + 3]
    assert ds.skipped[2]["reason"].startswith("column classes: class path 'clothing<<t-shirts'")


def test_a_wrong_images_folder_is_named_as_the_likely_cause(tiny_catalog, tmp_path):
    with pytest.raises(HuseError, match=rf"does not exist \(photos resolve against --images {tmp_path}: is that the "
                                        r"folder the catalog's paths start from\?\)"):
        load_catalog_dataset(tiny_catalog, images=tmp_path)
    with pytest.raises(HuseError, match=r"no usable rows \(120 skipped; the first, row 1: image .* does not exist\)"):
        load_catalog_dataset(tiny_catalog, images=tmp_path, skip_bad_rows=True)


@pytest.mark.parametrize("header,expected", [("image,name,clases", "column 'clases' is not one huse reads; did you mean 'classes'"),
                                             ("image,name,classes,name", "appears twice")])
def test_bad_header(tmp_path, header, expected):
    path = tmp_path / "c.csv"
    path.write_text(header + "\n")
    with pytest.raises(HuseError, match=expected):
        load_catalog_dataset(path)


def test_split_is_by_product_never_by_image(tiny_catalog, tmp_path):
    path = _copy(tiny_catalog, tmp_path)
    # Every product gets 3 more images: a split by image would scatter them.
    rows = list(csv.DictReader(open(path)))
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        for r in rows:
            for _ in range(3):
                w.writerow([r["image"], r["name"], r["classes"], r["product_id"]])
    ds = load_catalog_dataset(path, seed=3)
    split_of = {}
    for pid, s in zip(ds.product_ids, ds.splits):
        assert split_of.setdefault(pid, s) == s
    assert set(ds.splits) == {"train", "val", "test"}
    # Seeded: the same seed gives the same split, another seed another one.
    assert load_catalog_dataset(path, seed=3).splits == ds.splits
    assert load_catalog_dataset(path, seed=4).splits != ds.splits


def test_without_product_id_titles_group_products(tmp_path, tiny_catalog):
    path = tmp_path / "c.csv"
    rows = list(csv.DictReader(open(tiny_catalog)))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes"])
        for r in rows:
            w.writerow([str(tiny_catalog.parent / r["image"]), r["name"], r["classes"]])
    ds = load_catalog_dataset(path)
    split_of = {}
    for title, s in zip(ds.titles, ds.splits):
        assert split_of.setdefault(title.lower(), s) == s


def test_split_column_is_respected_and_conflicts_refused(tmp_path, tiny_catalog):
    path = tmp_path / "c.csv"
    rows = list(csv.DictReader(open(tiny_catalog)))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id", "split"])
        for i, r in enumerate(rows):
            w.writerow([str(tiny_catalog.parent / r["image"]), r["name"], r["classes"], r["product_id"], ["train", "val", "test"][i % 3]])
        w.writerow([str(tiny_catalog.parent / rows[0]["image"]), "x", rows[0]["classes"], rows[0]["product_id"], "test"])
    with pytest.raises(HuseError, match="both 'train' and 'test'"):
        load_catalog_dataset(path)


def test_a_train_split_of_one_class_is_refused_before_training(tmp_path, tiny_catalog):
    rows = list(csv.DictReader(open(tiny_catalog)))
    one = [r for r in rows if r["classes"] == rows[0]["classes"]]
    path = tmp_path / "one.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id", "split"])
        for i, r in enumerate(one):
            w.writerow([str(tiny_catalog.parent / r["image"]), r["name"], r["classes"], r["product_id"],
                        ["train", "train", "val", "test"][i % 4]])
    with pytest.raises(HuseError, match=f"one.csv: the train split has one class, '{rows[0]['classes']}'"):
        load_catalog_dataset(path)
    other = next(r for r in rows if r["classes"] != rows[0]["classes"])
    with open(path, "a", newline="") as f:  # one product of a second class in train is enough
        csv.writer(f).writerow([str(tiny_catalog.parent / other["image"]), other["name"], other["classes"], "new", "train"])
    ds = load_catalog_dataset(path)
    assert {ds.classes[i] for i in ds.indices("train")} == {rows[0]["classes"], other["classes"]}


def test_classes_only_val_or_test_rows_carry_are_named(tmp_path, tiny_catalog):
    rows = list(csv.DictReader(open(tiny_catalog)))
    rare = rows[0]["classes"]
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id", "split"])
        for i, r in enumerate(rows):
            split = ("val" if i % 2 else "test") if r["classes"] == rare else ["train", "train", "val"][i % 3]
            w.writerow([str(tiny_catalog.parent / r["image"]), r["name"], r["classes"], r["product_id"] + "-" + split, split])
    ds = load_catalog_dataset(path)
    assert ds.classes_without_training_rows() == {rare: sum(r["classes"] == rare for r in rows)}
    assert load_catalog_dataset(tiny_catalog).classes_without_training_rows() == {}


def test_the_split_gives_every_class_a_product_in_train(tmp_path, tiny_catalog):
    from huse.train.data import _assign_split

    rows = [dict(r, image=str(tiny_catalog.parent / r["image"])) for r in csv.DictReader(open(tiny_catalog))]
    # two products of a class of its own whose ids both hash into val or test at seed 0
    ids = [f"rare-{k}" for k in range(200) if _assign_split(f"rare-{k}", 0, 0.1, 0.1) != "train"][:2]
    rare = [dict(rows[view], name="rare thing", classes="rare<one", product_id=pid) for pid in ids for view in range(2)]
    ds = load_catalog_dataset(write_rows(tmp_path / "c.csv", rows + rare))
    assert ds.classes_without_training_rows() == {}
    assert ds.moved_to_train == [min(ids, key=lambda g: hashlib.sha256(f"0:{g}".encode()).digest())]
    split = {g: s for g, s in zip(ds.product_ids, ds.splits)}
    assert split[ds.moved_to_train[0]] == "train"
    assert [split[g] for g in ids if g not in ds.moved_to_train][0] in ("val", "test")  # one is enough
    assert load_catalog_dataset(tiny_catalog).moved_to_train == []  # every class trains: the hash split stands
    # a catalog's own split column is its own: nothing moves
    own = [dict(r, split=["train", "train", "val"][i % 3]) for i, r in enumerate(rows)] + [dict(rare[0], split="test")]
    own = load_catalog_dataset(write_rows(tmp_path / "own.csv", own))
    assert own.moved_to_train == [] and own.classes_without_training_rows() == {"rare<one": 1}


def test_corrections_of_the_training_catalog_replace_its_rows(tmp_path, tiny_catalog):
    """`huse review export` of the training catalog itself, trained on beside it: each corrected photo trains once,
    under its corrected classes, in its product's split (it stopped with a split conflict, or trained twice)."""
    rows = [dict(r, split=["train", "train", "val"][i % 3]) for i, r in enumerate(csv.DictReader(open(tiny_catalog)))]
    own = write_rows(tmp_path / "own.csv", rows)
    fixed = {i: next(r["classes"] for r in rows if r["classes"] != rows[i]["classes"]) for i in (2, 5, 9)}  # 2 val, 1 train
    # as huse review export writes them: no split column
    corrections = write_rows(tmp_path / "corrections.csv", [
        {k: v for k, v in dict(rows[i], classes=c).items() if k != "split"} for i, c in fixed.items()])
    alone = load_catalog_dataset(own, tiny_catalog.parent)
    ds = load_catalog_dataset([own, corrections], [tiny_catalog.parent, tiny_catalog.parent])
    assert ds.replaced == 3 and len(ds.images) == len(rows)
    assert ds.splits == alone.splits and ds.images == alone.images and ds.product_ids == alone.product_ids
    assert [i for i, (a, b) in enumerate(zip(ds.classes, alone.classes)) if a != b] == sorted(fixed)
    assert all(ds.classes[i] == c for i, c in fixed.items())


def test_a_class_written_two_ways_is_named_once_at_its_node():
    from huse.train.data import Dataset

    classes = ["Shoes<Boots", "shoes<boots", "shoes<boots", "clothing<T-Shirts", "clothing<t shirts|bags",
               "clothing<t_shirts", "clothing<dresses", "bags"]
    ds = Dataset(images=[None] * 8, titles=[""] * 8, classes=classes, product_ids=[str(i) for i in range(8)],
                 splits=["train"] * 8, source={})
    assert ds.classes_spelled_apart() == [{"Shoes": 1, "shoes": 2},  # not again at Shoes<Boots / shoes<boots
                                          {"clothing<T-Shirts": 1, "clothing<t shirts": 1, "clothing<t_shirts": 1}]
    ds.classes = ["clothing<tops", "clothing<tops<tees", "shoes<tops", "Bags|bags-x"]
    assert ds.classes_spelled_apart() == []  # the same name under two parents, and different words, are not one


def test_huse_train_warns_of_a_class_written_two_ways(tmp_path, tiny_catalog, monkeypatch):
    from click.testing import CliRunner

    from huse.train import trainer
    from huse.train.cli import main

    rows = list(csv.DictReader(open(tiny_catalog)))
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "image": str(tiny_catalog.parent / r["image"]),
                        "classes": r["classes"].upper() if i % 7 == 0 else r["classes"]})

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop  # the warning comes before training; nothing needs to train

    monkeypatch.setattr(trainer, "Trainer", stop)
    r = CliRunner().invoke(main, ["--data", str(path), "--out", str(tmp_path / "run"), "--backbone", "tiny"])
    assert isinstance(r.exception, Stop), r.output
    assert "class name(s) are written in more than one way" in r.output
    top = rows[0]["classes"].split("<")[0]
    assert f"{top.upper()!r} (" in r.output and f"{top!r} (" in r.output


def test_training_needs_photos_and_titles_and_says_so(tmp_path, tiny_catalog):
    rows = list(csv.DictReader(open(tiny_catalog)))
    for name, columns in (("no_name.csv", ["image", "classes"]), ("no_image.csv", ["name", "classes"])):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow([str(tiny_catalog.parent / r[c]) if c == "image" else r[c] for c in columns])
        missing = ({"image", "name"} - set(columns)).pop()
        with pytest.raises(HuseError, match=rf"{name}: column\(s\) \['{missing}'\] are required") as e:
            load_catalog_dataset(tmp_path / name)
        # why, and what works without one of them (a title-only feed is a common first catalog)
        assert "does not train on titles alone or photos alone" in str(e.value)
        assert "huse classify --mode text" in str(e.value)
    with open(tmp_path / "untitled.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes"])
        for r in rows:
            w.writerow([str(tiny_catalog.parent / r["image"]), "", r["classes"]])
    with pytest.raises(HuseError, match="untitled.csv: no row has a title"):
        load_catalog_dataset(tmp_path / "untitled.csv")


def test_a_row_without_product_id_or_title_is_a_product_of_its_own(tmp_path, tiny_catalog):
    # Grouped by an empty title, every such row was one product: one split, and positives of each other.
    rows = list(csv.DictReader(open(tiny_catalog)))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes"])
        for i, r in enumerate(rows):
            w.writerow([str(tiny_catalog.parent / r["image"]), "" if i % 4 == 0 else r["name"], r["classes"]])
    ds = load_catalog_dataset(tmp_path / "c.csv")
    untitled = [g for g, t in zip(ds.product_ids, ds.titles) if not t]
    assert len(untitled) == len(rows[::4]) and len(set(untitled)) == len(untitled)
    assert len({s for s, t in zip(ds.splits, ds.titles) if not t}) > 1


def test_an_empty_val_split_is_refused_before_training(tmp_path, tiny_catalog):
    rows = list(csv.DictReader(open(tiny_catalog)))
    path = tmp_path / "no_val.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id", "split"])
        for i, r in enumerate(rows):
            w.writerow([str(tiny_catalog.parent / r["image"]), r["name"], r["classes"], r["product_id"], ["train", "test"][i % 2]])
    with pytest.raises(HuseError, match="no_val.csv: the val split is empty"):
        load_catalog_dataset(path)


def test_training_from_photos_held_in_parquet_equals_training_from_their_files(tiny_catalog, tmp_path):
    """The same rows, photos as bytes in the catalog instead of files: the same image size chosen from
    the photos, the same splits, and the same trained model, bit for bit."""
    pytest.importorskip("pyarrow.parquet")
    import json

    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer
    from tests.models.make_data import photos_in_parquet

    held = photos_in_parquet(tiny_catalog, tmp_path / "held.parquet")
    datasets = {"paths": load_catalog_dataset(tiny_catalog), "held": load_catalog_dataset(held)}
    assert all(isinstance(i, bytes) for i in datasets["held"].images)
    assert datasets["held"].splits == datasets["paths"].splits
    for name, ds in datasets.items():
        Trainer(ds, tmp_path / name, HuseConfig(num_classes=0, backbone="tiny", image_size="auto", embed_dim=32,
                                                hidden=32, max_len=8),
                TrainConfig(epochs=3, batch_size=32, cv_folds=0)).fit(progress=False)
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in datasets]
    assert weights[0] == weights[1]
    sizes = [json.loads((tmp_path / n / "config.json").read_text())["model"]["image_size"] for n in datasets]
    assert sizes[0] == sizes[1]  # "auto" read the held photos' sizes as it reads files' (it raised before)


def test_a_catalog_in_product_taxonomy_form_trains_the_same_hierarchy(tiny_catalog, tmp_path):
    """Classes written 'clothing > tops > t-shirts' (Google's and Shopify's form) read as 'clothing<tops<t-shirts'."""
    shutil.copytree(tiny_catalog.parent, tmp_path / "cat")
    path = tmp_path / "cat" / "catalog.csv"
    rows = list(csv.DictReader(open(path, newline="")))
    write_rows(path, [dict(r, classes=r["classes"].replace("<", " > ")) for r in rows])
    assert load_catalog_dataset(path).classes == load_catalog_dataset(tiny_catalog).classes


def test_several_catalogs_train_as_one_each_with_its_own_folder_and_splits(tiny_catalog, tmp_path):
    """Yours and the corrections of a review (`huse review export`), in other folders: each catalog's paths
    resolve against its own folder (or its own --images), keeps its own split column, and a bad row names
    the catalog it is in."""
    from huse.train.data import load_source

    rows = list(csv.DictReader(open(tiny_catalog)))
    mine = tmp_path / "mine" / "catalog.csv"  # a split column of its own
    mine.parent.mkdir()
    with open(mine, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id", "split"])
        for i, r in enumerate(rows[:90]):
            w.writerow([str(tiny_catalog.parent / r["image"]), r["name"], r["classes"], r["product_id"],
                        ["train", "train", "val"][i % 3]])
    corrections = _copy(tiny_catalog, tmp_path / "review")  # paths relative to its own folder, no split column
    write_rows(corrections, [dict(r, product_id=f"new-{r['product_id']}") for r in rows[90:]])

    ds = load_catalog_dataset([mine, corrections])
    assert len(ds.images) == 120 and ds.titles == [r["name"] for r in rows]
    assert ds.splits[:90] == [["train", "train", "val"][i % 3] for i in range(90)]
    assert set(ds.splits[90:]) <= {"train", "val", "test"} and "test" in ds.splits[90:]  # split by product
    assert ds.source["catalogs"] == [str(mine.resolve()), str(corrections.resolve())]
    again = load_source(ds.source)  # what huse-export reloads for its checks
    assert again.images == ds.images and again.splits == ds.splits

    # --images once per catalog, in order; a count that is neither one nor theirs is refused
    ds2 = load_catalog_dataset([mine, corrections], [None, corrections.parent])
    assert ds2.images == ds.images
    with pytest.raises(HuseError, match="give --images once .* or once per --data.*got 3 for 2 catalogs"):
        load_catalog_dataset([mine, corrections], [None, None, None])
    n = _append(corrections, ["images/nope.png", "Acme tee", "clothing<tops<t-shirts", "x1"])
    with pytest.raises(HuseError, match=rf"{corrections}, row {n}: image .* does not exist"):
        load_catalog_dataset([mine, corrections])
    skipped = load_catalog_dataset([mine, corrections], skip_bad_rows=True).skipped
    assert [(s["catalog"], s["row"]) for s in skipped] == [(str(corrections), n)]
