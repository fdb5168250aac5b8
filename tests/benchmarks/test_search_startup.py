"""benchmarks/search_startup.py at a tiny scale: every verification mode answers, no torch, the index is reused."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")


def test_search_startup_runs_at_a_tiny_scale(tiny_bundle, tiny_catalog, tmp_path):
    from huse.benchmarks.search_startup import build_synthetic_index, run

    r = run(tiny_bundle, tiny_catalog, scale=300, runs=1, targets=("image",), out=tmp_path)
    rows = r["targets"]["image"]
    assert set(rows) == {"first", "stamped", "hash always", "no verify"}
    assert all(row["hits"] == 10 and not row["torch_imported"] and row["median_s"] > 0 for row in rows.values())
    assert r["index"]["built"] and json.loads((tmp_path / "index-300" / "manifest.json").read_text())["counts"]["items"] == 300
    assert "| image | stamped |" in (tmp_path / "search_startup.md").read_text()
    assert not build_synthetic_index(tiny_bundle, tmp_path / "index-300", 300, tiny_catalog)["built"]  # reused
