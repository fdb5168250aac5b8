"""The bad-image corpus through the API and through `huse classify`: every item answered, none lost.

Every item comes back either classified (with a warning naming the file when Pillow complained)
or with an error naming the file; the good items' predictions are the same as when they are
classified alone (a bad neighbour changes nothing); memory stays bounded.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from huse.runtime import Classifier
from tests.reliability.corpus import make_image_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_image_corpus(folder)


def _check(results, cases, folder):
    assert len(results) == len(cases)
    for case, res in zip(cases, results):
        path = str(folder / case.name)
        if case.expect == "error":
            assert "error" in res and path in res["error"], (case, res)
            assert "top_k" not in res
        else:
            assert "error" not in res and res["top_k"], (case, res)
            if case.expect == "warn":
                assert path in res["warning"], (case, res)
            else:
                assert "warning" not in res, (case, res)


def test_api_answers_every_item_and_bad_neighbours_change_nothing(tiny_bundle, corpus):
    folder, cases = corpus
    with Classifier(tiny_bundle, backend="onnxruntime", batch_size=4) as clf:
        paths = [str(folder / c.name) for c in cases]
        results = clf.classify(images=paths, mode="image", top_k=2)
        _check(results, cases, folder)
        good = [i for i, c in enumerate(cases) if c.expect != "error"]
        alone = clf.classify(images=[paths[i] for i in good], mode="image", top_k=2)
        for i, res in zip(good, alone):
            assert res["top_k"] == results[i]["top_k"]


def test_api_items_of_the_wrong_type_are_that_items_error(tiny_bundle, corpus):
    folder, cases = corpus
    import numpy as np

    items = [7, {"path": "x.png"}, 2.5, np.zeros((4, 4, 3), np.float32), str(folder / "good.png"), None]
    with Classifier(tiny_bundle, backend="onnxruntime") as clf:
        out = clf.classify(images=items, titles=["Acme tee", None, None, None, None, None])
    assert out[0]["mode"] == "text" and "got int" in out[0]["warning"]  # its title still classifies it
    assert "got dict" in out[1]["error"] and "got float" in out[2]["error"]
    assert "uint8" in out[3]["error"]
    assert out[4]["mode"] == "image"
    assert "no usable image or title" in out[5]["error"]


def test_cli_answers_every_row_without_a_traceback(tiny_bundle, corpus, tmp_path):
    folder, cases = corpus
    catalog = tmp_path / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name"])
        for c in cases:
            w.writerow([c.name, ""])
    out = tmp_path / "preds.jsonl"
    run = subprocess.run([sys.executable, "-m", "huse.runtime.cli", "classify", str(tiny_bundle), "--data", str(catalog),
                          "--images", str(folder), "--out", str(out), "--backend", "onnxruntime"],
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode in (0, 1), run.stderr  # non-zero only by an error-rate rule, never a crash
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == sorted(r["row"] for r in rows) and len(rows) == len(cases)
    _check(rows, cases, folder)


MEMORY_SCRIPT = r"""
import resource, sys
from huse.runtime import Classifier
folder, bundle = sys.argv[1], sys.argv[2]
names = sys.argv[3:]
with Classifier(bundle, backend="onnxruntime", threads=1) as clf:
    clf.classify(titles=["warm up"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = clf.classify(images=[folder + "/" + n for n in names], mode="image")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(out), (after - before) // 1024)
"""


def test_memory_stays_bounded_on_the_corpus(tiny_bundle, corpus):
    """The corpus holds a 16-bit 7000x7000 PNG (110 kB; ~1 GB to decode before the byte cap) and
    header-only bombs; classifying all of it must not raise the peak RSS by more than 256 MiB."""
    folder, cases = corpus
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder), str(tiny_bundle), *[c.name for c in cases]],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    n, grew_mib = map(int, run.stdout.split())
    assert n == len(cases)
    assert grew_mib < 256, f"peak RSS grew by {grew_mib} MiB"
