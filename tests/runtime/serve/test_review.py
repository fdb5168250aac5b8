"""The review queue and its journal without a server: order, decisions, reopening, two reviewers, export."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from huse.runtime.bulk import iter_predictions
from huse.runtime.catalog import read_catalog
from huse.runtime.cli import main
from huse.runtime.errors import HuseError
from huse.runtime.serve.review import ReviewQueue, default_journal, export_corrections, read_journal
from tests.runtime.serve.page_fixtures import classify


def _pred_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_queue_lists_needs_review_rows_least_confident_first(preds, review_catalog, labels, tmp_path):
    q = ReviewQueue(preds, review_catalog, labels, journal=tmp_path / "j.jsonl")
    flagged = [p for p in _pred_rows(preds) if p.get("needs_review")]
    assert 0 < len(q.items) == len(flagged) < len(_pred_rows(preds))
    assert [it.row for it in q.items] == [p["row"] for p in sorted(flagged, key=lambda p: (p["score"], p["row"]))]
    assert [it.score for it in q.items] == sorted(it.score for it in q.items)
    catalog = {r.row: r for r in read_catalog(review_catalog)}
    for it in q.items:
        assert it.name == catalog[it.row].name and it.classes == catalog[it.row].classes
        assert it.image == catalog[it.row].image.split("cat/")[-1]  # as the catalog names it: images/img_....png
        assert len(it.top_k) == 3 and it.top_k[0]["label"] == it.label
        assert q.image_path(it.row) == catalog[it.row].image
    assert q.progress() == {"total": len(flagged), "done": 0, "left": len(flagged),
                            "accept": 0, "correct": 0, "skip": 0}


def test_a_csv_of_predictions_gives_the_same_queue(tiny_bundle, preds, review_catalog, labels, tmp_path):
    threshold = min(p["score"] for p in _pred_rows(preds) if not p.get("needs_review"))  # preds' own --min-confidence
    sheet = classify(tiny_bundle, review_catalog, tmp_path / "preds.csv", "--min-confidence", threshold)
    a = ReviewQueue(preds, review_catalog, labels, journal=tmp_path / "a.jsonl")
    b = ReviewQueue(sheet, review_catalog, labels, journal=tmp_path / "b.jsonl")
    assert len(a.items) > 0 and b.items == a.items


def test_a_catalog_named_by_a_relative_path_shows_its_photos(preds, review_catalog, labels, tmp_path, monkeypatch):
    from huse.runtime.serve.page import image_response
    from huse.runtime.serve.thumbs import Thumbnails

    monkeypatch.chdir(review_catalog.parent.parent)  # `huse serve ... --catalog cat/catalog.csv`
    relative = Path(review_catalog.parent.name) / review_catalog.name
    q = ReviewQueue(preds, relative, labels, journal=tmp_path / "j.jsonl")
    row = q.items[0].row
    r = image_response(Thumbnails(q.images), q.image_path(row), "96")
    assert r.status_code == 200 and r.media_type == "image/jpeg", r.body


def test_decisions_are_journalled_and_a_reopened_review_continues(preds, review_catalog, labels, tmp_path):
    journal = tmp_path / "j.jsonl"
    q = ReviewQueue(preds, review_catalog, labels, journal=journal)
    a, b, c = q.items[:3]
    other = next(l for l in labels if l != b.label)
    r = q.decide(a.row, "accept", reviewer="ana")
    assert r["saved"] and r["entry"]["label"] == a.label and r["previous"] is None
    assert q.decide(b.row, "correct", other)["entry"]["label"] == other
    assert q.decide(c.row, "skip")["entry"]["label"] is None
    assert q.decide(c.row, "correct", c.top_k[0]["label"])["entry"]["action"] == "accept"  # the top-1: an accept
    assert [it.row for it in q.page(limit=2)] == [it.row for it in q.items[3:5]]

    lines = journal.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["format"] == "huse-review-journal/1"
    assert [json.loads(l)["action"] for l in lines[1:]] == ["accept", "correct", "skip", "accept"]
    assert json.loads(lines[1])["reviewer"] == "ana"

    again = ReviewQueue(preds, review_catalog, labels, journal=journal)  # the server restarted
    assert again.progress()["done"] == 3 and again.progress()["accept"] == 2 and again.progress()["correct"] == 1
    assert again.page(limit=1)[0].row == q.items[3].row
    assert again.decide(c.row, "skip")["previous"]["action"] == "accept"


def test_bad_decisions_are_refused_and_not_journalled(preds, review_catalog, labels, tmp_path):
    q = ReviewQueue(preds, review_catalog, labels, journal=tmp_path / "j.jsonl")
    row = q.items[0].row
    with pytest.raises(HuseError, match="not one of the bundle's classes"):
        q.decide(row, "correct", "clothing<tops<capes")
    with pytest.raises(HuseError, match="action 'delete' is not one of"):
        q.decide(row, "delete")
    with pytest.raises(HuseError, match="correct needs a label"):
        q.decide(row, "correct")
    not_queued = next(p["row"] for p in _pred_rows(preds) if not p.get("needs_review"))
    with pytest.raises(HuseError, match=f"row {not_queued} is not in this review"):
        q.decide(not_queued, "accept")
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 1  # the header only


def test_two_reviewers_at_once_keep_every_decision(preds, review_catalog, labels, tmp_path):
    journal = tmp_path / "j.jsonl"
    q = ReviewQueue(preds, review_catalog, labels, journal=journal)
    rows = [it.row for it in q.items[:4]]

    def reviewer(name: str, action: str):
        for _ in range(10):
            for row in rows:
                q.decide(row, action, reviewer=name)

    threads = [threading.Thread(target=reviewer, args=(n, a)) for n, a in (("ana", "accept"), ("bo", "skip"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]  # every line parses: none interleaved
    assert len(entries) == 80 and {e["reviewer"] for e in entries} == {"ana", "bo"}
    last = {e["row"]: e for e in entries}
    reopened = ReviewQueue(preds, review_catalog, labels, journal=journal)
    assert {row: reopened.decision(row)["action"] for row in rows} == {row: last[row]["action"] for row in rows}


def test_a_cut_last_line_is_dropped_and_repaired(preds, review_catalog, labels, tmp_path):
    journal = tmp_path / "j.jsonl"
    q = ReviewQueue(preds, review_catalog, labels, journal=journal)
    q.decide(q.items[0].row, "accept")
    with open(journal, "ab") as f:  # a crash inside a write: never acknowledged
        f.write(b'{"row": 7, "action": "acc')
    again = ReviewQueue(preds, review_catalog, labels, journal=journal)
    assert again.progress()["done"] == 1
    again.decide(q.items[1].row, "skip")
    assert [json.loads(l)["action"] for l in journal.read_text().splitlines()[1:]] == ["accept", "skip"]


def test_a_file_that_is_not_a_journal_is_refused_and_never_cut(preds, review_catalog, labels, tmp_path):
    """--journal naming a catalog or the predictions by mistake: the repair of a cut last line truncated
    any file not ending in a newline (a Parquet catalog lost its footer) before checking it was a journal."""
    parquet = tmp_path / "catalog.parquet"
    parquet.write_bytes(b"PAR1\x15\x04\n\x00binary footer without a newline PAR1")
    jsonl = tmp_path / "preds.jsonl"
    jsonl.write_bytes(b'{"row": 1, "label": "a"}\n{"row": 2, "label"')
    lists = tmp_path / "lists.jsonl"
    lists.write_bytes(b'[1, 2]\n[3')
    for path, says in ((parquet, "line 1: not JSON"), (jsonl, "is not a huse review journal"),
                       (lists, "is not a huse review journal")):
        before = path.read_bytes()
        with pytest.raises(HuseError, match=says):
            ReviewQueue(preds, review_catalog, labels, journal=path)
        assert path.read_bytes() == before


def test_a_journal_of_another_catalog_is_refused(preds, review_catalog, labels, tmp_path):
    journal = tmp_path / "j.jsonl"
    ReviewQueue(preds, review_catalog, labels, journal=journal)
    changed = tmp_path / "changed.csv"
    changed.write_text(review_catalog.read_text() + "images/img_0_0.png,Acme navy tee,clothing<tops<t-shirts,p-new\n")
    with pytest.raises(HuseError, match="belongs to catalog"):
        ReviewQueue(preds, changed, labels, journal=journal, images=review_catalog.parent)


def test_predictions_of_another_catalog_are_refused(preds, review_catalog, labels, tmp_path):
    lines = review_catalog.read_text().splitlines()
    other = tmp_path / "other.csv"
    other.write_text("\n".join([lines[0]] + lines[:0:-1]) + "\n")  # the same products, rows reversed
    with pytest.raises(HuseError, match="were the predictions made from this catalog"):
        ReviewQueue(preds, other, labels, journal=tmp_path / "j.jsonl", images=review_catalog.parent)


def test_predictions_without_needs_review_say_how_to_make_them(tiny_bundle, review_catalog, labels, tmp_path):
    plain = classify(tiny_bundle, review_catalog, tmp_path / "plain.jsonl")
    with pytest.raises(HuseError, match="--min-confidence"):
        ReviewQueue(plain, review_catalog, labels, journal=tmp_path / "j.jsonl")


def test_parquet_shards_give_the_same_queue(tiny_bundle, preds, review_catalog, labels, tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet output needs pip install 'huse-edge[scale]'")
    threshold = max(p["score"] for p in _pred_rows(preds) if p["needs_review"]) + 1e-9
    folder = classify(tiny_bundle, review_catalog, tmp_path / "pq", "--shard-rows", 50, "--min-confidence", threshold)
    a = ReviewQueue(preds, review_catalog, labels, journal=tmp_path / "a.jsonl")
    b = ReviewQueue(folder, review_catalog, labels, journal=tmp_path / "b.jsonl")
    assert [it.row for it in b.items] == [it.row for it in a.items]
    assert default_journal(folder) == tmp_path / "pq.review.jsonl"  # beside the output, which a rerun replaces
    assert default_journal(preds) == preds.with_name("preds.review.jsonl")


def test_a_photo_path_leaving_the_images_folder_is_never_read(tiny_bundle, review_catalog, labels, tmp_path):
    images = review_catalog.parent
    rows = list(csv.reader(open(review_catalog)))
    rows[1][0] = "../../../etc/passwd"
    rows[2][0] = str((images / rows[2][0]).resolve())  # absolute: refused too, even inside the folder
    catalog = tmp_path / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = classify(tiny_bundle, catalog, tmp_path / "p.jsonl", "--images", images, "--min-confidence", 1.0,
                   "--mode", "text")
    q = ReviewQueue(out, catalog, labels, journal=tmp_path / "j.jsonl", images=images)
    by_row = {it.row: it for it in q.items}
    for row in (1, 2):
        assert by_row[row].image is None and q.image_path(row) is None and "confined" in by_row[row].problem
    fine = next(it for it in q.items if it.row > 2)
    assert fine.problem is None and Path(q.image_path(fine.row)).is_file()


def test_export_writes_a_catalog_huse_train_reads(preds, review_catalog, labels, tmp_path):
    journal = tmp_path / "j.jsonl"
    q = ReviewQueue(preds, review_catalog, labels, journal=journal)
    a, b, c, d = q.items[:4]
    other = next(l for l in labels if l != b.label)
    q.decide(a.row, "accept")
    q.decide(b.row, "skip", reviewer="ana")
    q.decide(b.row, "correct", other, reviewer="bo")  # the later decision wins
    q.decide(c.row, "skip")
    q.decide(d.row, "correct", other)
    q.decide(d.row, "skip")  # skipped at last: left out

    out = tmp_path / "corrections.csv"
    r = CliRunner().invoke(main, ["review", "export", str(journal), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote 2 reviewed rows" in r.output and f"--images {review_catalog.parent.resolve()}" in r.output
    records = read_catalog(out, images=review_catalog.parent, require=("classes",))
    expected = sorted([(a, a.label), (b, other)], key=lambda pair: pair[0].row)  # rows in catalog order
    assert [(x.name, x.classes, x.product_id) for x in records] == [
        (it.name, lab, it.product_id) for it, lab in expected]
    assert all(Path(x.image).is_file() for x in records)
    assert export_corrections(journal, tmp_path / "again.csv")["written"] == 2

    # It holds only the reviewed rows: never written over the catalog, and another file only with --force.
    before = review_catalog.read_bytes()
    for target, says in ((review_catalog, "is the reviewed catalog"), (preds, "is the predictions reviewed"),
                         (out, "exists; choose another file, or pass --force")):
        r = CliRunner().invoke(main, ["review", "export", str(journal), "--out", str(target)])
        assert r.exit_code == 1 and says in r.output, r.output
    assert review_catalog.read_bytes() == before
    r = CliRunner().invoke(main, ["review", "export", str(journal), "--out", str(review_catalog), "--force"])
    assert r.exit_code == 1 and "is the reviewed catalog" in r.output and review_catalog.read_bytes() == before
    r = CliRunner().invoke(main, ["review", "export", str(journal), "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", ["corrections.jsonl", "corrections.ndjson", "corrections.pq"])
def test_export_writes_the_format_its_name_says(preds, review_catalog, labels, tmp_path, name):
    """A catalog's format is read off its name, so the export writes by the same rule: `--out corrections.jsonl`
    once held CSV text, which huse-train then read as JSON Lines with no columns at all."""
    journal = tmp_path / "j.jsonl"
    q = ReviewQueue(preds, review_catalog, labels, journal=journal)
    q.decide(q.items[0].row, "accept")
    q.decide(q.items[1].row, "correct", next(l for l in labels if l != q.items[1].label))
    export_corrections(journal, tmp_path / "c.csv")
    r = CliRunner().invoke(main, ["review", "export", str(journal), "--out", str(tmp_path / name)])
    assert r.exit_code == 0, r.output
    want = read_catalog(tmp_path / "c.csv", images=review_catalog.parent, require=("classes",))
    assert len(want) == 2 and read_catalog(tmp_path / name, images=review_catalog.parent, require=("classes",)) == want


def test_a_catalog_holding_its_photos_is_reviewed_and_exported_with_them(tiny_bundle, review_catalog, labels,
                                                                         tmp_path):
    """A Parquet catalog with the photos' bytes: the queue shows each from a copy beside the journal, a
    CSV export is refused (it would lose the photos), and a Parquet export carries them for huse-train."""
    pytest.importorskip("pyarrow.parquet")
    from tests.models.make_data import photos_in_parquet

    held = photos_in_parquet(review_catalog, tmp_path / "held.parquet")
    preds = classify(tiny_bundle, held, tmp_path / "p.jsonl", "--min-confidence", 1.0, "--mode", "text")
    q = ReviewQueue(preds, held, labels, journal=tmp_path / "j.jsonl")
    photos = {r.row: r.image for r in read_catalog(held)}
    assert q.photos == tmp_path / "j.photos" and q.items
    for it in q.items:
        assert it.to_dict()["has_image"] and it.image is None  # no catalog path to export
        assert Path(q.image_path(it.row)).parent == q.photos.absolute()
        assert Path(q.image_path(it.row)).read_bytes() == photos[it.row]
    assert ReviewQueue(preds, held, labels, journal=tmp_path / "j.jsonl").image_path(q.items[0].row) == \
        q.image_path(q.items[0].row)  # reopened: the copies are reused
    a, b = q.items[:2]
    q.decide(a.row, "accept")
    q.decide(b.row, "correct", next(l for l in labels if l != b.label))
    r = CliRunner().invoke(main, ["review", "export", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "c.csv")])
    assert r.exit_code == 1 and "2 of the 2 rows to export have their photo inside" in r.output, r.output
    assert "--out " + str(tmp_path / "c.parquet") in r.output and not (tmp_path / "c.csv").exists()
    export_corrections(tmp_path / "j.jsonl", tmp_path / "c.parquet")
    records = read_catalog(tmp_path / "c.parquet", require=("classes",))
    assert [x.image for x in records] == [photos[it.row] for it in sorted((a, b), key=lambda it: it.row)]
    # A catalog of files exports to Parquet too: paths, as in its CSV
    q2 = ReviewQueue(classify(tiny_bundle, review_catalog, tmp_path / "p2.jsonl", "--min-confidence", 1.0),
                     review_catalog, labels, journal=tmp_path / "j2.jsonl")
    q2.decide(q2.items[0].row, "accept")
    export_corrections(tmp_path / "j2.jsonl", tmp_path / "c2.parquet")
    export_corrections(tmp_path / "j2.jsonl", tmp_path / "c2.csv")
    assert read_catalog(tmp_path / "c2.parquet", images=review_catalog.parent) == \
        read_catalog(tmp_path / "c2.csv", images=review_catalog.parent)


def test_export_of_a_missing_or_foreign_file_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["review", "export", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c.csv")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    other = tmp_path / "other.jsonl"
    other.write_text('{"row": 1}\n')
    with pytest.raises(HuseError, match="not a huse review journal"):
        read_journal(other)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_multi_label_row_is_decided_and_exported_as_a_label_set(tiny_multi_bundle, tiny_multi_catalog, tmp_path,
                                                                  fmt):
    """Accepting keeps the predicted set; correcting gives another; the export writes the sets as classes, so
    no product loses a label (deciding one class a row kept the top-1 alone)."""
    from huse.runtime.bulk import BulkJob, run_bulk
    from huse.runtime.labels import parse_paths

    out = tmp_path / f"preds.{fmt}"
    run_bulk(BulkJob(bundle=str(tiny_multi_bundle), data=str(tiny_multi_catalog), out=str(out), min_confidence=0.8,
                     threads=1, progress=False))
    preds = {p["row"]: p for p in iter_predictions(out)}
    labels = json.loads((tiny_multi_bundle / "manifest.json").read_text())["labels"]
    q = ReviewQueue(out, tiny_multi_catalog, labels, journal=tmp_path / "j.jsonl")
    items = q.page(limit=100)
    assert items and all(it.labels == [x["label"] for x in preds[it.row]["labels"]] for it in items)
    weakest = [min(x["score"] for x in preds[it.row]["labels"]) for it in items]
    assert weakest == sorted(weakest)  # the least confident label first
    for it in items:  # the choices: the set and the top TOP, best first
        assert set(it.labels) <= {t["label"] for t in it.top_k} and [t["score"] for t in it.top_k] == sorted(
            (t["score"] for t in it.top_k), reverse=True)
    several = next(it for it in items if len(it.labels) > 1)
    a = q.decide(several.row, "accept")["entry"]
    assert a["label"] == a["predicted"] == "|".join(sorted(several.labels))
    other = next(it for it in items if it.row != several.row)
    extra = next(c for c in labels if c not in other.labels)
    wanted = "|".join([extra, *other.labels])
    c = q.decide(other.row, "correct", wanted)["entry"]
    assert c["action"] == "correct" and parse_paths(c["label"]) == tuple(sorted({extra, *other.labels}))
    same = q.decide(other.row, "correct", " | ".join(reversed(other.labels)))["entry"]  # the prediction itself
    assert same["action"] == "accept" and same["label"] == other.predicted
    with pytest.raises(HuseError, match=r"'nope<x>' is not one of the bundle's classes"):
        q.decide(other.row, "correct", f"{other.labels[0]}|nope<x>")
    with pytest.raises(HuseError, match=r"several separated by '\|'"):
        q.decide(other.row, "correct", "")
    q.decide(other.row, "correct", wanted)
    export_corrections(tmp_path / "j.jsonl", tmp_path / "fixed.csv")
    got = list(csv.DictReader(open(tmp_path / "fixed.csv", newline="")))
    assert sorted(parse_paths(r["classes"]) for r in got) == sorted(
        [parse_paths(a["label"]), tuple(sorted({extra, *other.labels}))])
