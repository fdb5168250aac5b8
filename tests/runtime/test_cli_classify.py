"""`huse classify` end to end: every row is written, bad rows carry their error."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from huse.runtime.cli import main


def test_classify_writes_every_row(tiny_bundle, tiny_catalog, tmp_path):
    folder = tmp_path / "cat"
    shutil.copytree(tiny_catalog.parent, folder)
    lines = (folder / "catalog.csv").read_text().splitlines()
    lines.append("images/does_not_exist.png,Acme black tee,clothing<tops<t-shirts,p-missing")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.jsonl"
    r = CliRunner().invoke(main, ["classify", str(tiny_bundle), "--data", str(folder / "catalog.csv"), "--out", str(out),
                                  "--mode", "image"])
    assert r.exit_code == 0, r.output
    preds = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(preds) == len(lines) - 1
    assert "does_not_exist.png" in preds[-1]["error"]
    assert "1 rows failed" in r.output and "top-1 accuracy" in r.output


def test_huse_error_is_one_line_and_exit_1(tmp_path):
    r = CliRunner().invoke(main, ["classify", str(tmp_path), "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert r.output.startswith("error: ") and "Traceback" not in r.output


def test_info_verifies_the_bundle(tiny_bundle):
    r = CliRunner().invoke(main, ["info", str(tiny_bundle)])
    assert r.exit_code == 0 and "files verified" in r.output
