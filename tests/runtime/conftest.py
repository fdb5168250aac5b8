"""Fixtures shared by the runtime tests: the tiny catalog's records and a flat index over it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def records(tiny_catalog):
    from huse.runtime.catalog import read_catalog

    return read_catalog(tiny_catalog)


@pytest.fixture(scope="module")
def flat_index(tiny_bundle, tiny_catalog, tmp_path_factory) -> Path:
    """An exact index over the tiny catalog (with the visual index: the tiny bundle has visual vectors)."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed; pip install 'huse-edge[index]'")
    from huse.runtime import Index

    out = tmp_path_factory.mktemp("index") / "flat"
    Index.build(tiny_bundle, tiny_catalog, out, kind="flat", progress=False)
    return out
