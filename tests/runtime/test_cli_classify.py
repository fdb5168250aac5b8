"""`huse classify` / `huse embed` end to end: every row is answered, misuse is one line + exit 1."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from huse.runtime.bulk import read_embeddings, read_predictions
from huse.runtime.cli import main
from tests.models.make_data import write_rows


@pytest.fixture
def catalog(tiny_catalog, tmp_path):
    folder = tmp_path / "cat"
    shutil.copytree(tiny_catalog.parent, folder)
    return folder / "catalog.csv"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_classify_writes_every_row(tiny_bundle, catalog, tmp_path):
    lines = catalog.read_text().splitlines()
    lines.append("images/does_not_exist.png,Acme black tee,clothing<tops<t-shirts,p-missing")
    catalog.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.jsonl"  # one JSONL file for small jobs
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", out, "--mode", "image", "--no-progress")
    assert r.exit_code == 0, r.output
    preds = [json.loads(l) for l in out.read_text().splitlines()]
    assert [p["row"] for p in preds] == list(range(1, len(lines)))
    assert "does_not_exist.png" in preds[-1]["error"] and preds[-1]["error"].startswith(f"row {len(lines) - 1}:")
    assert "1 with errors" in r.output and "top-1 accuracy" in r.output
    assert not (tmp_path / "preds.jsonl.shards").exists()


def test_classify_parquet_shards_match_jsonl(tiny_bundle, catalog, tmp_path):
    base = ["classify", tiny_bundle, "--data", catalog, "--shard-rows", 50, "--batch-size", 16, "--no-progress"]
    assert _run(*base, "--out", tmp_path / "pq").exit_code == 0
    r = _run(*base, "--out", tmp_path / "js", "--format", "jsonl")
    assert r.exit_code == 0, r.output
    pq, js = read_predictions(tmp_path / "pq"), read_predictions(tmp_path / "js")
    assert len(pq) == 120 and sorted(p.name for p in (tmp_path / "pq").iterdir()) == [
        "_SUCCESS", "_manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [p["label"] for p in pq] == [p["label"] for p in js]
    assert [p["top_k"] for p in pq] == [p["top_k"] for p in js]
    m = json.loads((tmp_path / "pq" / "_manifest.json").read_text())
    assert [(e["start"], e["count"], e["rows"]) for e in m["shards"].values()] == [
        (0, 50, [1, 50]), (50, 50, [51, 100]), (100, 20, [101, 120])]


def test_min_confidence_marks_rows_for_review_and_keeps_them(tiny_bundle, catalog, tmp_path):
    assert _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "all", "--no-progress").exit_code == 0
    scores = sorted(p["score"] for p in read_predictions(tmp_path / "all"))
    threshold = scores[len(scores) // 2]  # the median: about half the rows fall below it, whatever the model
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "o", "--min-confidence", threshold,
             "--no-progress")
    assert r.exit_code == 0, r.output
    preds = read_predictions(tmp_path / "o")
    assert len(preds) == 120
    flagged = [p for p in preds if p["needs_review"]]
    assert flagged and all(p["score"] < threshold for p in flagged)
    assert all(p["score"] >= threshold for p in preds if not p["needs_review"])
    assert f"{len(flagged)} need review" in r.output


def test_embed_writes_npy_and_metadata_shards(tiny_bundle, catalog, tmp_path):
    from huse.runtime import Classifier

    r = _run("embed", tiny_bundle, "--data", catalog, "--out", tmp_path / "emb", "--shard-rows", 64, "--no-progress")
    assert r.exit_code == 0, r.output
    vecs, meta = read_embeddings(tmp_path / "emb")
    assert vecs.shape[0] == 120 and [m["row"] for m in meta] == list(range(1, 121))
    assert {m["modality"] for m in meta} == {"image"}
    with Classifier(tiny_bundle) as clf:
        ref = clf.embed_image([m["image"] for m in meta[:64]]).vectors
    np.testing.assert_array_equal(vecs[:64], ref)  # same batches -> the same bits


def test_wrong_images_folder_warns_and_counts(tiny_bundle, catalog, tmp_path):
    r = _run("classify", tiny_bundle, "--data", catalog, "--images", tmp_path / "nowhere", "--out", tmp_path / "o",
             "--no-progress")
    assert r.exit_code == 0, r.output  # titles saved every row
    assert "120 with warnings" in r.output
    assert "could not be used" in r.output and "--images" in r.output


def test_photos_that_are_web_pages_are_named_so_not_blamed_on_images(tiny_bundle, catalog, tmp_path):
    """A scraped catalog whose .jpg files are saved error pages: the warning says what they are."""
    lines = catalog.read_text().splitlines()
    (tmp_path / "pages").mkdir()
    for i, line in enumerate(lines[1:]):
        (tmp_path / "pages" / f"{i}.jpg").write_text("<!DOCTYPE html><html><body>429 Too Many Requests</body></html>")
    catalog.write_text("\n".join([lines[0]] + [f"pages/{i}.jpg," + line.split(",", 1)[1]
                                               for i, line in enumerate(lines[1:])]) + "\n")
    r = _run("classify", tiny_bundle, "--data", catalog, "--images", tmp_path, "--out", tmp_path / "o.jsonl",
             "--no-progress")
    assert r.exit_code == 0 and "120 with warnings" in r.output, r.output  # each classified by its title
    assert "could not be decoded: it is an HTML page, not a photo" in r.output
    assert "is --images right?" not in r.output


def test_photo_urls_are_named_as_urls_not_as_missing_files(tiny_bundle, catalog, tmp_path):
    """Catalogs often name photos by URL; huse never fetches them, and says so instead of blaming --images."""
    lines = catalog.read_text().splitlines()
    urls = [lines[0]] + [("https://cdn.example.com/" if i % 2 else "s3://bucket/") + line for i, line in
                         enumerate(lines[1:])]
    catalog.write_text("\n".join(urls) + "\n")
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "o.jsonl", "--no-progress")
    assert r.exit_code == 0 and "120 with warnings" in r.output, r.output  # each classified by its title
    assert "is a URL: huse reads photos from files or bytes, never from the network" in r.output
    assert "is --images right?" not in r.output
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0]["image"].startswith("s3://bucket/") and rows[1]["image"].startswith("https://cdn.example.com/")
    assert rows[0]["mode"] == "text" and f"image {rows[0]['image']} is a URL" in rows[0]["warning"]


def test_an_empty_catalog_gives_an_empty_output_and_says_so(tiny_bundle, tmp_path):
    for name, text in (("header.csv", "image,name,classes\n"), ("zero.jsonl", "")):
        (tmp_path / name).write_text(text)
        r = _run("classify", tiny_bundle, "--data", tmp_path / name, "--out", tmp_path / f"{name}.out.jsonl",
                 "--no-progress")
        assert r.exit_code == 0 and "classified 0/0 rows" in r.output, r.output
        assert f"warning: catalog {tmp_path / name} has no rows; the output is empty" in r.output
        assert (tmp_path / f"{name}.out.jsonl").read_text() == ""


def test_one_product_from_the_command_line(tiny_bundle, catalog, tmp_path):
    """`huse classify BUNDLE --image X --title T`: the answer Classifier.classify gives, printed; nothing written."""
    from huse.runtime import Classifier

    first = next(csv.DictReader(open(catalog, newline="")))
    image, title = str(catalog.parent / first["image"]), first["name"]
    with Classifier(tiny_bundle) as clf:
        want = clf.classify(images=[image], titles=[title], top_k=3)[0]
        want_text = clf.classify(titles=[title], top_k=3)[0]
    r = _run("classify", tiny_bundle, "--image", image, "--title", title, "--top-k", 3)
    assert r.exit_code == 0, r.output
    assert f"-> {want['top_k'][0]['label']} ({want['top_k'][0]['score']:.2f}, fused)" in r.output
    assert "  top-k: " + ", ".join(f"{t['label']} {t['score']:.2f}" for t in want["top_k"]) in r.output
    r = _run("classify", tiny_bundle, "--title", title, "--top-k", 3, "--json", "--min-confidence", 1.0)
    got = json.loads(r.output)
    assert r.exit_code == 0 and got["top_k"] == want_text["top_k"] and got["path"] == want_text["path"]
    assert got["mode"] == "text" and got["needs_review"] is True and got["image"] is None
    assert list(tmp_path.iterdir()) == [catalog.parent]  # no output files

    r = _run("classify", tiny_bundle, "--image", tmp_path / "gone.png", "--json")
    assert r.exit_code == 1 and "gone.png does not exist" in json.loads(r.output.splitlines()[0])["error"]
    for args, says in ((["--title", "t", "--data", catalog], "not both"), (["--title", "t", "--out", tmp_path / "o"],
                       "not both"), ([], "needs --data CATALOG and --out (or --image and/or --title"),
                       (["--data", catalog, "--out", tmp_path / "o", "--json"], "--json is for one product")):
        r = _run("classify", tiny_bundle, *args)
        assert r.exit_code == 1 and says in r.output, r.output


def test_accuracy_counts_only_rows_whose_classes_the_bundle_has(tiny_bundle, catalog, tmp_path):
    """Rows of another taxonomy (or a class never trained) cannot be answered right: they were counted wrong."""
    rows = list(csv.DictReader(open(catalog, newline="")))
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "a.jsonl", "--no-progress")
    before = float(r.output.split("top-1 accuracy on rows with classes: ")[1][:6])
    for row in rows[:30]:
        row["classes"] = "toys<games"
    write_rows(catalog, rows)
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "b.jsonl", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "30 rows have classes the bundle does not have (left out of the accuracy" in r.output
    preds = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()][30:]
    right = sum(p["label"] == p["classes"] for p in preds)
    assert f"top-1 accuracy on rows with classes: {right / 90:.4f}" in r.output and before > 0


def test_max_error_rate_exits_1_with_counts(tiny_bundle, catalog, tmp_path):
    r = _run("classify", tiny_bundle, "--data", catalog, "--images", tmp_path / "nowhere", "--mode", "image",
             "--out", tmp_path / "o", "--no-progress")
    assert r.exit_code == 1
    assert "120 of 120 rows failed" in r.output and "--max-error-rate" in r.output
    assert len(read_predictions(tmp_path / "o")) == 120  # the output is still complete, errors inspectable


@pytest.mark.parametrize("args, says", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--batch-size", "-5"], "--batch-size must be a positive integer"),
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--shard-rows", "0"], "--shard-rows must be a positive integer"),
    (["--min-confidence", "2"], "--min-confidence must be between 0 and 1"),
    (["--max-error-rate", "-1"], "--max-error-rate must be between 0 and 1"),
])
def test_bad_options_are_one_line_and_exit_1(tiny_bundle, catalog, tmp_path, args, says):
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "o", *args)
    assert r.exit_code == 1 and r.output.startswith("error: ") and says in r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "o").exists()


def test_out_equal_to_or_containing_the_catalog_is_refused(tiny_bundle, catalog):
    before = catalog.read_bytes()
    for out in (catalog, catalog.parent):
        r = _run("classify", tiny_bundle, "--data", catalog, "--out", out)
        assert r.exit_code == 1 and "would replace or contain the catalog" in r.output
    assert catalog.read_bytes() == before


def test_out_in_a_missing_folder_is_created(tiny_bundle, catalog, tmp_path):
    out = tmp_path / "a" / "b" / "preds"
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert (out / "_SUCCESS").is_file()


def test_previous_complete_output_survives_until_the_new_one_is_complete(tiny_bundle, catalog, tmp_path):
    import csv

    rows = list(csv.DictReader(open(catalog, newline="")))
    data = catalog.with_suffix(".jsonl")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    base = ["classify", tiny_bundle, "--data", data, "--out", out, "--shard-rows", 40, "--no-progress"]
    assert _run(*base).exit_code == 0
    first = read_predictions(out)
    rows[100]["title"] = rows[100].pop("name")  # another catalog's name for a column fails the file at row 101,
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # after two shards
    r = _run(*base)
    assert r.exit_code == 1 and "row 101: column 'title' is not one huse reads; did you mean 'name'?" in r.output
    assert read_predictions(out) == first


def test_a_folder_that_is_not_a_huse_output_is_refused(tiny_bundle, catalog, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / "mine")
    assert r.exit_code == 1 and "not a huse output folder" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_huse_error_is_one_line_and_exit_1(tmp_path):
    r = _run("classify", tmp_path, "--data", tmp_path / "x.csv", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert r.output.startswith("error: ") and "Traceback" not in r.output


def test_a_catalog_refused_at_its_first_rows_is_one_line_without_a_progress_bar(tiny_bundle, catalog, tmp_path):
    latin = catalog.parent / "latin.csv"
    latin.write_bytes("image,name\na.jpg,Café crème\n".encode("latin-1"))
    r = _run("classify", tiny_bundle, "--data", latin, "--out", tmp_path / "o.jsonl")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "--encoding latin-1" in r.output
    assert r.output.count("\n") == 1, r.output


def test_info_verifies_the_bundle(tiny_bundle):
    r = CliRunner().invoke(main, ["info", str(tiny_bundle)])
    assert r.exit_code == 0 and "files verified" in r.output
    assert "calibration temperatures (fitted on val): image " in r.output


def test_info_of_a_multi_label_bundle_shows_its_thresholds(tiny_multi_bundle):
    """Its scores are sigmoids read against thresholds: those, not the (unused) temperatures, are what a user
    choosing --min-confidence needs."""
    thresholds = json.loads((tiny_multi_bundle / "manifest.json").read_text())["multilabel"]["thresholds"]
    r = CliRunner().invoke(main, ["info", str(tiny_multi_bundle)])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("thresholds (tuned on val"))
    for mode, t in thresholds.items():
        shown = f"{min(t):g}" if min(t) == max(t) else f"{min(t):g}-{max(t):g}"
        assert f"{mode} {shown}" in line
    assert "temperatures" not in r.output
    # its precisions' gates compare label sets by micro-F1 (export/precision.multilabel_gate), and say so
    gates = [x for x in r.output.splitlines() if x.startswith(("fp16: gate", "int8-cpu: gate"))]
    assert len(gates) == 2 and all("label-set agreement (mean Jaccard) with fp32: fused " in x and "fused micro-F1 " in x
                                   and "top-1" not in x for x in gates), gates


@pytest.mark.parametrize("name", ["emb.npy", "emb.jsonl", "emb.parquet", "emb.csv"])
def test_embed_into_a_file_name_is_refused_naming_a_folder(tiny_bundle, catalog, tmp_path, name):
    r = _run("embed", tiny_bundle, "--data", catalog, "--out", tmp_path / name, "--no-progress")
    assert r.exit_code == 1 and "names a file, but huse embed writes a folder" in r.output, r.output
    assert f"such as {tmp_path / 'emb'}/" in r.output and "read_embeddings" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["cat"]  # nothing written beside the catalog


def _odd_rows(catalog):
    """The catalog with a row whose photo is missing (classified by its title, with a warning), one that has
    nothing to classify (an error), one without a title and one with a non-ASCII title."""
    rows = list(csv.DictReader(open(catalog, newline="", encoding="utf-8")))
    rows[3]["name"] = ""
    rows[5]["name"] = "Café crème tee «naïve», 日本製"
    rows.append({**rows[0], "image": "images/does_not_exist.png", "product_id": "p-missing"})
    rows.append({**rows[0], "image": "images/does_not_exist.png", "name": "", "product_id": "p-nothing"})
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def test_classify_into_a_csv_file_gives_the_jsonl_answers_as_flat_cells(tiny_bundle, catalog, tmp_path):
    """`--out preds.csv` is one spreadsheet-ready file (it used to be a folder of Parquet shards named preds.csv)."""
    n = _odd_rows(catalog)
    for name in ("preds.jsonl", "preds.csv"):
        r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / name, "--min-confidence", 0.9,
                 "--no-progress")
        assert r.exit_code == 0, r.output
    out = tmp_path / "preds.csv"
    assert out.is_file() and not (tmp_path / "preds.csv.shards").exists()
    assert out.read_bytes().startswith(b"\xef\xbb\xbfrow,product_id,image,name,classes,mode,label,score,")  # BOM: Excel
    cells = list(csv.DictReader(open(out, encoding="utf-8-sig", newline="")))
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(cells) == len(preds) == n and list(cells[0]) == [
        "row", "product_id", "image", "name", "classes", "mode", "label", "score", "needs_review", "top_k",
        "top_k_scores", "path", "path_scores", "warning", "error"]
    for c, p in zip(cells, preds):
        assert int(c["row"]) == p["row"] and c["name"] == (p.get("name") or "") and c["error"] == p.get("error", "")
        if "error" in p:
            assert c["label"] == c["top_k"] == c["score"] == ""
            continue
        assert c["label"] == p["label"] and float(c["score"]) == p["score"]  # floats read back exactly
        assert c["needs_review"] == ("true" if p["needs_review"] else "false")
        assert c["top_k"].split("|") == [t["label"] for t in p["top_k"]]
        assert [float(x) for x in c["top_k_scores"].split("|")] == [t["score"] for t in p["top_k"]]
        assert c["path"].split("|") == [x["label"] for x in p["path"]]
    assert cells[5]["name"] == "Café crème tee «naïve», 日本製"
    assert "does_not_exist.png" in cells[-2]["warning"] and cells[-2]["label"] and not cells[-2]["error"]
    assert "does_not_exist.png" in cells[-1]["error"]
    # the file reads back as the JSONL rows do (--show, the review queue)
    assert read_predictions(out) == read_predictions(tmp_path / "preds.jsonl")


@pytest.mark.parametrize("out", ["preds.jsonl", "preds.csv", "preds"])
def test_show_prints_rows_without_a_title_by_their_photo(tiny_bundle, catalog, tmp_path, out):
    _odd_rows(catalog)
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / out, "--show", 6, "--no-progress")
    assert r.exit_code == 0, r.output  # a JSONL row leaves the missing name out: --show raised KeyError
    shown = [line for line in r.output.splitlines() if line.startswith("row ")]
    assert len(shown) == 6 and shown[3].startswith("row 4: ") and "images/" in shown[3].split(" -> ")[0]
    assert shown[5].startswith("row 6: 'Café crème tee «naïve», 日本製' -> ")


def test_a_csv_out_that_is_not_predictions_is_never_replaced(tiny_bundle, catalog, tmp_path):
    precious = tmp_path / "products.csv"  # the user's own sheet, say
    precious.write_text("sku,price\nA1,9.99\n")
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", precious, "--no-progress")
    assert r.exit_code == 1 and "exists and is not predictions of huse classify" in r.output, r.output
    assert precious.read_text() == "sku,price\nA1,9.99\n"
    preds = tmp_path / "preds.csv"
    for _ in range(2):  # huse's own predictions are replaced by the next run
        r = _run("classify", tiny_bundle, "--data", catalog, "--out", preds, "--no-progress")
        assert r.exit_code == 0, r.output
    assert len(preds.read_text(encoding="utf-8-sig").splitlines()) == 121


def test_a_jsonl_out_that_is_not_predictions_is_never_replaced(tiny_bundle, catalog, tmp_path):
    precious = tmp_path / "products.jsonl"  # a JSONL catalog, say
    precious.write_text(json.dumps({"image": "a.png", "name": "Acme tee"}) + "\n")
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", precious, "--no-progress")
    assert r.exit_code == 1 and "exists and is not predictions of huse classify" in r.output, r.output
    assert precious.read_text() == json.dumps({"image": "a.png", "name": "Acme tee"}) + "\n"
    preds = tmp_path / "preds.jsonl"
    for _ in range(2):  # huse's own predictions are replaced by the next run
        r = _run("classify", tiny_bundle, "--data", catalog, "--out", preds, "--no-progress")
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", ["preds.xlsx", "preds.json", "preds.tsv"])
def test_an_out_file_of_a_format_classify_does_not_write_is_refused(tiny_bundle, catalog, tmp_path, name):
    """It became a folder of Parquet shards by that name, where the user expected a spreadsheet or a JSON file."""
    r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / name, "--no-progress")
    assert r.exit_code == 1 and "huse classify writes one file as .jsonl or .csv" in r.output, r.output
    assert f"give --out {tmp_path / 'preds'}.csv, {tmp_path / 'preds'}.jsonl or {tmp_path / 'preds'}/" in r.output
    assert not (tmp_path / name).exists()


def test_a_csv_output_writes_formula_like_cells_as_text_and_reads_them_back(tiny_bundle, catalog, tmp_path):
    """A title from a marketplace feed such as '=HYPERLINK(...)' would run as a formula in a spreadsheet: the CSV
    holds it behind a "'", and huse (--show, the review queue) reads every cell back exactly."""
    titles = ['=HYPERLINK("http://example.com", "Acme")', "+1 black tee", "-20% navy shirt", "@home boots",
              "'=already quoted", "'plain quote", "Acme black boots"]
    rows = list(csv.DictReader(open(catalog, newline="", encoding="utf-8")))
    for r, t in zip(rows, titles):
        r["name"] = t
    write_rows(catalog, rows)
    for name in ("preds.jsonl", "preds.csv"):
        r = _run("classify", tiny_bundle, "--data", catalog, "--out", tmp_path / name, "--no-progress")
        assert r.exit_code == 0, r.output
    cells = list(csv.DictReader(open(tmp_path / "preds.csv", encoding="utf-8-sig", newline="")))
    assert [c["name"] for c in cells[:len(titles)]] == [
        "'" + titles[0], "'+1 black tee", "'-20% navy shirt", "'@home boots", "''=already quoted", "'plain quote",
        "Acme black boots"]
    assert read_predictions(tmp_path / "preds.csv") == read_predictions(tmp_path / "preds.jsonl")


def test_keygen_makes_its_folder_and_info_says_whether_a_bundle_is_signed(tiny_bundle, tmp_path):
    """The README's `huse keygen keys/release` works without a `mkdir keys`, and `huse info` tells an unsigned
    bundle from a signed one, checking the signature only against a trusted key."""
    from huse.runtime.signing import add_signature, key_id, _load_public

    cli = CliRunner()
    r = cli.invoke(main, ["keygen", str(tmp_path / "keys" / "release")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    priv, pub = tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub"
    assert cli.invoke(main, ["keygen", str(tmp_path / "other")]).exit_code == 0
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")

    def info(*keys):
        return cli.invoke(main, ["info", str(bundle), *[a for k in keys for a in ("--trusted-key", str(k))]])

    assert "signature: unsigned" in info().output
    assert "is not signed" in info(pub).output and info(pub).exit_code == 1
    add_signature(bundle, (bundle / "manifest.json").read_bytes(), priv)
    kid = key_id(_load_public(pub))
    assert f"signature: signed by key {kid}, not checked (pass --trusted-key PUB to check it)" in info().output
    r = info(pub)
    assert r.exit_code == 0 and f"signature: signed by key {kid}, verified with a trusted key" in r.output
    r = info(tmp_path / "other.pub")
    assert r.exit_code == 1 and "not among the trusted keys" in r.output
