"""Image views: random crops of the training photos through the frozen backbone, computed once, cached, seeded."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch)")

from PIL import Image  # noqa: E402

import huse.train.views as views  # noqa: E402
from huse.train.data import load_catalog_dataset  # noqa: E402
from huse.train.model import HuseConfig  # noqa: E402
from huse.train.trainer import TrainConfig, Trainer  # noqa: E402


def _trainer(catalog, out, **train) -> Trainer:
    return Trainer(load_catalog_dataset(catalog), out,
                   HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=64, hidden=64, max_len=8),
                   TrainConfig(epochs=2, batch_size=32, lr=3e-3, cv_folds=0, **train))


def test_a_view_is_a_large_part_of_the_photo_and_seeded():
    img = Image.fromarray(np.arange(100 * 80 * 3, dtype=np.uint32).reshape(80, 100, 3).astype(np.uint8))
    for seed in range(50):
        v = views.random_view(img, np.random.default_rng(seed))
        assert v.width <= 100 and v.height <= 80
        assert v.width * v.height >= 0.6 * 100 * 80 * 0.99  # AREA's lower end, up to rounding
    same = [views.random_view(img, np.random.default_rng(7)).tobytes() for _ in range(2)]
    assert same[0] == same[1] and views.random_view(img, np.random.default_rng(8)).tobytes() != same[0]


def test_views_are_cached_for_the_rows_trained_on_and_reused(tiny_catalog, tmp_path, monkeypatch):
    first = _trainer(tiny_catalog, tmp_path / "a", image_views=2)
    first.fit(progress=False)
    v, test = first.image_views, first.split["test"]
    assert v.shape == (2, len(first.ds.images), first.image_feats.shape[1])
    trained_on = torch.cat([first.split["train"], first.split["val"]])
    assert bool((v[:, test] == 0).all()) and bool((v[:, trained_on].abs().sum(-1) > 0).all())  # test: never computed
    assert not torch.equal(v[0, trained_on], first.image_feats[trained_on])  # a view is another look at the photo
    assert not torch.equal(v[0], v[1])

    def refuse(*a, **k):
        raise AssertionError("views computed again")

    monkeypatch.setattr(views, "view_features", refuse)  # a second run with the same cache and seed reads them
    again = _trainer(tiny_catalog, tmp_path / "b", image_views=2)
    again.cache = first.cache
    again._prepare_features()
    assert torch.equal(again.image_views, v)


def test_val_and_test_see_the_plain_photo(tiny_catalog, tmp_path):
    tr = _trainer(tiny_catalog, tmp_path / "run", image_views=3)
    tr.fit(progress=False)
    tr.model.eval()
    with torch.no_grad():
        plain = tr.model.classifier(tr.model.embed_image_features(tr.image_feats[tr.split["test"]])).softmax(-1).numpy()
    for _ in range(2):  # no view drawn: the same answer every time
        assert np.allclose(tr.predict("test")["image"], plain, atol=1e-6)


def test_views_need_a_frozen_backbone_and_a_count(tiny_catalog, tmp_path):
    from huse.runtime.errors import HuseError

    with pytest.raises(HuseError, match="--fine-tune"):
        Trainer(load_catalog_dataset(tiny_catalog), tmp_path / "ft",
                HuseConfig(num_classes=0, backbone="tiny", image_size=32, freeze_backbone=False),
                TrainConfig(epochs=1, image_views=2))
    with pytest.raises(HuseError, match=r"--image-views \(image_views\) must be at least 0; got -1"):
        TrainConfig(image_views=-1)
