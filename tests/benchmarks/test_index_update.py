"""benchmarks/index_update.py at a tiny scale: every update is timed beside the rebuild, and leaves the index whole."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")


def test_index_update_times_each_change_beside_a_rebuild(tiny_bundle, tmp_path):
    from huse.benchmarks.index_update import main

    r = CliRunner().invoke(main, [str(tiny_bundle), "--vectors", "2000", "--products", "3", "--rounds", "2",
                                  "--out", str(tmp_path / "u.json")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "u.json").read_text())
    assert set(got["seconds"]) == {"add", "add_replace", "remove", "rebuild"}
    for k, v in got["seconds"].items():
        assert 0 < v["min"] <= v["median"] <= v["max"], k
    s = got["seconds"]  # the ratio is of the unrounded medians
    assert got["rebuild_over"]["add"] == pytest.approx(s["rebuild"]["median"] / s["add"]["median"], rel=0.05, abs=0.02)
    # each round adds 3 products, replaces their items with 3 more and removes them: 2,000 + 2 x 6 items, 2,000 alive
    assert got["items_after"] == 2012
    assert list(tmp_path.iterdir()) == [tmp_path / "u.json"]  # the index and vectors were temporary
