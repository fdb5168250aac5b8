"""benchmarks/index_memory.py at a tiny scale: both ways of building are measured and the figures add up."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")


@pytest.mark.parametrize("source", ["catalog", "vectors"])
def test_index_memory_measures_a_build(source, tiny_bundle, tiny_catalog, tmp_path):
    from huse.benchmarks.index_memory import main

    args = ["--data", str(tiny_catalog), "--images", str(tiny_catalog.parent)] if source == "catalog" else \
        ["--vectors", "3000"]
    r = CliRunner().invoke(main, [str(tiny_bundle), *args, "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["products"] == (120 if source == "catalog" else 3000)
    peak = got["peak_bytes"]
    assert 0 < peak["anon"] <= peak["rss"] <= peak["ru_maxrss"] * 1.01  # a sample can only miss the peak
    assert got["bytes_per_product"]["anon"] == round(peak["anon"] / got["products"])
    assert got["modalities"] == (["image", "text", "visual"] if source == "catalog" else ["image", "text"])
    assert list(tmp_path.iterdir()) == [tmp_path / "m.json"]  # the index and vectors were temporary
