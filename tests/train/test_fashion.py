"""The fashion-products title generator: fixed, seeded, honestly imperfect."""

from __future__ import annotations

import random

import pytest

from huse.runtime.hierarchy import Hierarchy
from huse.train import fashion


def test_hierarchy_is_three_levels_and_ten_classes():
    labels = [c[0] for c in fashion.CLASSES]
    h = Hierarchy(labels)
    assert len(set(labels)) == 10 and h.depth == 3
    assert [len(h.nodes[k]) for k in range(3)] == [3, 8, 10]


def _names_own_class(title: str, label: int) -> bool:
    return any(noun in title for noun in fashion.CLASSES[label][1])


def test_share_of_titles_without_a_class_noun_is_as_set():
    rng = random.Random(0)
    n = 20000
    no_specific = sum(not _names_own_class(fashion.make_title(i % 10, rng), i % 10) for i in range(n)) / n
    # Titles with no noun or a shared noun; a shared noun may contain a class noun ("top" in
    # "essential top" is not one), so the share is at least P_NO_NOUN + P_SHARED_NOUN minus 2 points.
    assert no_specific == pytest.approx(fashion.P_NO_NOUN + fashion.P_SHARED_NOUN, abs=0.02)


def test_titles_are_deterministic_per_product():
    a = fashion.make_title(3, random.Random("x-fm-train-00001"))
    b = fashion.make_title(3, random.Random("x-fm-train-00001"))
    assert a == b


def test_missing_dataset_says_how_to_install(tmp_path):
    from huse.runtime.errors import HuseError

    with pytest.raises(HuseError, match="apt-get install dataset-fashion-mnist"):
        fashion.fmnist_dir(tmp_path)


@pytest.mark.skipif(not (fashion.DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_photos_split_by_product():
    ds = fashion.load_fashion_products(train_size=300, val_size=100, test_size=200)
    assert ds.images.shape == (600, 28, 28)
    ids = {s: {p for p, sp in zip(ds.product_ids, ds.splits) if sp == s} for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [300, 100, 200]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])
