"""The page's routes over real sockets, and the thumbnails behind them: photos come only from the
images folder the operator names, requests a client shapes cannot reach anything else, and a bad
decision is a clear 4xx that records nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from huse.runtime.catalog import read_catalog
from huse.runtime.errors import HuseError
from huse.runtime.serve.thumbs import Thumbnails
from tests.runtime.serve.conftest import ServerProcess, post


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


@pytest.fixture(scope="module")
def two_folders_index(tiny_bundle, tiny_catalog, review_catalog, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """An index whose first ten photos lie in the served folder (the review catalog's) and the rest
    outside it (the tiny catalog's, which the review catalog copies)."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed; pip install 'huse-edge[index]'")
    from huse.runtime import Index

    tmp = tmp_path_factory.mktemp("two")
    served = review_catalog.parent
    rows = list(csv.DictReader(open(tiny_catalog)))[:20]
    catalog = tmp / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id"])
        for i, r in enumerate(rows):
            image = served / r["image"] if i < 10 else (tiny_catalog.parent / r["image"]).resolve()
            w.writerow([str(image), r["name"], r["classes"], r["product_id"]])
    Index.build(tiny_bundle, catalog, tmp / "index", kind="flat", progress=False)
    return tmp / "index", served, rows


@pytest.fixture(scope="module")
def page_server(tiny_bundle, two_folders_index, preds, review_catalog, tmp_path_factory):
    index, served, _ = two_folders_index
    journal = tmp_path_factory.mktemp("journal") / "journal.jsonl"
    s = ServerProcess(tiny_bundle, "--index", str(index), "--images", str(served), "--review", str(preds),
                      "--catalog", str(review_catalog), "--journal", str(journal))
    s.journal = journal
    yield s
    s.stop()
    s.log.close()


def test_config_says_what_the_server_offers(page_server, labels):
    status, _, body = get(page_server.url + "/ui/config")
    config = json.loads(body)
    assert status == 200 and config["index"] and config["photos"] and config["review"] and config["items"] == 20
    assert config["labels"] == labels
    status, ctype, body = get(page_server.url + "/")
    assert status == 200 and ctype.startswith("text/html") and b'<script src="app.js">' in body


def test_index_photos_only_from_the_served_folder(page_server, two_folders_index):
    status, ctype, body = get(page_server.url + "/ui/item/3/image?size=96")
    assert status == 200 and ctype == "image/jpeg" and Image.open(io.BytesIO(body)).size == (32, 32)
    status, ctype, body = get(page_server.url + "/ui/item/3/photo")
    _, served, rows = two_folders_index
    assert status == 200 and ctype == "image/png" and body == (served / rows[3]["image"]).read_bytes()
    for path in ("/ui/item/13/image", "/ui/item/13/photo"):  # a photo outside --images
        status, _, body = get(page_server.url + path)
        assert status in (403, 404) and "confined" in json.loads(body)["error"]
    assert get(page_server.url + "/ui/item/20/image")[0] == 404  # no such item
    assert get(page_server.url + "/ui/item/3/image?size=4000")[0] == 400  # sizes are a fixed set


def test_a_client_cannot_name_a_path(page_server):
    for path in ("/ui/item/..%2F..%2Fetc%2Fpasswd/image", "/ui/review/image/..%2F..%2Fetc%2Fpasswd",
                 "/ui/review/image/%2Fetc%2Fpasswd", "/ui/item/-1/image", "/..%2F..%2Fetc%2Fpasswd"):
        status, _, body = get(page_server.url + path)
        assert status == 404 and b"root:" not in body, path


def test_review_routes_over_http(page_server, preds):
    status, _, body = get(page_server.url + "/ui/review/items?limit=3")
    items = json.loads(body)["items"]
    assert status == 200 and len(items) == 3 and items[0]["pos"] == 0 and "image" not in items[0]
    status, ctype, _ = get(page_server.url + f"/ui/review/image/{items[0]['row']}?size=384")
    assert status == 200 and ctype == "image/jpeg"
    not_queued = next(json.loads(l)["row"] for l in preds.read_text().splitlines() if not json.loads(l)["needs_review"])
    assert get(page_server.url + f"/ui/review/image/{not_queued}")[0] == 404

    url = page_server.url + "/ui/review/decide"
    lines = page_server.journal.read_text().count("\n")
    for body, status, says in ((b"{not json", 400, "not valid JSON"), (b'{"row": "x"}', 400, "a decision is"),
                               (json.dumps({"row": items[0]["row"], "action": "burn"}).encode(), 400, "not one of"),
                               (json.dumps({"row": items[0]["row"], "action": "correct", "label": "toys"}).encode(),
                                400, "not one of the bundle's classes"),
                               (b'{"row": 1, "pad": "' + b"x" * 100_000 + b'"}', 413, "at most")):
        got, _, answer = post(url, body)
        assert got == status and says in json.loads(answer)["error"], answer
    assert page_server.journal.read_text().count("\n") == lines  # nothing recorded

    got, _, answer = post(url, json.dumps({"row": items[0]["row"], "action": "accept", "reviewer": "ana"}).encode())
    result = json.loads(answer)
    assert got == 200 and result["saved"] and result["progress"]["done"] == 1
    assert json.loads(page_server.journal.read_text().splitlines()[-1])["reviewer"] == "ana"
    assert json.loads(get(page_server.url + "/ui/review/items?limit=1")[2])["items"][0]["row"] == items[1]["row"]


def test_the_review_shows_photos_a_parquet_catalog_holds(tiny_bundle, page_server, review_catalog, tmp_path):
    """The same thumbnails over HTTP as from the photos' files, and still nothing a client names."""
    pytest.importorskip("pyarrow.parquet")
    from tests.models.make_data import photos_in_parquet
    from tests.runtime.serve.page_fixtures import classify

    held = photos_in_parquet(review_catalog, tmp_path / "held.parquet")
    preds = classify(tiny_bundle, held, tmp_path / "p.jsonl", "--min-confidence", 1.0)
    s = ServerProcess(tiny_bundle, "--review", str(preds), "--catalog", str(held))
    try:
        items = json.loads(get(s.url + "/ui/review/items?limit=3")[2])["items"]
        assert items and all(it["has_image"] for it in items)
        files, thumbs = {r.row: r.image for r in read_catalog(review_catalog)}, Thumbnails(review_catalog.parent)
        for it in items:
            assert get(s.url + f"/ui/review/image/{it['row']}?size=96") == (200, "image/jpeg",
                                                                            thumbs.get(files[it["row"]], 96))
        assert get(s.url + "/ui/review/image/..%2Fheld.parquet")[0] == 404
    finally:
        s.stop()
        s.log.close()


def test_review_options_that_do_not_go_together_are_one_line(tiny_bundle, preds, review_catalog):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    for args, says in ((["--review", str(preds)], "--review PREDS needs --catalog"),
                       (["--journal", "j.jsonl"], "--journal is the journal of a review"),
                       (["--review", str(preds), "--catalog", "nope.csv"], "--catalog nope.csv does not exist")):
        r = CliRunner().invoke(main, ["serve", str(tiny_bundle), *args])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output


# -- thumbnails ----------------------------------------------------------------------------------
def test_thumbnails_are_cached_until_the_file_changes(tmp_path):
    Image.new("RGB", (800, 400), (200, 30, 30)).save(tmp_path / "a.png")
    thumbs = Thumbnails(tmp_path)
    first = thumbs.get("a.png", 192)
    assert Image.open(io.BytesIO(first)).size == (192, 96)  # the longer side, aspect kept
    assert thumbs.get(str(tmp_path / "a.png"), 192) is first  # a cache hit: the same bytes, not re-made
    Image.new("RGB", (400, 800), (30, 30, 200)).save(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(1, 1))
    assert Image.open(io.BytesIO(thumbs.get("a.png", 192))).size == (96, 192)


def test_a_relative_images_folder_serves_the_photos_it_holds(tmp_path, monkeypatch):
    """`huse serve --images photos` from the folder above: the route confines the path, then makes
    the thumbnail from what it confined (once joined onto the root, never twice)."""
    from huse.runtime.serve.page import image_response

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "photos" / "a.png")
    monkeypatch.chdir(tmp_path)
    thumbs = Thumbnails("photos")
    for path in ("a.png", str(tmp_path / "photos" / "a.png")):  # as a catalog names it; as an index returns it
        r = image_response(thumbs, path, "96")
        assert r.status_code == 200 and Image.open(io.BytesIO(r.body)).size == (40, 20), r.body  # never enlarged


def test_thumbnails_never_leave_their_folder(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    Image.new("RGB", (10, 10)).save(outside / "secret.png")
    (inside / "link.png").symlink_to(outside / "secret.png")
    (inside / "notes.png").write_bytes(b"not an image")
    thumbs = Thumbnails(inside)
    for path in ("../out/secret.png", str(outside / "secret.png"), "link.png", "/etc/passwd"):
        with pytest.raises(HuseError, match="confined"):
            thumbs.get(path, 96)
    with pytest.raises(HuseError, match="could not be decoded"):
        thumbs.get("notes.png", 96)
    with pytest.raises(HuseError, match="not one of"):
        thumbs.get("notes.png", 100)


def test_the_page_shows_the_photos_an_index_keeps(tiny_bundle, tiny_catalog, kept_photos_index):
    """Served from the index itself, without --images: the same thumbnails as from the photos' files, the
    photo as the catalog held it, and a plain 404 for a product without one."""
    index, rows, photos = kept_photos_index
    s = ServerProcess(tiny_bundle, "--index", str(index))
    try:
        config = json.loads(get(s.url + "/ui/config")[2])
        assert config["held_photos"] and not config["photos"]
        thumbs = Thumbnails(tiny_catalog.parent)
        for item in (3, 17):
            assert get(s.url + f"/ui/item/{item}/image?size=96") == (200, "image/jpeg", thumbs.get(rows[item]["image"], 96))
            assert get(s.url + f"/ui/item/{item}/photo") == (200, "image/png", photos[item])
        for path in ("/ui/item/0/image", "/ui/item/0/photo"):
            status, _, body = get(s.url + path)
            assert status == 404 and json.loads(body)["error"] == "this product has no photo"
        assert get(s.url + "/ui/item/5/image?size=4000")[0] == 400
        assert get(s.url + "/ui/item/30/image")[0] == 404
    finally:
        s.stop()
        s.log.close()
