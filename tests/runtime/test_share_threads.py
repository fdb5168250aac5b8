"""`share_threads`: every onnxruntime session of a process on one pool, with the same answers (issue 24).

onnxruntime's global pool is a process's choice made before its first session, so each case runs in a
fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from huse.runtime import Classifier


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def items(tiny_catalog):
    import csv

    rows = list(csv.DictReader(open(tiny_catalog, newline="", encoding="utf-8")))
    images = [str(tiny_catalog.parent / r["image"]) for r in rows]
    titles = [r["name"] for r in rows]
    n = 40  # more than two row parts' worth of titles: a per-session text session cuts this batch by rows
    titles = (titles * (n // len(titles) + 1))[:n]
    images = (images * (n // len(images) + 1))[:n]
    return images[:n // 2] + [None] * (n - n // 2), titles


def test_a_shared_pool_gives_the_same_answers_and_runs_text_batches_whole(tiny_bundle, items):
    images, titles = items
    with Classifier(tiny_bundle, backend="onnxruntime", threads=2) as clf:  # pools per session
        assert clf._runner("text").row_parts == 2
        want = {"titles": clf.classify(titles=titles, mode="text"), "mixed": clf.classify(images=images, titles=titles)}
    got = _fresh(f"""
import json
from huse.runtime import Classifier, HuseError, share_threads
size = share_threads(2)
clf = Classifier({str(tiny_bundle)!r}, backend="onnxruntime")
text = clf._runner("text")
out = {{"size": size, "row_parts": text.row_parts,
        "own_pools": [clf._runner(g).session.get_session_options().use_per_session_threads for g in ("text", "fused")],
        "titles": clf.classify(titles={titles!r}, mode="text"), "mixed": clf.classify(images={images!r}, titles={titles!r})}}
try:
    share_threads(2)
except HuseError as e:
    out["again"] = str(e)
print(json.dumps(out))
""")
    assert got["size"] == 2 and got["row_parts"] == 1 and got["own_pools"] == [False, False]
    assert "already shares one pool of 2" in got["again"]
    for key in ("titles", "mixed"):
        assert [r["mode"] for r in got[key]] == [r["mode"] for r in want[key]]
        assert [[t["label"] for t in r["top_k"]] for r in got[key]] == [[t["label"] for t in r["top_k"]] for r in want[key]]
        for g, w in zip(got[key], want[key]):
            assert [t["score"] for t in g["top_k"]] == pytest.approx([t["score"] for t in w["top_k"]], abs=1e-6)


def test_sharing_a_pool_after_the_first_session_is_refused(tiny_bundle):
    got = _fresh(f"""
import json
from huse.runtime import Classifier, HuseError, share_threads
Classifier({str(tiny_bundle)!r}, backend="onnxruntime").classify(titles=["a black tee"])
try:
    share_threads()
    print(json.dumps({{"refused": None}}))
except HuseError as e:
    print(json.dumps({{"refused": str(e)}}))
""")
    assert "must come before the process's first onnxruntime session" in got["refused"]
