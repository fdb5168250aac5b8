"""Retrieval index: build/search round trip, cross-modal search, filters, add/remove, refusals."""

from __future__ import annotations

import csv
import os
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")

from huse.runtime import HuseError, Index  # noqa: E402
from huse.runtime.files import from_sheet_cell  # noqa: E402
from huse.runtime.index import choose_kind, parse_memory  # noqa: E402
from tests.models.make_data import split_catalog, write_rows  # noqa: E402


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_own_photo_is_its_own_nearest_image(flat_index, records):
    idx = Index.open(flat_index)
    sample = records[::17]
    hits = idx.search(images=[r.image for r in sample], k=3, target="image")
    for r, h in zip(sample, hits):
        assert h[0].row == r.row and h[0].product_id == r.product_id, (r, h[0])
        assert h[0].score == pytest.approx(1.0, abs=1e-4)
        assert h[0].score >= h[1].score >= h[2].score
    m = idx.manifest
    assert m["kind"] == "flat" and m["counts"]["items"] == len(records) and m["modalities"]["image"]["recall_at_10"] == 1.0
    assert repr(idx) == (f"Index({str(flat_index)!r}, kind='flat', items={len(records)}, dim={idx.dim}, "
                         f"modalities=['image', 'text', 'visual'])")


def test_cross_modal_title_finds_photos_of_its_class(flat_index, records):
    idx = Index.open(flat_index)
    queries = ["Acme black boots", "Birch navy tee", "Cobalt black handbag", "Acme navy shirt"]
    want = ["shoes<boots<ankle boots", "clothing<tops<t-shirts", "bags<handbags<handbags", "clothing<tops<shirts"]
    precision = [np.mean([h.classes == w for h in hits]) for w, hits in
                 zip(want, idx.search(texts=queries, k=10, target="image"))]
    assert np.mean(precision) >= 0.7, precision
    # and a photo finds titles of its class
    img_hits = idx.search(images=[r.image for r in records[::10]], k=5, target="text")
    agree = np.mean([h.classes == r.classes for r, hits in zip(records[::10], img_hits) for h in hits])
    assert agree >= 0.7, agree


def test_fused_query_and_product_target(flat_index, records):
    idx = Index.open(flat_index)
    r = records[5]
    img, txt = idx.embed_queries(images=[r.image]), idx.embed_queries(texts=[r.name])
    w = idx.fusion_weight
    want = w * img + (1 - w) * txt
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(idx.embed_queries(images=[r.image], texts=[r.name]), want, atol=1e-6)
    fused = idx.search(images=[r.image], texts=[r.name], k=5, target="image")[0]
    assert [h.item for h in fused] == [h.item for h in idx.search_vectors(want, k=5, target="image")[0]]
    products = idx.search(texts=[r.name], k=20, target="product")[0]
    ids = [h.product_id for h in products]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert {h.modality for h in products} <= {"image", "text"}


def test_filter_restricts_to_hierarchy_prefix(flat_index, records):
    idx = Index.open(flat_index)
    hits = idx.search(texts=["Acme black boots"], k=50, target="image", filter="clothing<tops")[0]
    n_tops = sum(r.classes.startswith("clothing<tops<") for r in records)
    assert len(hits) == min(50, n_tops) and all(h.classes.startswith("clothing<tops<") for h in hits)
    with pytest.raises(HuseError, match="matches no class") as e:
        idx.search(texts=["x"], k=5, filter="furniture")
    assert "did you mean" not in str(e.value)
    for typo, meant in (("clothing<top", "clothing<tops"), ("Clothing<Tops", "clothing<tops"), ("Shoes", "shoes"),
                        ("clo", "clothing")):  # the start of a longer name
        with pytest.raises(HuseError, match=f"did you mean '{meant}'\\? top-level classes: "):
            idx.search(texts=["x"], k=5, filter=typo)


def test_text_target_gives_each_product_title_once(tiny_bundle, tiny_catalog, tmp_path):
    """A product's photos share its title, so the text index holds that title once per photo; a search for
    titles lists it once (the best of its rows), and k hits are k titles."""
    from huse.runtime import Classifier

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))[:60]
    for i, r in enumerate(rows):  # products of three photos and one title each
        first = rows[i - i % 3]
        r.update(product_id=f"p{i // 3}", name=first["name"], classes=first["classes"])
    idx = Index.build(tiny_bundle, rows, tmp_path / "idx", images=tiny_catalog.parent, kind="flat", progress=False)
    query = "Acme black boots"
    hits = idx.search(texts=[query], k=8, target="text")[0]
    keys = [(h.product_id, h.name) for h in hits]
    assert len(keys) == 8 == len(set(keys))
    # exact scores of every row's title; the hits are the 8 best distinct (product, title) pairs
    q = idx.embed_queries(texts=[query])[0]
    with Classifier(tiny_bundle, threads=1) as clf:
        scores = clf.embed_text([r["name"] for r in rows]).vectors @ q
    order = np.argsort(-scores, kind="stable")
    assert len({(rows[i]["product_id"], rows[i]["name"]) for i in order[:8]}) < 8  # rows alone repeat titles
    best = {}
    for i in order:
        best.setdefault((rows[i]["product_id"], rows[i]["name"]), float(scores[i]))
    np.testing.assert_allclose([h.score for h in hits], sorted(best.values(), reverse=True)[:8], atol=1e-5)
    assert all(best[key] == pytest.approx(h.score, abs=1e-5) for key, h in zip(keys, hits))
    # under a filter, and for many queries at once, the same rule
    for hits in idx.search(texts=[query, "Birch navy tee"], k=5, target="text", filter="clothing"):
        keys = [(h.product_id, h.name) for h in hits]
        assert len(keys) == 5 == len(set(keys)) and all(h.classes.startswith("clothing<") for h in hits)
    # rows without a product_id: each is a product of its own, and each title is listed once all the same
    rows = [{key: v for key, v in r.items() if key != "product_id"} for r in rows]
    idx = Index.build(tiny_bundle, rows, tmp_path / "idx2", images=tiny_catalog.parent, kind="flat", progress=False)
    names = [h.name for h in idx.search(texts=[query], k=6, target="text")[0]]
    assert len(names) == 6 == len(set(names)) and len(idx.search(texts=[query], k=6, target="product")[0]) == 6


def test_k_larger_than_index(flat_index, records):
    idx = Index.open(flat_index)
    hits = idx.search(texts=["Acme black tee"], k=10_000, target="image")[0]
    assert len(hits) == len(records) and len({h.item for h in hits}) == len(records)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_and_remove_never_returns_a_removed_product(kind, tiny_bundle, tiny_catalog, records, tmp_path):
    first, rest, rows = split_catalog(tiny_catalog, tmp_path)
    idx = Index.build(tiny_bundle, first, tmp_path / "idx", images=tiny_catalog.parent, kind=kind, progress=False)
    assert idx.kind == kind and len(idx) == len(rows[::2])
    r = idx.add(rest, images=tiny_catalog.parent, progress=False)
    assert r["added"] == len(rows[1::2]) and len(idx) == len(rows)
    idx = Index.open(tmp_path / "idx")  # what was written, not the in-memory object
    added = next(x for x in records if x.product_id == rows[1]["product_id"])
    assert idx.search(images=[added.image], k=1)[0][0].product_id == added.product_id

    gone = [rows[0]["product_id"], rows[1]["product_id"], rows[2]["product_id"]]
    out = idx.remove(gone + ["no-such-product"])
    assert out == {"removed": 3, "unknown": ["no-such-product"]}
    idx = Index.open(tmp_path / "idx")
    queries = [x.image for x in records if x.product_id in gone]
    for target in ("image", "text", "product"):
        for hits in idx.search(images=queries, k=len(rows), target=target):
            assert not {h.product_id for h in hits} & set(gone), (kind, target)
            assert len(hits) == len(rows) - 3
    hits = idx.search(images=queries, k=5, target="image", filter="shoes")
    assert all(not {h.product_id for h in hs} & set(gone) for hs in hits)
    assert idx.manifest["counts"]["removed"] == 3 and idx.manifest["counts"]["image"] == len(rows) - 3
    if kind == "hnsw":
        assert idx.manifest["modalities"]["image"]["tombstones"] == 3


def test_adding_products_already_in_the_index_is_refused_unless_replacing(tiny_bundle, tiny_catalog, tmp_path):
    first, _, rows = split_catalog(tiny_catalog, tmp_path)
    idx = Index.build(tiny_bundle, first, tmp_path / "idx", images=tiny_catalog.parent, kind="flat", progress=False)
    def files():  # but the writers' lock file
        return {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir() if p.name != ".lock"}

    before = files()
    with pytest.raises(HuseError, match=r"(?s)\d+ product\(s\) of this catalog are already in the index \(.*--replace"):
        idx.add(first, images=tiny_catalog.parent, progress=False)
    assert files() == before  # refused before any write

    # An update: one product's rows come back with a new title; every other product of the index is untouched.
    product = rows[0]["product_id"]
    updated = [dict(r, name="Zanzibar quilted tote") for r in rows[::2] if r["product_id"] == product]
    write_rows(tmp_path / "update.csv", updated)
    r = Index.open(tmp_path / "idx").add(tmp_path / "update.csv", images=tiny_catalog.parent, progress=False,
                                         replace=True)
    assert r["added"] == r["replaced"] == len(updated)
    idx = Index.open(tmp_path / "idx")
    hits = idx.search(texts=["Zanzibar quilted tote"], k=len(rows), target="image")[0]
    assert [h.product_id for h in hits].count(product) == len(updated)  # once per row, not twice
    assert {h.name for h in hits if h.product_id == product} == {"Zanzibar quilted tote"}
    assert len(hits) == len(rows[::2])
    titles = idx.search(texts=["Zanzibar quilted tote"], k=len(rows), target="text")[0]
    assert [(h.product_id, h.name) for h in titles if h.product_id == product] == [(product, "Zanzibar quilted tote")]

    # A row without product_id cannot be an update (it was added as a new product, again at each run).
    before = files()
    with pytest.raises(HuseError, match=r"updates products by product_id, and 1 row\(s\) of this catalog have none"):
        idx.add([{"image": rows[0]["image"], "name": "Zanzibar tote", "classes": rows[0]["classes"]}],
                images=tiny_catalog.parent, progress=False, replace=True)
    assert files() == before


def test_rows_without_a_product_id_already_in_the_index_are_refused(tiny_bundle, tiny_catalog, tmp_path):
    """A photo folder's catalog (`huse data catalog`: no product_id) written again after new photos came, and
    added: its earlier photos are refused, named by row, not held twice; rows new to the index go in."""
    rows = [{k: r[k] for k in ("image", "name", "classes")} for r in csv.DictReader(open(tiny_catalog, newline=""))]
    write_rows(tmp_path / "first.csv", rows[:20])
    idx = Index.build(tiny_bundle, tmp_path / "first.csv", tmp_path / "idx", images=tiny_catalog.parent,
                      kind="flat", progress=False)
    write_rows(tmp_path / "again.csv", rows[:30])
    with pytest.raises(HuseError, match=r"20 row\(s\) of this catalog have no product_id and are already in the "
                                        r"index \(the same photo file and title\): row 1 \("):
        idx.add(tmp_path / "again.csv", images=tiny_catalog.parent, progress=False)
    assert len(Index.open(tmp_path / "idx")) == 20
    # the same photo under another title, and the new photos, are new rows
    retitled = [dict(rows[0], name="Zanzibar quilted tote")]
    assert idx.add(retitled + rows[20:30], images=tiny_catalog.parent, progress=False)["added"] == 11
    assert len(Index.open(tmp_path / "idx")) == 31


def test_refuses_a_mismatched_bundle(flat_index, tiny_bundle, tmp_path):
    other = _copy(tiny_bundle, tmp_path)
    m = json.loads((other / "manifest.json").read_text())
    m["fusion"]["image_weight"] = 0.123
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(HuseError) as e:
        Index.open(flat_index, bundle=other)
    fp_index = json.loads((flat_index / "manifest.json").read_text())["bundle"]["fingerprint"][:16]
    assert fp_index in str(e.value) and str(other) in str(e.value)


@pytest.mark.parametrize("name", ["image.faiss", "items.jsonl", "items.class.npy"])
def test_refuses_a_tampered_file_naming_it(flat_index, tmp_path, name):
    idx_dir = _copy(flat_index, tmp_path)
    data = bytearray((idx_dir / name).read_bytes())
    data[-3] ^= 0x01
    (idx_dir / name).write_bytes(bytes(data))
    with pytest.raises(HuseError, match=name.replace(".", r"\.")):
        idx = Index.open(idx_dir)  # files are checked when first used: a search that reads them all
        idx.search(texts=["Acme black tee"], k=3, target="image")
        idx.search(texts=["Acme black tee"], k=3, target="image", filter="clothing")


def test_failed_rows_are_excluded_and_listed(tiny_bundle, tiny_catalog, tmp_path):
    rows = list(csv.DictReader(open(tiny_catalog)))[:12]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[0]["image"] = str(tmp_path / "broken.png")
    rows[1]["image"] = str(tmp_path / "missing.png")
    rows[2]["name"] = ""
    rows[3]["image"] = ""
    rows[4]["classes"] = "clothing<<tops"  # took the whole build down (after embedding the rows before it)
    path = tmp_path / "cat.csv"
    write_rows(path, rows)
    idx = Index.build(tiny_bundle, path, tmp_path / "idx", images=tiny_catalog.parent, progress=False)
    excluded = {(e["row"], e["modality"]): e["error"] for e in idx.excluded()}
    assert set(excluded) == {(1, "image"), (2, "image"), (3, "text"), (4, "image"), (5, "image"), (5, "text")}
    assert excluded[5, "text"].startswith("row 5, column classes: class path 'clothing<<tops' is empty or has an")
    assert excluded[3, "text"] == "title is empty"  # was "item 2: ...", its place in a model call
    assert excluded[4, "image"] == "no image"  # not a failed photo: the CLI's warning counts those apart
    assert idx.manifest["counts"]["image"] == 8 and idx.manifest["counts"]["text"] == 10
    hits = idx.search(texts=["Acme black tee"], k=100, target="image")[0]
    assert len(hits) == 8 and not {h.row for h in hits} & {1, 2, 4, 5}
    assert all(np.isfinite(h.score) for h in hits)


_KILLED_ADD = """
import os, sys
from huse.runtime import Index
real, calls = os.replace, [0]
def replace(a, b):  # the process dies at its k-th file replacement, as a kill -9 would leave it
    if calls[0] == int(sys.argv[3]):
        os._exit(9)
    calls[0] += 1
    real(a, b)
os.replace = replace
idx = Index.open(sys.argv[1])
idx.add(sys.argv[2], progress=False, replace=True) if sys.argv[4] == "replace" else idx.remove(["p0-1", "p1-2"])
print(calls[0])
"""


def test_add_and_remove_find_products_whatever_their_ids_hold(tiny_bundle, tmp_path):
    """An add or remove reads product ids off the start of each item's line: quotes, backslashes, other scripts
    and ids that look like JSON are found as they are, and products without an id are never matched."""
    ids = ['say "hi"', "C:\\tee", "tée-1", '{"row": 1}', "p, q"]
    rows = [{"name": f"Acme navy tee {i}", "product_id": pid, "classes": "clothing<tops"} for i, pid in enumerate(ids)]
    idx = Index.build(tiny_bundle, rows + [{"name": "Acme black tee"}], tmp_path / "idx", kind="flat", progress=False)
    with pytest.raises(HuseError, match=r"5 product\(s\) of this catalog are already in the index"):
        idx.add(rows, progress=False)
    assert idx.add(rows[:2], replace=True, progress=False)["replaced"] == 2
    assert idx.remove(ids + [""]) == {"removed": 5, "unknown": [""]}
    assert [it["product_id"] for it in idx.items()] == ids + [None] + ids[:2]


def test_threads_reading_one_index_while_it_grows_see_one_version_at_a_time(tiny_bundle, tiny_catalog, tmp_path):
    """`huse serve` searches on one thread and reads records and photos for the page on others: a search that
    reads the grown manifest again must not leave another thread's read with the item table cached before; and
    a thread searching the very object that adds waits for the add rather than reading its half-made copy."""
    import threading

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))
    write_rows(tmp_path / "first.csv", rows[:40])
    Index.build(tiny_bundle, tmp_path / "first.csv", tmp_path / "idx", images=tiny_catalog.parent, kind="flat",
                progress=False)
    reader, writer = Index.open(tmp_path / "idx"), Index.open(tmp_path / "idx")
    errors, stop = [], threading.Event()

    def read(idx: Index, search: bool):
        rng = np.random.default_rng(int(search))
        while not stop.is_set():
            try:
                if search:
                    idx.records([h.item for h in idx.search(texts=["Acme navy tee"], k=5)[0]])
                else:
                    idx.records([int(rng.integers(len(idx)))])
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=read, args=a) for a in ((reader, True), (reader, False), (reader, False),
                                                                (writer, True))]
    for t in threads:
        t.start()
    try:
        for i in range(40, 120, 5):
            write_rows(tmp_path / "more.csv", rows[i:i + 5])
            writer.add(tmp_path / "more.csv", images=tiny_catalog.parent, progress=False)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and len(reader) == 120
    assert reader.records([119])[119]["product_id"] == rows[119]["product_id"]
    reader.close()
    writer.close()


@pytest.mark.parametrize("op", ["replace", "remove"])
def test_a_kill_at_any_point_of_an_add_or_remove_leaves_the_index_whole(tiny_bundle, tiny_catalog, tmp_path, op):
    """An add or remove replaces a dozen files one by one; killed between two of them, the index held some new files
    and the old manifest, and every later open refused it ("does not match its sha256": rebuild). Killed at each
    replacement in turn, the index now opens and searches as it was before or as it is after, and the next add works."""
    rows = list(csv.DictReader(open(tiny_catalog)))
    write_rows(tmp_path / "update.csv", [{**r, "name": r["name"] + " v2"} for r in rows[:8]])
    idx_dir = tmp_path / "idx"
    Index.build(tiny_bundle, tiny_catalog, idx_dir, kind="flat", progress=False)
    before = Index.open(idx_dir).search(texts=["Acme black tee"], k=5)[0]
    run = lambda k: subprocess.run([sys.executable, "-c", _KILLED_ADD, str(idx_dir), str(tmp_path / "update.csv"),
                                    str(k), op], capture_output=True, text=True, cwd=tiny_catalog.parent)
    shutil.copytree(idx_dir, tmp_path / "pristine")
    total = int(run(-1).stdout)  # replacements in a whole run
    after = Index.open(idx_dir).search(texts=["Acme black tee"], k=5)[0]
    assert total > 8 and [h.name for h in after] != [h.name for h in before] or op == "remove"
    for k in range(total):
        shutil.rmtree(idx_dir)
        shutil.copytree(tmp_path / "pristine", idx_dir)
        assert run(k).returncode == 9
        idx = Index.open(idx_dir)
        for target in ("image", "text", "product"):  # every file read and checked against the manifest
            got = idx.search(texts=["Acme black tee"], k=5, target=target)[0]
        got = [(h.row, h.name) for h in idx.search(texts=["Acme black tee"], k=5)[0]]
        assert got in ([(h.row, h.name) for h in before], [(h.row, h.name) for h in after]), k
        assert run(-1).returncode == 0, k  # the next writer starts from a whole index


def test_without_an_atomic_exchange_a_kill_between_the_two_renames_is_finished_on_open(tiny_bundle, tiny_catalog,
                                                                                       tmp_path, monkeypatch):
    """Where renameat2 is missing (not Linux), the new version takes the index's place in two renames; a kill
    between them leaves no folder at the index's path, and the next open finishes the swap."""
    import ctypes

    from huse.runtime.index import _next_folder

    idx_dir = tmp_path / "idx"
    Index.build(tiny_bundle, tiny_catalog, idx_dir, kind="flat", progress=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: object())  # a C library without renameat2
    assert Index.open(idx_dir).remove(["p0-1"])["removed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # nothing left beside it
    removed = [h.product_id for h in Index.open(idx_dir).search(texts=["Acme black tee"], k=500)[0]]
    os.rename(idx_dir, _next_folder(idx_dir))  # killed after the first rename: the new version waits beside,
    (tmp_path / ".idx.old").mkdir()  # the old one renamed away
    got = [h.product_id for h in Index.open(idx_dir).search(texts=["Acme black tee"], k=500)[0]]
    assert got == removed and "p0-1" not in got
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_choose_kind_by_size_and_memory():
    assert choose_kind(10_000, 512) == "flat"
    assert choose_kind(200_000, 512, "4G") == "ivf"  # not HNSW: cross-modal queries (runtime/index.py)
    assert choose_kind(200_000, 512, "300M") == "ivf"  # 8-bit codes fit where float vectors would not
    with pytest.raises(HuseError, match="max-memory"):
        choose_kind(200_000, 512, "10M")
    assert parse_memory("1.5G") == 3 * 2**29 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory(2**30) == parse_memory("1G") == parse_memory("1073741824")
    for bad in ("0", "-4G", "abc", "G", "inf"):  # a budget of nothing read as "need at least 0 MiB; raise it"
        with pytest.raises(HuseError, match=f"memory budget '{bad}' is not a size"):
            parse_memory(bad)


def test_cli_build_search_info_remove(tiny_bundle, tiny_catalog, records, tmp_path):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    cli = CliRunner()
    r = cli.invoke(main, ["index", "build", str(tiny_bundle), "--data", str(tiny_catalog), "--out", str(tmp_path / "idx")])
    assert r.exit_code == 0, r.output
    q = records[7]
    r = cli.invoke(main, ["search", str(tmp_path / "idx"), "--image", q.image, "-k", "3", "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert out[0]["hits"][0]["product_id"] == q.product_id and len(out[0]["hits"]) == 3
    r = cli.invoke(main, ["search", str(tmp_path / "idx"), "--title", "Acme black tee", "--filter", "bags", "--target", "product"])
    assert r.exit_code == 0 and "bags<handbags<handbags" in r.output and "clothing" not in r.output, r.output
    # --title as `huse classify` names it; --text, its first name, is the same option
    same = cli.invoke(main, ["search", str(tmp_path / "idx"), "--text", "Acme black tee", "--filter", "bags", "--target", "product"])
    assert same.exit_code == 0 and same.output == r.output
    # how many hits: -k, --k as /v1/search names it, --top-k as `huse classify` does
    for flag in ("--k", "--top-k"):
        r = cli.invoke(main, ["search", str(tmp_path / "idx"), "--image", q.image, flag, "2", "--out", str(tmp_path / "k.jsonl")])
        assert r.exit_code == 0, r.output
        assert len(json.loads((tmp_path / "k.jsonl").read_text())["hits"]) == 2
    r = cli.invoke(main, ["index", "remove", str(tmp_path / "idx"), "--product-id", q.product_id])
    assert r.exit_code == 0 and "removed 1 items" in r.output, r.output
    r = cli.invoke(main, ["index", "info", str(tmp_path / "idx")])
    assert r.exit_code == 0 and "1 removed" in r.output and "files verified" in r.output, r.output
    # Many products at once (a day's discontinued ones) from a file, not 40 flags
    (tmp_path / "gone.txt").write_text("\n".join([rec.product_id for rec in records[20:60]] + ["", "never-indexed"]))
    r = cli.invoke(main, ["index", "remove", str(tmp_path / "idx"), "--ids", str(tmp_path / "gone.txt")])
    assert r.exit_code == 0 and "removed 40 items" in r.output and "never-indexed" in r.output, r.output
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe p1")
    r = cli.invoke(main, ["index", "remove", str(tmp_path / "idx"), "--ids", str(tmp_path / "bad.txt")])
    assert r.exit_code == 1 and "bad.txt cannot be read as UTF-8 text" in r.output, r.output
    r = cli.invoke(main, ["index", "remove", str(tmp_path / "idx")])
    assert r.exit_code == 1 and "--product-id ID (repeatable) or --ids FILE" in r.output, r.output
    assert Index.open(tmp_path / "idx").manifest["counts"]["removed"] == 41
    r = cli.invoke(main, ["search", str(tmp_path / "idx")])
    assert r.exit_code == 1 and r.output.startswith("error: search needs"), r.output


def test_search_from_a_fresh_process_never_imports_torch(flat_index, records):
    code = f"""
import sys
from huse.runtime import Index
hits = Index.open({str(flat_index)!r}).search(images=[{records[0].image!r}], texts=["Acme black tee"], k=3, target="product")
assert len(hits[0]) == 3, hits
print(sorted(m for m in ("torch", "huse.train", "huse.export", "onnx") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- signed indexes (issue 12): the bundles' Ed25519 scheme, one copy in runtime/signing.py ---------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography", reason="the [sign] extra (cryptography) is not installed")
    from huse.runtime.signing import write_keypair

    folder = tmp_path_factory.mktemp("keys")
    priv, pub = write_keypair(folder / "release")
    other_priv, other_pub = write_keypair(folder / "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture(scope="module")
def signed_index(tiny_bundle, tiny_catalog, keys, tmp_path_factory) -> Path:
    """A signed bundle and a signed index built with it (the index records the bundle's path)."""
    from huse.runtime.signing import sign_manifest

    folder = tmp_path_factory.mktemp("signed")
    bundle = folder / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    sign_manifest(bundle, keys["priv"])
    Index.build(bundle, tiny_catalog, folder / "idx", kind="flat", progress=False, sign_key=keys["priv"])
    return folder / "idx"


def test_signed_index_opens_with_its_key_and_unsigned_indexes_are_refused(signed_index, flat_index, keys, records):
    assert (signed_index / "manifest.sig").is_file()
    assert "manifest.sig" not in json.loads((signed_index / "manifest.json").read_text())["files"]
    idx = Index.open(signed_index, trusted_keys=[keys["pub"]])
    assert idx.search(images=[records[3].image], k=1)[0][0].row == records[3].row
    assert Index.open(signed_index).search(images=[records[3].image], k=1)[0][0].row == records[3].row  # no keys: as before
    with pytest.raises(HuseError, match=r"index manifest\.json is not signed .*huse index build .*--sign KEY"):
        Index.open(flat_index, trusted_keys=[keys["pub"]])
    with pytest.raises(HuseError, match=r"signed by key \w+, which is not among the trusted keys"):
        Index.open(signed_index, trusted_keys=[keys["other_pub"]])


@pytest.mark.parametrize("attack", ["relabel-manifest", "rehash-tampered-file", "drop-signature"])
def test_signed_index_refuses_tampering(signed_index, keys, tmp_path, attack):
    idx_dir = _copy(signed_index, tmp_path)
    m = json.loads((idx_dir / "manifest.json").read_text())
    if attack == "relabel-manifest":
        m["classes"][0] = "clothing<tops<sweaters"
        (idx_dir / "manifest.json").write_text(json.dumps(m, indent=2))
    elif attack == "rehash-tampered-file":  # change a file and its listed sha256: only the signature catches it
        from huse.runtime.files import sha256_file

        (idx_dir / "items.jsonl").write_text((idx_dir / "items.jsonl").read_text().replace("Acme", "Evil"))
        m["files"]["items.jsonl"] = sha256_file(idx_dir / "items.jsonl")
        (idx_dir / "manifest.json").write_text(json.dumps(m, indent=2))
    else:
        (idx_dir / "manifest.sig").unlink()
    want = r"is not signed" if attack == "drop-signature" else r"bad signature: index manifest\.json was changed"
    with pytest.raises(HuseError, match=want):
        Index.open(idx_dir, trusted_keys=[keys["pub"]])


def test_trusted_index_opens_its_bundle_with_the_same_keys(tiny_bundle, tiny_catalog, keys, records, tmp_path):
    # A signed index of an unsigned bundle: the index verifies, the bundle does not.
    idx = Index.build(tiny_bundle, tiny_catalog, tmp_path / "idx", kind="flat", progress=False, sign_key=keys["priv"])
    idx.close()
    idx = Index.open(tmp_path / "idx", trusted_keys=[keys["pub"]])
    q = np.asarray(idx._vectors_of("image")[3])[None]  # vector queries need no bundle
    assert idx.search_vectors(q, k=1)[0][0].row == records[3].row
    with pytest.raises(HuseError, match=rf"{tiny_bundle}: manifest\.json is not signed"):
        idx.search(texts=["Acme black tee"], k=1)


def test_add_and_remove_resign_or_drop_the_stale_signature(signed_index, keys, records, tiny_catalog, tmp_path):
    idx_dir = _copy(signed_index, tmp_path)
    bundle = signed_index.parent / "bundle"
    gone = records[0].product_id
    r = Index.open(idx_dir, bundle=bundle, trusted_keys=[keys["pub"]]).remove([gone], sign_key=keys["priv"])
    assert r["removed"] == 1
    idx = Index.open(idx_dir, bundle=bundle, trusted_keys=[keys["pub"]])  # re-signed: still trusted
    assert gone not in {h.product_id for h in idx.search(images=[records[0].image], k=5)[0]}
    sig = json.loads((idx_dir / "manifest.sig").read_text())
    assert len(sig["signatures"]) == 1  # only the current manifest's signature is kept

    Index.open(idx_dir, bundle=bundle).remove([records[1].product_id])  # no key: the signature is dropped
    assert not (idx_dir / "manifest.sig").exists()
    with pytest.raises(HuseError, match="is not signed"):
        Index.open(idx_dir, trusted_keys=[keys["pub"]])
    Index.open(idx_dir, bundle=bundle).add(tiny_catalog, progress=False, sign_key=keys["priv"],  # re-signed by add
                                           replace=True)
    assert len(Index.open(idx_dir, trusted_keys=[keys["pub"]])) == 2 * len(records)


def test_cli_signed_index_and_trusted_search(signed_index, tiny_bundle, tiny_catalog, keys, records, tmp_path):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    cli = CliRunner()
    bundle = signed_index.parent / "bundle"
    r = cli.invoke(main, ["index", "build", str(bundle), "--data", str(tiny_catalog), "--out", str(tmp_path / "idx"),
                          "--kind", "flat", "--sign", str(keys["priv"])])
    assert r.exit_code == 0, r.output
    q = records[9]
    r = cli.invoke(main, ["search", str(tmp_path / "idx"), "--image", q.image, "-k", "1", "--trusted-key", str(keys["pub"])])
    assert r.exit_code == 0 and f"row {q.row}" in r.output, r.output
    r = cli.invoke(main, ["search", str(tmp_path / "idx"), "--text", "tee", "--trusted-key", str(keys["other_pub"])])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "not among the trusted keys" in r.output, r.output
    assert r.output.count("\n") == 1  # one line, no traceback
    r = cli.invoke(main, ["index", "remove", str(tmp_path / "idx"), "--product-id", q.product_id])
    assert r.exit_code == 0, r.output
    r = cli.invoke(main, ["search", str(tmp_path / "idx"), "--text", "tee", "--trusted-key", str(keys["pub"])])
    assert r.exit_code == 1 and "is not signed" in r.output, r.output
    r = cli.invoke(main, ["index", "build", str(bundle), "--data", str(tiny_catalog), "--out", str(tmp_path / "x"),
                          "--sign", str(tmp_path / "missing.key")])
    assert r.exit_code == 1 and "signing key" in r.output and not (tmp_path / "x").exists(), r.output


# --- fresh-process search: each index file version is hashed once (runtime/stamps.py) ---------------------
@pytest.fixture
def stamps(tmp_path, monkeypatch):
    """A private stamp folder; files are stamped however young (RACY_SECONDS 0), and a hash counter."""
    import huse.runtime.stamps as stamps_mod

    monkeypatch.setenv("HUSE_CACHE_DIR", str(tmp_path / "stamps"))
    monkeypatch.delenv("HUSE_VERIFY_CACHE", raising=False)
    monkeypatch.setattr(stamps_mod, "RACY_SECONDS", 0.0)
    hashed: list[str] = []
    real = stamps_mod.sha256_file
    monkeypatch.setattr(stamps_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    return hashed


def test_fresh_opens_hash_each_file_once_and_a_changed_file_again(flat_index, records, tmp_path, stamps):
    idx_dir = _copy(flat_index, tmp_path)
    query = dict(images=[records[3].image], k=3, target="image")
    assert Index.open(idx_dir).search(**query)[0][0].row == records[3].row
    assert "image.faiss" in stamps and "items.jsonl" in stamps
    stamps.clear()
    assert Index.open(idx_dir).search(**query)[0][0].row == records[3].row  # a new process would do the same
    assert stamps == []  # only stat()s: nothing hashed
    # Same size, mtime set back: the ctime still moves, so the file is hashed again and refused.
    path = idx_dir / "image.faiss"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(HuseError, match=r"image\.faiss does not match its sha256"):
        Index.open(idx_dir).search(**query)
    assert stamps == ["image.faiss"]


def test_stamps_are_off_when_asked_or_when_others_could_write_them(flat_index, tmp_path, stamps, monkeypatch):
    from huse.runtime.stamps import stamp_dir

    assert stamp_dir() == tmp_path / "stamps"
    idx = Index.open(flat_index)
    stamps.clear()
    assert idx.verify_all() == len(idx.manifest["files"]) and sorted(stamps) == sorted(idx.manifest["files"])  # explicit: all hashed
    monkeypatch.setenv("HUSE_VERIFY_CACHE", "0")
    assert stamp_dir() is None
    monkeypatch.delenv("HUSE_VERIFY_CACHE")
    (tmp_path / "stamps").chmod(0o777)
    assert stamp_dir() is None  # a folder others may write: stamps could be planted, so none are used
    stamps.clear()
    Index.open(flat_index).search(texts=["Acme black tee"], k=1)
    Index.open(flat_index).search(texts=["Acme black tee"], k=1)
    assert stamps.count("image.faiss") == 2


def test_hits_name_their_photos_from_any_folder_and_after_a_move(tiny_bundle, tiny_catalog, records, tmp_path,
                                                                  monkeypatch):
    """A catalog named by a relative path: the index keeps each photo relative to itself, so a hit's
    image is a file whatever the working directory, and still one when catalog and index move together."""
    project = tmp_path / "project"
    shutil.copytree(tiny_catalog.parent, project / "catalog")
    monkeypatch.chdir(project)
    Index.build(tiny_bundle, Path("catalog") / tiny_catalog.name, "idx", kind="flat", progress=False)
    stored = json.loads((project / "idx" / "items.jsonl").read_text().splitlines()[0])["image"]
    assert not os.path.isabs(stored) and stored.startswith(os.path.join("..", "catalog"))

    shutil.move(project, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    hits = Index.open(tmp_path / "moved" / "idx").search(texts=["Acme black boots"], k=5)[0]
    assert len(hits) == 5 and all(os.path.isabs(h.image) and os.path.isfile(h.image) for h in hits)
    assert all(h.image.startswith(str(tmp_path / "moved" / "catalog")) for h in hits)


def test_a_bad_query_in_a_batch_fails_alone(flat_index, records, tmp_path):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    idx = Index.open(flat_index)
    good = records[3]
    found = idx.search_batch(texts=[good.name, "", None], images=[None, None, str(tmp_path / "gone.png")], k=3)
    assert [h.item for h in found.hits[0]] == [h.item for h in idx.search(texts=[good.name], k=3)[0]]
    assert found.hits[1] == found.hits[2] == [] and sorted(found.errors) == [1, 2]
    assert "title" in found.errors[1] and "gone.png does not exist" in found.errors[2]
    with pytest.raises(HuseError, match=r"query 1 has no usable image or text .*; 2 of 3 queries failed \(search_batch answers the others"):
        idx.search(texts=[good.name, "", None], images=[None, None, str(tmp_path / "gone.png")], k=3)
    with pytest.raises(HuseError, match="k must be a positive integer"):  # a bad argument is still the whole call's
        idx.search_batch(texts=[""], k=0)
    for k in (2.5, "3", True):  # a TypeError from deep inside before
        with pytest.raises(HuseError, match="k must be a positive integer"):
            idx.search(texts=[good.name], k=k)
    # A lone title was searched as one query per character (5 result lists for "dress").
    with pytest.raises(HuseError, match=r"texts= takes a list .* pass \[text\]"):
        idx.search(texts=good.name)
    with pytest.raises(HuseError, match=r"images= takes a list .* pass \[image\]"):
        idx.search_batch(images=str(tmp_path / "q.png"))

    # `huse search --batch`: the bad rows get an `error` line, the others their hits; all bad: exit 1.
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"name": good.name}) + "\n" + json.dumps({"image": "gone.png"}) + "\n"
                       + json.dumps({"name": 5}) + "\n")
    r = CliRunner().invoke(main, ["search", str(flat_index), "--batch", str(queries), "-k", "3",
                                  "--out", str(tmp_path / "hits.jsonl")])
    assert r.exit_code == 0 and "3 queries -> " in r.output and "2 failed" in r.output, r.output
    lines = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    assert [h["item"] for h in lines[0]["hits"]] == [h.item for h in found.hits[0]]
    assert "gone.png does not exist" in lines[1]["error"] and lines[2]["error"].startswith("row 3, column name")
    queries.write_text(json.dumps({"image": "gone.png"}) + "\n")
    r = CliRunner().invoke(main, ["search", str(flat_index), "--batch", str(queries)])
    assert r.exit_code == 1 and "row 1: no usable image or text" in r.output and "all 1 queries failed" in r.output


def test_search_batch_reads_and_answers_its_queries_a_chunk_at_a_time(flat_index, tiny_catalog, tmp_path,
                                                                     monkeypatch):
    """`huse search --batch` decoded every photo of the file and held every hit before writing one (~70 KB a
    query: 1.8 GB of memory at 20,000 queries). Now a chunk at a time, with the same lines out."""
    from click.testing import CliRunner

    from huse.runtime import cli

    rows = list(csv.DictReader(open(tiny_catalog)))[:7]
    rows[3]["image"] = "gone.png"  # searched by its title
    rows[4] = rows[5] = {"name": "", "image": ""}  # with chunks of 2, a chunk with no query to search
    write_rows(tmp_path / "q.csv", rows)
    args = ["search", str(flat_index), "--batch", str(tmp_path / "q.csv"), "-k", "3", "--out"]
    r = CliRunner().invoke(cli.main, [*args, str(tmp_path / "whole.jsonl")])
    assert r.exit_code == 0 and "7 queries -> " in r.output and "2 failed" in r.output, r.output
    monkeypatch.setattr(cli, "SEARCH_CHUNK", 2)
    r = CliRunner().invoke(cli.main, [*args, str(tmp_path / "chunks.jsonl")])
    assert r.exit_code == 0 and "7 queries -> " in r.output and "6 queries searched" in r.output, r.output
    assert (tmp_path / "chunks.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


def test_search_batch_into_a_csv_gives_a_row_per_hit(flat_index, tiny_catalog, tmp_path):
    """`--out hits.csv`: the JSONL answers as a spreadsheet, a row per hit; a failed query is one row with its error.
    Only an earlier hits CSV is replaced."""
    from click.testing import CliRunner

    from huse.runtime.cli import main

    rows = list(csv.DictReader(open(tiny_catalog)))[:4]
    rows[2] = {"name": "", "image": "gone.png"}  # fails: the photo is missing and there is no title
    rows[3]["name"] = '=HYPERLINK("http://example.com", "Acme")'  # a spreadsheet would run it as a formula
    write_rows(tmp_path / "q.csv", rows)
    args = ["search", str(flat_index), "--batch", str(tmp_path / "q.csv"), "-k", "3", "--out"]
    for name in ("h.jsonl", "h.csv"):
        r = CliRunner().invoke(main, [*args, str(tmp_path / name)])
        assert r.exit_code == 0 and "4 queries -> " in r.output and "1 failed" in r.output, r.output
    answers = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert (tmp_path / "h.csv").read_bytes().startswith(b"\xef\xbb\xbfquery,text,image,rank,score,product_id,")
    cells = list(csv.DictReader(open(tmp_path / "h.csv", encoding="utf-8-sig", newline="")))
    assert len(cells) == 3 + 3 + 1 + 3
    for a in answers:
        mine = [c for c in cells if c["query"] == a["query"]]
        if "error" in a:
            assert len(mine) == 1 and mine[0]["error"] == a["error"] and mine[0]["rank"] == ""
            continue
        assert [int(c["rank"]) for c in mine] == [1, 2, 3] and all(from_sheet_cell(c["text"]) == a["text"] for c in mine)
        assert all(c["text"] == ("'" if a["text"].startswith("=") else "") + a["text"] for c in mine)  # text, not a formula
        assert [(int(c["item"]), float(c["score"]), c["product_id"], c["hit_image"], c["classes"]) for c in mine] == [
            (h["item"], h["score"], h["product_id"], h["image"], h["classes"]) for h in a["hits"]]
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("sku,price\nA1,9.99\n")
    r = CliRunner().invoke(main, [*args, str(sheet)])
    assert r.exit_code == 1 and "exists and is not hits of huse search" in r.output, r.output
    assert sheet.read_text() == "sku,price\nA1,9.99\n"


def test_index_build_and_add_warn_when_most_photos_fail(tiny_bundle, tiny_catalog, tmp_path):
    """A wrong --images leaves every photo out: the index is still written (titles work), with a warning."""
    from click.testing import CliRunner

    from huse.runtime.cli import main

    cli = CliRunner()
    args = ["--data", str(tiny_catalog), "--images", str(tmp_path)]
    r = cli.invoke(main, ["index", "build", str(tiny_bundle), *args, "--out", str(tmp_path / "idx"), "--kind", "flat"])
    assert r.exit_code == 0 and "warning: the image of 120 of 120 rows could not be used (first: row 1: " in r.output
    assert "is --images right?" in r.output and len(Index.open(tmp_path / "idx")) == 120, r.output
    r = cli.invoke(main, ["index", "add", str(tmp_path / "idx"), *args, "--replace"])
    assert r.exit_code == 0 and "warning: the image of 120 of 120 rows" in r.output, r.output
    r = cli.invoke(main, ["index", "build", str(tiny_bundle), "--data", str(tiny_catalog), "--out", str(tmp_path / "ok"),
                          "--no-progress"])
    assert r.exit_code == 0 and "warning" not in r.output and "embedding products" not in r.output, r.output


def test_one_writer_at_a_time_and_each_starts_from_what_the_last_left(tiny_bundle, tiny_catalog, tmp_path):
    import fcntl

    first, rest, rows = split_catalog(tiny_catalog, tmp_path)
    Index.build(tiny_bundle, first, tmp_path / "idx", images=tiny_catalog.parent, kind="flat", progress=False)
    a, b = Index.open(tmp_path / "idx"), Index.open(tmp_path / "idx")  # two processes' views
    with open(tmp_path / "idx" / ".lock", "a") as held:  # another writer at work
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(HuseError, match="is being changed by another process"):
            a.add(rest, images=tiny_catalog.parent, progress=False)
        with pytest.raises(HuseError, match="is being changed by another process"):
            a.remove([rows[0]["product_id"]])
    a.add(rest, images=tiny_catalog.parent, progress=False)
    assert b.remove([rows[0]["product_id"]])["removed"] == 1  # b read the index before a's add...
    idx = Index.open(tmp_path / "idx")  # ...and kept it: nothing a added was lost
    assert len(idx) == len(rows) and idx.manifest["counts"]["removed"] == 1
    assert idx.verify_all() == len(idx.manifest["files"]) and ".lock" not in idx.manifest["files"]


def test_overwrite_replaces_an_index_and_never_another_folder(tiny_bundle, tiny_catalog, tmp_path):
    data = tmp_path / "data"  # `--out data --overwrite` for `--out data/index --overwrite`
    data.mkdir()
    (data / "catalog.csv").write_text("image,name\n")
    with pytest.raises(HuseError, match="is not a huse index, so --overwrite will not delete it"):
        Index.build(tiny_bundle, tiny_catalog, data, kind="flat", progress=False, overwrite=True)
    assert (data / "catalog.csv").read_text() == "image,name\n"
    Index.build(tiny_bundle, tiny_catalog, data / "index", kind="flat", progress=False)
    assert len(Index.build(tiny_bundle, tiny_catalog, data / "index", kind="flat", progress=False, overwrite=True)) == 120


def test_search_out_replaces_only_earlier_hits(flat_index, tmp_path):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"name": "Acme black boots"}) + "\n")
    catalog = tmp_path / "products.jsonl"
    catalog.write_text(json.dumps({"image": "a.png", "name": "Acme tee"}) + "\n")
    # a name promising another format: refused before any search (hits.parquet held JSON Lines)
    for out, says in ((queries, "is the --batch file"), (catalog, "exists and is not hits of huse search"),
                      (tmp_path / "hits.parquet", "huse search writes JSON Lines"),
                      (tmp_path / "hits.xlsx", f"give --out {tmp_path / 'hits.jsonl'} or {tmp_path / 'hits.csv'}")):
        r = CliRunner().invoke(main, ["search", str(flat_index), "--batch", str(queries), "--out", str(out)])
        assert r.exit_code == 1 and says in r.output, r.output
    assert not (tmp_path / "hits.parquet").exists() and not (tmp_path / "hits.xlsx").exists()
    assert catalog.read_text() == json.dumps({"image": "a.png", "name": "Acme tee"}) + "\n"
    assert queries.read_text() == json.dumps({"name": "Acme black boots"}) + "\n"
    for _ in range(2):  # its own hits are replaced by the next search
        r = CliRunner().invoke(main, ["search", str(flat_index), "--batch", str(queries), "--out", str(tmp_path / "h.jsonl")])
        assert r.exit_code == 0 and "1 queries -> " in r.output, r.output


def test_an_index_and_a_bundle_given_for_each_other_are_named(flat_index, tiny_bundle):
    from huse.runtime import Classifier

    with pytest.raises(HuseError, match=rf"{flat_index} is a huse index, not a bundle; give the bundle it was built with"):
        Classifier(flat_index)
    with pytest.raises(HuseError, match=rf"{tiny_bundle} is a huse bundle, not an index; build an index with it"):
        Index.open(tiny_bundle)


def test_an_index_of_photos_held_in_parquet_finds_what_one_of_paths_does(tiny_bundle, tiny_catalog, flat_index,
                                                                         tmp_path):
    pytest.importorskip("pyarrow.parquet")
    from tests.models.make_data import photos_in_parquet

    held = Index.build(tiny_bundle, photos_in_parquet(tiny_catalog, tmp_path / "held.parquet", "binary"),
                       tmp_path / "idx", kind="flat", progress=False)
    paths = Index.open(flat_index)
    photo = str(tiny_catalog.parent / "images" / sorted(p.name for p in (tiny_catalog.parent / "images").iterdir())[0])
    for query in (dict(texts=["Acme navy tee"]), dict(images=[photo]), dict(images=[photo], space="visual")):
        a, b = paths.search(k=5, **query)[0], held.search(k=5, **query)[0]
        assert [(h.row, h.score) for h in a] == [(h.row, h.score) for h in b]
        assert all(h.image is None for h in b) and all(h.image for h in a)  # no file to name for a held photo

    # The held photos as a --batch of queries: the same hits as their files.
    from click.testing import CliRunner

    from huse.runtime.cli import main

    for name, queries in (("paths", tiny_catalog), ("held", tmp_path / "held.parquet")):
        r = CliRunner().invoke(main, ["search", str(flat_index), "--batch", str(queries), "-k", "3", "--out",
                                      str(tmp_path / f"{name}.jsonl")])
        assert r.exit_code == 0, r.output
    hits = [[json.loads(line)["hits"] for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in ("paths", "held")]
    assert hits[0] == hits[1] and len(hits[0]) == 120


def test_the_index_keeps_the_photos_a_catalog_held_as_bytes(tiny_bundle, tiny_catalog, tmp_path):
    """A Parquet catalog's photos have no file to name, so the index keeps them: `photo(item)` gives each one
    back as the catalog held it, across an add, and the sha256 rule covers them."""
    pytest.importorskip("pyarrow.parquet")
    from click.testing import CliRunner

    from huse.runtime.cli import main
    from tests.models.make_data import photos_in_parquet

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))
    photos = [(tiny_catalog.parent / r["image"]).read_bytes() for r in rows]
    r = CliRunner().invoke(main, ["index", "build", str(tiny_bundle), "--data", str(
        photos_in_parquet(tiny_catalog, tmp_path / "held.parquet")), "--out", str(tmp_path / "idx"), "--no-progress"])
    assert r.exit_code == 0 and "photos kept in the index" in r.output, r.output
    idx = Index.open(tmp_path / "idx")
    assert idx.holds_photos and [idx.photo(i) for i in range(len(idx))] == photos
    assert idx.info()["photo_bytes"] == sum(map(len, photos))

    # an add with photos as bytes and one without any: the new items' photos, none for the photoless one
    new = [{"image": photos[0], "name": "Acme navy tee, again", "classes": rows[0]["classes"], "product_id": "new-1"},
           {"image": None, "name": "Acme navy tee, no photo", "classes": rows[0]["classes"], "product_id": "new-2"}]
    idx.add(new, progress=False)
    assert idx.photo(len(rows)) == photos[0] and idx.photo(len(rows) + 1) is None
    assert [idx.photo(i) for i in range(len(rows))] == photos  # the earlier ones are still found
    with pytest.raises(HuseError, match="item 999 is not in the index"):
        idx.photo(999)

    # keep_photos=False: embedded the same, nothing kept
    bare = Index.build(tiny_bundle, tmp_path / "held.parquet", tmp_path / "bare", keep_photos=False, progress=False)
    assert not bare.holds_photos and bare.photo(0) is None and not list((tmp_path / "bare").glob("photos*"))
    assert np.array_equal(bare._vectors_of("image"), Index.open(tmp_path / "idx")._vectors_of("image")[:len(rows)])

    # a kept photo changed on disk is refused, as every file of the index is, and a later add (which keeps the
    # digest a photos file was listed with, never hashing it again) does not list the changed copy as good
    kept = tmp_path / "idx" / "photos.0.bin"
    data = bytearray(kept.read_bytes())
    data[100] ^= 1
    kept.write_bytes(bytes(data))
    Index.open(tmp_path / "idx").add([dict(new[1], product_id="new-3")], progress=False)
    with pytest.raises(HuseError, match="photos.0.bin does not match its sha256"):
        Index.open(tmp_path / "idx").photo(3)


def test_a_catalog_too_large_for_the_memory_is_said_before_the_embedding(tiny_bundle, tiny_catalog, tmp_path,
                                                                          monkeypatch, capsys):
    from huse.runtime import index as index_module

    monkeypatch.setattr(index_module, "_available_memory", lambda: index_module._build_bytes(120) - 1)
    Index.build(tiny_bundle, tiny_catalog, tmp_path / "a", kind="flat", progress=False)  # a warning, not a refusal
    assert "building an index of 120 products needs about 1.5 GiB of memory" in capsys.readouterr().err
    monkeypatch.setattr(index_module, "_available_memory", lambda: index_module._build_bytes(120))
    Index.build(tiny_bundle, tiny_catalog, tmp_path / "b", kind="flat", progress=False)
    assert "warning" not in capsys.readouterr().err
    assert index_module._available_memory() is None or index_module._available_memory() > 2**20  # this machine's


def test_a_disk_without_room_for_the_vectors_is_said_before_the_embedding(tiny_bundle, tiny_catalog, tmp_path,
                                                                          monkeypatch):
    """The vectors are written to memory-mapped files as they are embedded; on a full disk such a write kills the
    process (SIGBUS) hours in. So the room is checked first, and nothing is left behind."""
    import shutil

    from huse.runtime import index as index_module

    real = shutil.disk_usage
    monkeypatch.setattr(index_module.shutil, "disk_usage", lambda p: real(p)._replace(free=120 * 160 * 4 - 1))
    monkeypatch.setattr(index_module, "_embed", lambda *a, **k: pytest.fail("embedding started"))
    with pytest.raises(HuseError, match=r"vectors of 120 products need 0\.0 GiB on the disk of .*free some space"):
        Index.build(tiny_bundle, tiny_catalog, tmp_path / "a", kind="flat", progress=False)
    assert list(tmp_path.iterdir()) == []  # no index, no scratch folder

    # An add or remove keeps both versions of the files it rewrites until it is done (a kill leaves the old whole)
    monkeypatch.undo()
    Index.build(tiny_bundle, tiny_catalog, tmp_path / "a", kind="flat", progress=False)
    files = {p.name: p.stat().st_size for p in (tmp_path / "a").iterdir()}
    rewritten = sum(v for k, v in files.items() if k.endswith(".faiss") or k.startswith("items."))
    monkeypatch.setattr(index_module.shutil, "disk_usage", lambda p: real(p)._replace(free=rewritten - 1))
    with pytest.raises(HuseError, match=r"writes new versions of its files, 0\.0 GiB, beside the old ones"):
        Index.open(tmp_path / "a").remove(["p0-1"])
    monkeypatch.setattr(index_module.shutil, "disk_usage", lambda p: real(p)._replace(free=rewritten))
    assert Index.open(tmp_path / "a").remove(["p0-1"])["removed"] == 1
    assert {p.name for p in (tmp_path / "a").iterdir()} == set(files) | {".lock"}  # the lock file writers share


def test_an_add_streams_its_catalog_into_the_grown_vector_files(tiny_bundle, flat_index, tmp_path, monkeypatch):
    """`add` read its whole catalog and embedded it into arrays in memory (a million new products: 5 GB at 512-d)
    before appending them; now a catalog file is streamed into the grown, memory-mapped vector files, as `build`
    does. The embedding is replaced by random vectors (the plumbing is what is measured); numpy's and Python's
    allocations are traced."""
    import tracemalloc

    from huse.runtime import index as index_module

    n = 40_000
    with open(tmp_path / "more.csv", "w") as f:
        f.write("name\n" + "".join(f"product {i}\n" for i in range(n)))
    rng = np.random.default_rng(0)

    def embed(clf, records, vecs, start, total, progress, excluded, keep=None):
        s = 0
        for chunk in index_module._chunks(records, 256):
            for v in vecs.values():
                x = rng.standard_normal((len(chunk), v.shape[1]), dtype=np.float32)
                v[s:s + len(chunk)] = x / np.linalg.norm(x, axis=1, keepdims=True)
            if keep is not None:
                keep(chunk)
            s += len(chunk)
    monkeypatch.setattr(index_module, "_embed", embed)
    monkeypatch.setattr(index_module, "EXACT_ROWS", 2000)  # blocks of the FAISS add and the copies
    shutil.copytree(flat_index, tmp_path / "idx")
    idx = Index.open(tmp_path / "idx")
    idx.search(texts=["warm up"], k=1)  # the embedder and FAISS loaded before tracing
    new_bytes = n * sum(idx._width(m) for m in idx._indexes()) * 4
    tracemalloc.start()
    try:
        r = idx.add(tmp_path / "more.csv", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r["added"] == r["text"] == n and len(Index.open(tmp_path / "idx")) == 120 + n
    assert peak < new_bytes / 3, f"peak {peak / 2**20:.1f} MiB; the new vectors are {new_bytes / 2**20:.1f} MiB"


@pytest.mark.parametrize("rows", [100, 140])
def test_a_catalog_that_changes_between_its_count_and_its_reading_is_refused(rows, tiny_bundle, tiny_catalog,
                                                                            records, tmp_path, monkeypatch):
    """A catalog file is counted first (the vector files are made that size), then read: rows appended or cut in
    between would leave rows of zeros indexed as products, or no room for the new ones."""
    from huse.runtime import index as index_module

    more = (records * 2)[:rows]
    monkeypatch.setattr(index_module, "_catalog", lambda *a, **k: (iter(more), len(records)))
    with pytest.raises(HuseError, match=r"had 120 rows when it was counted .* changed during the build"):
        Index.build(tiny_bundle, tiny_catalog, tmp_path / "a", kind="flat", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_products_given_as_dicts_index_as_their_catalog_does(tiny_bundle, tiny_catalog, flat_index, tmp_path):
    """What a Python user passes: dicts with the catalog's columns (a list of dicts raised AttributeError)."""
    import csv

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))
    idx = Index.build(tiny_bundle, rows, tmp_path / "idx", images=tiny_catalog.parent, kind="flat", progress=False)
    want = Index.open(flat_index).search(texts=["Acme navy tee"], k=5)[0]
    assert [(h.row, h.product_id, h.score) for h in idx.search(texts=["Acme navy tee"], k=5)[0]] == \
        [(h.row, h.product_id, h.score) for h in want]
    with pytest.raises(HuseError, match=r"product 0: column 'title' is not one huse reads; did you mean 'name'"):
        idx.add([{"image": rows[0]["image"], "title": "x"}], images=tiny_catalog.parent, progress=False)
    with pytest.raises(HuseError, match="product 1 is a str; give a dict with columns"):
        idx.add([{"name": "new tee", "product_id": "n1"}, "new shirt"], progress=False)
    assert idx.add([{"name": "New tee", "classes": rows[0]["classes"], "product_id": "n1"}], progress=False)["added"] == 1


def test_an_index_from_huse_embed_output(tiny_bundle, tiny_catalog, flat_index, tmp_path):
    """`huse embed` per modality, then Index.from_embeddings on what read_embeddings returns (dicts: they
    raised AttributeError): the hits of an index built in one go."""
    from huse.runtime.bulk import BulkJob, read_embeddings, run_bulk

    vectors = {}
    for mode in ("image", "text"):
        run_bulk(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / mode), task="embed",
                         mode=mode, progress=False))
        vectors[mode], meta = read_embeddings(tmp_path / mode)
    idx = Index.from_embeddings(tiny_bundle, meta, vectors, tmp_path / "idx", kind="flat", progress=False)
    want = Index.open(flat_index).search(texts=["Acme navy tee"], k=5)[0]
    got = idx.search(texts=["Acme navy tee"], k=5)[0]
    assert [(h.row, h.product_id, h.name) for h in got] == [(h.row, h.product_id, h.name) for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)


def test_an_index_from_huse_embed_mode_index_is_the_index_build_writes(tiny_bundle, tiny_catalog, tmp_path):
    """Catalog teams embed on a Ray cluster (resumable), then build the index: `huse embed --mode index` and
    `huse index build --embeddings` give the files `huse index build --data` writes from the same catalog, bad
    rows and their reasons included, reading a shard at a time (shards of 25 rows here)."""
    from click.testing import CliRunner

    from huse.runtime.bulk import BulkJob, run_bulk
    from huse.runtime.cli import main

    rows = list(csv.DictReader(open(tiny_catalog)))[:60]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[0]["image"] = str(tmp_path / "broken.png")  # a photo that fails: indexed by its title only
    rows[2]["name"] = ""  # by its photo only
    rows[3]["image"] = ""
    rows[4]["classes"] = "a<<b"  # the catalog's own error: neither
    rows[30].update(image="", name="")
    write_rows(tmp_path / "cat.csv", rows)
    job = BulkJob(bundle=str(tiny_bundle), data=str(tmp_path / "cat.csv"), out=str(tmp_path / "emb"), task="embed",
                  mode="index", images=str(tiny_catalog.parent), shard_rows=25, progress=False)
    res = run_bulk(job)
    assert (res.rows, res.errors, res.warnings) == (60, 2, 1)
    cli = CliRunner()
    r = cli.invoke(main, ["index", "build", str(tiny_bundle), "--embeddings", str(tmp_path / "emb"),
                          "--out", str(tmp_path / "a"), "--kind", "flat", "--no-progress"])
    assert r.exit_code == 0, r.output
    Index.build(tiny_bundle, tmp_path / "cat.csv", tmp_path / "b", images=tiny_catalog.parent, kind="flat",
                progress=False)
    for f in ("items.jsonl", "excluded.jsonl", "image.vectors.npy", "text.vectors.npy", "visual.vectors.npy",
              "visual.centre.npy", "items.mods.npy", "items.class.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    a = Index.open(tmp_path / "a")
    assert {(e["row"], e["modality"]) for e in a.excluded()} == {
        (1, "image"), (3, "text"), (4, "image"), (5, "image"), (5, "text"), (31, "image"), (31, "text")}
    assert [h.row for h in a.search(texts=["Acme black tee"], k=5)[0]] == \
        [h.row for h in Index.open(tmp_path / "b").search(texts=["Acme black tee"], k=5)[0]]

    # An add from embeddings is the add of the catalog (here its last 20 rows, with new product ids)
    write_rows(tmp_path / "more.csv", [{**r, "product_id": f"more-{i}"} for i, r in enumerate(rows[40:])])
    run_bulk(replace(job, data=str(tmp_path / "more.csv"), out=str(tmp_path / "more")))
    r = cli.invoke(main, ["index", "add", str(tmp_path / "a"), "--embeddings", str(tmp_path / "more"), "--no-progress"])
    assert r.exit_code == 0 and "added 20 items" in r.output, r.output
    Index.open(tmp_path / "b").add(tmp_path / "more.csv", images=tiny_catalog.parent, progress=False)
    for f in ("items.jsonl", "excluded.jsonl", "image.vectors.npy", "text.vectors.npy", "visual.vectors.npy",
              "items.mods.npy", "items.product.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with pytest.raises(HuseError, match="already in the index"):  # the rules of add hold
        Index.open(tmp_path / "a").add_embed_output(tmp_path / "more", progress=False)
    shutil.copytree(tmp_path / "more", tmp_path / "int8")  # as `huse embed --precision int8-cpu` would say
    m = json.loads((tmp_path / "int8" / "_manifest.json").read_text())
    (tmp_path / "int8" / "_manifest.json").write_text(json.dumps({**m, "settings": {**m["settings"],
                                                                                     "precision": "int8-cpu"}}))
    with pytest.raises(HuseError, match="made at precision int8-cpu and index .* holds fp32 vectors"):
        Index.open(tmp_path / "a").add_embed_output(tmp_path / "int8", replace=True, progress=False)

    # What it refuses: an unfinished run, one vector per product, another bundle, another option, a changed shard
    run_bulk(replace(job, out=str(tmp_path / "killed"), max_shards=1))
    with pytest.raises(HuseError, match=r"huse embed has not finished .* with --resume"):
        Index.from_embed_output(tiny_bundle, tmp_path / "killed", tmp_path / "c", progress=False)
    run_bulk(replace(job, mode="auto", out=str(tmp_path / "auto")))
    r = cli.invoke(main, ["index", "build", str(tiny_bundle), "--embeddings", str(tmp_path / "auto"), "--out",
                          str(tmp_path / "c")])
    assert r.exit_code == 1 and "one vector per product" in r.output and "--mode index" in r.output
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    (other / "manifest.json").write_text(json.dumps({**json.loads((other / "manifest.json").read_text()), "x": 1}))
    with pytest.raises(HuseError, match="made with another bundle"):
        Index.from_embed_output(other, tmp_path / "emb", tmp_path / "c", progress=False)
    r = cli.invoke(main, ["index", "build", str(tiny_bundle), "--embeddings", str(tmp_path / "emb"), "--out",
                          str(tmp_path / "c"), "--precision", "fp16"])
    assert r.exit_code == 1 and "--precision apply to --data" in r.output
    part = tmp_path / "emb" / "part-00001.text.npy"
    part.write_bytes(part.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(HuseError, match=r"part-00001\.text\.npy does not match the sha256"):
        Index.from_embed_output(tiny_bundle, tmp_path / "emb", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_a_build_reads_its_vectors_a_block_at_a_time(tiny_bundle, tmp_path, monkeypatch):
    """At millions of products an index's vectors are tens of GB: from memory-mapped files (as `build` writes them,
    or the caller's), the build holds EXACT_ROWS rows of them at a time, never a copy of them all (it held two to
    three: 13 KB a product at 120,000 products; README "Retrieval"). numpy's allocations are traced."""
    import gc
    import tracemalloc
    from types import SimpleNamespace

    from huse.runtime import index as index_module

    n, dim = 120_000, json.loads((tiny_bundle / "manifest.json").read_text())["embedding_dim"]
    rng = np.random.default_rng(0)
    vectors = {}
    for m in ("image", "text"):
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v[:: 2 if m == "image" else 70] = np.nan  # products without a photo (half: each an exclusion) or a title
        np.save(tmp_path / f"{m}.npy", v)
        vectors[m] = np.load(tmp_path / f"{m}.npy", mmap_mode="r")
    records = [SimpleNamespace(row=i + 1, product_id=None, name=None, image=None, classes=None) for i in range(n)]
    monkeypatch.setattr(index_module, "EXACT_ROWS", 2000)
    small = {m: v[:100] for m, v in vectors.items()}  # FAISS and the rest imported before tracing
    Index.from_embeddings(tiny_bundle, records[:100], small, tmp_path / "warm", kind="flat", progress=False)
    gc.collect()  # earlier tests' garbage, whose finalisers would allocate during the trace
    tracemalloc.start()
    try:
        idx = Index.from_embeddings(tiny_bundle, records, vectors, tmp_path / "idx", kind="flat", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Per-item bookkeeping (offsets, codes, masks: ~65 bytes a product) fits; a copy of the vectors (256 bytes a
    # product at the tiny bundle's 64-d, 2 KB at 512-d) does not, nor the 100,000 exclusions held as dicts (~32 MB).
    assert peak < vectors["image"].nbytes / 3, f"peak {peak / 2**20:.1f} MiB of numpy and Python objects"
    assert idx.manifest["counts"]["image"] == n - len(range(0, n, 2))
    assert idx.manifest["counts"]["text"] == n - len(range(0, n, 70))
    q = np.asarray(vectors["image"][[1, 3, 5]])  # photos the index holds
    assert [h[0].item for h in idx.search_vectors(q, k=1, target="image")] == [1, 3, 5]
