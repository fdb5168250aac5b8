"""Session fixtures: a tiny generated catalog, a tiny trained run and its bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.make_data import make_catalog


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="session")
def tiny_run(tiny_catalog, tmp_path_factory) -> Path:
    """A HUSE run over the tiny CNN backbone: seconds, every code path."""
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("runs") / "tiny"
    ds = load_catalog_dataset(tiny_catalog)
    Trainer(ds, out, HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=64, hidden=64, max_len=8),
            TrainConfig(epochs=20, batch_size=32, lr=3e-3)).fit(progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    from huse.export.api import ExportOptions, export

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export(tiny_run, out, ExportOptions(say=lambda s: None, engine="skip"))
    return out
