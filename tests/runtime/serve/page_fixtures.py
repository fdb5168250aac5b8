"""Fixtures of the page and review tests: a catalog of our own, and `huse classify` output over it.

conftest.py imports the fixtures; the test modules import the helpers.
"""

from __future__ import annotations

import csv
import json
import os
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


@pytest.fixture(scope="module")
def kept_photos_index(tiny_bundle, tiny_catalog, tmp_path_factory) -> tuple[Path, list[dict], list[bytes | None]]:
    """An index of 30 products given with their photos as bytes (as a Parquet catalog holds them), the first
    three without a photo: the index keeps the photos (runtime/index.py, photos.N.bin). Returns the index,
    the rows and each item's photo."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed; pip install 'huse-edge[index]'")
    from huse.runtime import Index

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))[:30]
    photos = [None if i < 3 else (tiny_catalog.parent / r["image"]).read_bytes() for i, r in enumerate(rows)]
    out = tmp_path_factory.mktemp("kept") / "index"
    Index.build(tiny_bundle, [dict(r, image=p) for r, p in zip(rows, photos)], out, kind="flat", progress=False)
    return out, rows, photos


# -- the browser ------------------------------------------------------------------------------
CHROMIUM_MISSING = ("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian, driven by Selenium; skipped, saying why, where it is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed; pip install 'huse-edge[dev]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(CHROMIUM_MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


def screenshot(browser, name: str, height: int = 900) -> Path:
    """Save the page as NAME.png in $HUSE_SCREENSHOTS (the README's come from there: docs/screenshots),
    else in a temporary folder; returns the file."""
    import tempfile

    folder = Path(os.environ.get("HUSE_SCREENSHOTS") or tempfile.mkdtemp(prefix="huse-screens-"))
    folder.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1100, height)
    path = folder / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1200, 900)
    from PIL import Image  # 128 colours: a few hundred KB become a small file for the README

    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path


def big_catalog(tiny_catalog: Path, folder: Path, rows: int) -> Path:
    """A catalog of ROWS products over the tiny catalog's photos (each used many times): read it with
    images=tiny_catalog.parent."""
    src = list(csv.reader(open(tiny_catalog, newline="")))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalog.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(src[0])
        for i in range(rows):
            image, name, classes, pid = src[1 + i % (len(src) - 1)]
            w.writerow([image, f"{name} {i}", classes, f"{pid}-{i}"])
    return path
