"""Fixtures of the page and review tests: a catalog of our own, and `huse classify` output over it.

Imported by the test modules that use them (conftest.py holds the server fixtures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from huse.runtime.cli import main


def classify(bundle: Path, catalog: Path, out: Path, *args) -> Path:
    """`huse classify BUNDLE --data CATALOG --out OUT ...`, the way a user makes review input."""
    r = CliRunner().invoke(main, ["classify", str(bundle), "--data", str(catalog), "--out", str(out), "--no-progress",
                                  *map(str, args)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def review_catalog(tiny_catalog, tmp_path_factory) -> Path:
    """A copy of the tiny catalog (tests may add files beside it)."""
    folder = tmp_path_factory.mktemp("review") / "cat"
    shutil.copytree(tiny_catalog.parent, folder)
    return folder / "catalog.csv"


@pytest.fixture(scope="module")
def preds(tiny_bundle, review_catalog, tmp_path_factory) -> Path:
    """Predictions with about half the rows below --min-confidence (the median score, whatever the model)."""
    tmp = tmp_path_factory.mktemp("preds")
    first = classify(tiny_bundle, review_catalog, tmp / "all.jsonl")
    scores = sorted(json.loads(line)["score"] for line in first.read_text().splitlines())
    return classify(tiny_bundle, review_catalog, tmp / "preds.jsonl", "--min-confidence", scores[len(scores) // 2])


@pytest.fixture(scope="module")
def labels(tiny_bundle) -> list[str]:
    return json.loads((tiny_bundle / "manifest.json").read_text())["labels"]
