"""Reading catalogs: CSV and JSONL agree, image paths resolve, bad rows are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from huse.runtime.catalog import COLUMNS, Record, read_catalog
from huse.runtime.errors import HuseError

ROWS = [
    {"image": "img/1.jpg", "name": "Red shirt, cotton", "classes": "clothing<tops", "product_id": "p1", "split": "train"},
    {"image": "", "name": "Blue dress", "classes": "clothing<dresses", "product_id": "p2", "split": "VAL"},
    {"image": "img/3.jpg", "name": "", "classes": "", "product_id": "", "split": ""},
]
CSV_TEXT = (
    "image,name,classes,product_id,split\n"
    'img/1.jpg,"Red shirt, cotton",clothing<tops,p1,train\n'
    ",Blue dress,clothing<dresses,p2,VAL\n"
    "img/3.jpg,,,,\n"
)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _expected(base: Path) -> list[Record]:
    return [
        Record(row=1, image=str(base / "img/1.jpg"), name="Red shirt, cotton", classes="clothing<tops",
               product_id="p1", split="train"),
        Record(row=2, image=None, name="Blue dress", classes="clothing<dresses", product_id="p2", split="val"),
        Record(row=3, image=str(base / "img/3.jpg"), name=None, classes=None, product_id=None, split=None),
    ]


def test_csv_and_jsonl_read_the_same_records(tmp_path):
    csv_path = tmp_path / "cat.csv"
    csv_path.write_text(CSV_TEXT, encoding="utf-8")
    jsonl_path = _write_jsonl(tmp_path / "cat.jsonl", ROWS)
    from_csv, from_jsonl = read_catalog(csv_path), read_catalog(jsonl_path)
    assert from_csv == _expected(tmp_path)
    assert from_jsonl == from_csv


def test_quoted_title_with_commas_is_read_whole(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text('name,classes\n"Shirt, red, size M, ""slim""",a<b\n', encoding="utf-8")
    [r] = read_catalog(path)
    assert r.name == 'Shirt, red, size M, "slim"'
    assert r.classes == "a<b"


def test_relative_images_resolve_against_images_folder(tmp_path):
    path = tmp_path / "data" / "cat.csv"
    path.parent.mkdir()
    path.write_text("image,name\nsub/x.jpg,tee\n", encoding="utf-8")
    assert read_catalog(path)[0].image == str(tmp_path / "data" / "sub" / "x.jpg")
    photos = tmp_path / "photos"
    assert read_catalog(path, images=photos)[0].image == str(photos / "sub" / "x.jpg")
    assert read_catalog(path, images=str(photos))[0].image == str(photos / "sub" / "x.jpg")


def test_absolute_image_paths_are_kept(tmp_path):
    absolute = tmp_path / "elsewhere" / "x.png"
    path = _write_jsonl(tmp_path / "cat.jsonl", [{"image": str(absolute), "name": "tee"}])
    assert read_catalog(path, images=tmp_path / "photos")[0].image == str(absolute)


def test_image_path_spaces_are_trimmed(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name\n  a.jpg  ,tee\n   ,hat\n", encoding="utf-8")
    assert [r.image for r in read_catalog(path)] == [str(tmp_path / "a.jpg"), None]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_column_named_as_other_catalogs_name_a_missing_one_is_refused(tmp_path, fmt):
    """`title` without `name`: read silently as absent, every product would be classified by photo alone."""
    path = tmp_path / f"cat.{fmt}"
    if fmt == "csv":
        path.write_text("image,title\na.jpg,tee\n", encoding="utf-8")
    else:
        _write_jsonl(path, [{"image": "a.jpg", "title": "tee"}])
    with pytest.raises(HuseError) as e:
        read_catalog(path)
    msg = str(e.value)
    assert "'title'" in msg
    assert str(path) in msg
    assert str(list(COLUMNS)) in msg  # lists the columns huse reads
    assert "did you mean 'name'? The file has no 'name' column: rename this one" in msg


@pytest.mark.parametrize("col, meant", [("Image", "image"), ("Product ID", "product_id"), ("category", "classes"),
                                        ("sku", "product_id"), ("clases", "classes"), ("imgae", "image"),
                                        ("Image URL", "image"), ("splits", "split")])
def test_a_column_that_looks_like_a_missing_one_names_the_one_it_likely_means(tmp_path, col, meant):
    path = tmp_path / "cat.csv"
    path.write_text(f"name,{col}\ntee,x\n", encoding="utf-8")
    with pytest.raises(HuseError, match=f"column '{col}' is not one huse reads; did you mean '{meant}'"):
        read_catalog(path)


SHOP_CSV = (  # CSV_TEXT as a shop system exports it: a pandas index, price, brand, a quoted description
    ",image,brand,name,price,classes,product_id,split,description,title\n"
    '0,img/1.jpg,Acme,"Red shirt, cotton",9.99,clothing<tops,p1,train,"Soft, warm",Red shirt\n'
    "1,,Acme,Blue dress,19.50,clothing<dresses,p2,VAL,,\n"
    "2,img/3.jpg,,,,,,,,\n"
)


def test_columns_huse_does_not_read_are_ignored(tmp_path):
    """A catalog exported as it is, with price, brand, a description, a pandas index and a `title` beside
    `name`, reads the same records as the file with only huse's columns: as CSV, JSON Lines and Parquet."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    shop = tmp_path / "shop.csv"
    shop.write_text(SHOP_CSV, encoding="utf-8")
    want = _expected(tmp_path)
    assert read_catalog(shop) == want
    rows = [dict(r, brand="Acme", price=9.99, tags=["a", "b"], variants={"size": "M"}) for r in ROWS]
    assert read_catalog(_write_jsonl(tmp_path / "shop.jsonl", rows)) == want
    # Parquet: the other columns are never decoded (a list or struct column would be no row's error either)
    table = pa.Table.from_pylist([{k: (v or None) if isinstance(v, str) else v for k, v in r.items()} for r in rows])
    pq.write_table(table, tmp_path / "shop.parquet")
    assert read_catalog(tmp_path / "shop.parquet") == want


def test_the_ignored_columns_are_named_with_verbose_logging(tmp_path, caplog):
    shop = tmp_path / "shop.csv"
    shop.write_text(SHOP_CSV, encoding="utf-8")
    with caplog.at_level("INFO", logger="huse.runtime"):
        read_catalog(shop)
    assert f"{shop}: columns huse does not read, ignored: '', 'brand', 'price', 'description', 'title'" in caplog.text


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_semicolon_and_tab_separated_catalogs_read_like_commas(tmp_path, delimiter):
    """What spreadsheets export in many locales (';'), and .tsv files; streamed shards agree too."""
    import csv as _csv

    path = tmp_path / "cat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = _csv.DictWriter(f, list(ROWS[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(ROWS)
    assert read_catalog(path) == _expected(tmp_path)  # "Red shirt, cotton" keeps its comma
    with open(path, "a", encoding="utf-8") as f:
        f.write(delimiter.join(["a.jpg", "tee", "x<y"]) + "\n")  # a field short
    assert "has 3 fields, the header has 5" in list(iter_catalog(path))[-1].error
    assert [r for s in plan_shards(path, 2) for r in iter_catalog(path, shard=s)] == list(iter_catalog(path))


def test_duplicate_column_is_refused(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name,name\na.jpg,tee,shirt\n", encoding="utf-8")
    with pytest.raises(HuseError, match="column 'name' appears twice") as e:
        read_catalog(path)
    assert str(path) in str(e.value)
    # a column huse does not read may repeat (spreadsheets export one per variant)
    path.write_text("image,name,size,size\na.jpg,tee,S,M\n", encoding="utf-8")
    assert [r.name for r in read_catalog(path)] == ["tee"]


def test_wrong_number_of_fields_names_the_row(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name\na.jpg,tee\nb.jpg,Shirt, red\n", encoding="utf-8")
    with pytest.raises(HuseError) as e:
        read_catalog(path)
    msg = str(e.value)
    assert f"{path}, row 2:" in msg
    assert "has 3 fields, the header has 2" in msg
    assert "quote titles that contain commas" in msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bad_split_names_the_row(tmp_path, fmt):
    path = tmp_path / f"cat.{fmt}"
    rows = [{"name": "a", "split": "train"}, {"name": "b", "split": "test"}, {"name": "c", "split": "holdout"}]
    if fmt == "csv":
        path.write_text("name,split\na,train\nb,test\nc,holdout\n", encoding="utf-8")
    else:
        _write_jsonl(path, rows)
    with pytest.raises(HuseError) as e:
        read_catalog(path)
    msg = str(e.value)
    assert f"{path}, row 3:" in msg
    assert "'holdout'" in msg
    assert "['train', 'val', 'test']" in msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_row_numbers_agree_across_errors_when_blank_lines_are_present(tmp_path, fmt):
    # A blank line must not shift the row number: the structural error (wrong field
    # count / invalid JSON) and a value error (bad split) name a row the same way,
    # and Record.row (used by huse-train's bad-row report) agrees with both.
    path = tmp_path / f"cat.{fmt}"
    if fmt == "csv":
        path.write_text("name,split\na,train\n\nb,test\n", encoding="utf-8")
        broken = "name,split\na,train\n\nb,test,extra\n"
        bad_split = "name,split\na,train\n\nb,holdout\n"
    else:
        path.write_text('{"name": "a", "split": "train"}\n\n{"name": "b", "split": "test"}\n', encoding="utf-8")
        broken = '{"name": "a", "split": "train"}\n\n{"name": "b", "split": \n'
        bad_split = '{"name": "a", "split": "train"}\n\n{"name": "b", "split": "holdout"}\n'
    structural_row = 3
    assert [r.row for r in read_catalog(path)] == [1, structural_row]
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(HuseError, match=f", row {structural_row}:"):
        read_catalog(path)
    path.write_text(bad_split, encoding="utf-8")
    with pytest.raises(HuseError, match=f", row {structural_row}: split 'holdout'"):
        read_catalog(path)


def test_require_missing_column_is_refused(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name\na.jpg,tee\n", encoding="utf-8")
    assert len(read_catalog(path)) == 1
    with pytest.raises(HuseError) as e:
        read_catalog(path, require=("classes",))
    msg = str(e.value)
    assert str(path) in msg
    assert "['classes'] are required" in msg
    assert "['image', 'name']" in msg  # what the file has


def test_require_present_column_passes(tmp_path):
    path = _write_jsonl(tmp_path / "cat.jsonl", [{"name": "tee", "classes": "a<b"}])
    assert read_catalog(path, require=("classes",))[0].classes == "a<b"


def test_file_without_image_or_name_is_refused(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("classes,product_id\na<b,p1\n", encoding="utf-8")
    with pytest.raises(HuseError, match="needs an 'image' or a 'name' column"):
        read_catalog(path)


def test_invalid_json_line_names_the_row(tmp_path):
    path = tmp_path / "cat.jsonl"
    path.write_text('{"name": "a"}\n{"name": "b"}\n{"name": "c",}\n', encoding="utf-8")
    with pytest.raises(HuseError) as e:
        read_catalog(path)
    msg = str(e.value)
    assert f"{path}, row 3:" in msg
    assert "not valid JSON" in msg


def test_json_line_that_is_not_an_object_names_the_row(tmp_path):
    path = tmp_path / "cat.jsonl"
    path.write_text('{"name": "a"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(HuseError, match=r", row 2: expected a JSON object"):
        read_catalog(path)


def test_missing_catalog_is_refused_naming_it(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(HuseError, match="does not exist") as e:
        read_catalog(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_utf8_bom_is_accepted(tmp_path, fmt):
    # Excel's "CSV UTF-8" and some exporters start the file with a byte-order mark.
    path = tmp_path / f"cat.{fmt}"
    text = "image,name\na.jpg,Tee 東京\n" if fmt == "csv" else '{"image": "a.jpg", "name": "Tee 東京"}\n'
    path.write_text(text, encoding="utf-8-sig")
    assert read_catalog(path) == [Record(row=1, image=str(tmp_path / "a.jpg"), name="Tee 東京")]


def test_header_only_csv_is_empty(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name,classes\n", encoding="utf-8")
    assert read_catalog(path) == []


# -- streaming and per-row errors (issue 11/12): a bad value is that row's error, never the file's

from huse.runtime.catalog import count_rows, iter_catalog, plan_shards  # noqa: E402


def test_malformed_jsonl_values_are_row_errors_naming_row_and_column(tmp_path):
    path = tmp_path / "cat.jsonl"
    lines = ['{"image": "a.jpg", "name": "ok"}', '{"name": ["a", "list"]}', '{"name": "x", "image": 7}',
             '{"name": true}', '{"name": "\\ud800 lone"}', '{"name": "b",}', '["c"]', '{"name": "ok", "product_id": 42}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recs = list(iter_catalog(path))
    assert [r.row for r in recs] == list(range(1, 9))  # every row answered, in order
    errors = {r.row: r.error for r in recs}
    assert errors[1] is None and errors[8] is None and recs[7].product_id == "42"
    assert errors[2].startswith("row 2, column name: expected text, got list")
    assert errors[3].startswith("row 3, column image: expected text, got int")
    assert errors[4].startswith("row 4, column name: expected text, got bool")
    assert errors[5].startswith("row 5, column name: invalid text, a lone surrogate U+D800")
    assert errors[6].startswith("row 6: not valid JSON")
    assert errors[7] == "row 7: expected a JSON object"


def test_a_1mb_title_is_read_not_the_files_failure(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text(f"image,name\na.jpg,{'x' * 1_000_000}\nb.jpg,tee\n", encoding="utf-8")
    recs = list(iter_catalog(path))
    assert [len(r.name) for r in recs] == [1_000_000, 3] and not any(r.error for r in recs)


def test_wrong_field_count_is_a_row_error_when_streaming(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name\na.jpg,tee\nb.jpg,Shirt, red\nc.jpg,hat\n", encoding="utf-8")
    recs = list(iter_catalog(path))
    assert [r.error is None for r in recs] == [True, False, True] and "row 2:" in recs[1].error


def test_latin1_and_utf16_are_detected_and_read_with_encoding(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,name\na.jpg,Café crème\n".encode("latin-1"))
    with pytest.raises(HuseError, match="not UTF-8 .*byte 0xe9 on line 2.*--encoding latin-1"):
        list(iter_catalog(latin))
    assert [r.name for r in iter_catalog(latin, encoding="latin-1")] == ["Café crème"]
    utf16 = tmp_path / "u16.csv"
    utf16.write_text("image,name\na.jpg,Tee 東京\n", encoding="utf-16")
    with pytest.raises(HuseError, match="looks like UTF-16.*--encoding utf-16"):
        list(iter_catalog(utf16))
    assert [r.name for r in iter_catalog(utf16, encoding="utf-16")] == ["Tee 東京"]


def test_bad_bytes_past_the_sniffed_start_are_row_errors(tmp_path):
    path = tmp_path / "cat.csv"
    good = "".join(f"{i}.jpg,tee {i}\n" for i in range(5000))  # > 64 KiB of clean UTF-8 first
    path.write_bytes(b"image,name\n" + good.encode() + b"z.jpg,caf\xe9\nlast.jpg,ok\n")
    recs = list(iter_catalog(path))
    assert len(recs) == 5002
    assert recs[5000].error.startswith("row 5001, column name: invalid text, undecodable byte 0xe9")
    assert recs[5001].error is None and recs[5001].name == "ok"


def test_parquet_reads_like_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    csv_path = tmp_path / "cat.csv"
    csv_path.write_text(CSV_TEXT, encoding="utf-8")
    table = pa.Table.from_pylist([{k: (v or None) for k, v in r.items()} for r in ROWS])
    pq.write_table(table, tmp_path / "cat.parquet")
    assert read_catalog(tmp_path / "cat.parquet") == read_catalog(csv_path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_shards_read_from_their_offsets_equal_the_stream(tmp_path, fmt):
    rows = [{"image": f"{i}.jpg", "name": f'tee "{i}",\nline two' if i % 7 == 0 else f"tee {i}"} for i in range(103)]
    path = tmp_path / f"cat.{fmt}"
    if fmt == "csv":
        import csv as _csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = _csv.DictWriter(f, ["image", "name"])
            w.writeheader()
            w.writerows(rows)
            f.write("\n")  # a blank line still counts as a row
            w.writerow({"image": "last.jpg", "name": "last"})
    elif fmt == "jsonl":
        _write_jsonl(path, rows)
        with open(path, "a") as f:
            f.write("\n" + json.dumps({"image": "last.jpg", "name": "last"}) + "\n")
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        pa = pytest.importorskip("pyarrow")
        pq.write_table(pa.Table.from_pylist(rows + [{"image": "last.jpg", "name": "last"}]), path, row_group_size=16)
    whole = list(iter_catalog(path))
    shards = plan_shards(path, 10)
    assert [s.count for s in shards] == [10] * 10 + [4]
    assert [r for s in shards for r in iter_catalog(path, shard=s)] == whole
    assert whole[-1].name == "last" and count_rows(path) >= len(whole) - 1


def test_streaming_memory_does_not_grow_with_rows(tmp_path):
    import tracemalloc

    def peak(n: int) -> int:
        path = tmp_path / f"{n}.csv"
        with open(path, "w", encoding="utf-8") as f:
            f.write("image,name,classes\n")
            for i in range(n):
                f.write(f"img/{i}.jpg,Acme navy tee number {i},clothing<tops<t-shirts\n")
        tracemalloc.start()
        assert sum(1 for _ in iter_catalog(path)) == n
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, large = peak(5_000), peak(50_000)
    assert large < 1.2 * small + 100_000, (small, large)  # a list of 50k Records alone is ~15 MB


@pytest.mark.parametrize("form", ["binary", "struct"])
def test_parquet_may_hold_the_photos_themselves(tmp_path, form):
    """Hugging Face `datasets` and data lakes keep photos inside the Parquet file: the records carry
    the bytes, everything else reads as from paths, and an empty photo is that row's error."""
    pq = pytest.importorskip("pyarrow.parquet")
    from tests.models.make_data import make_catalog, photos_in_parquet

    catalog = make_catalog(tmp_path, per_class=2)
    by_path = read_catalog(catalog)
    held = read_catalog(photos_in_parquet(catalog, tmp_path / "held.parquet", form))
    assert [r.image for r in held] == [Path(r.image).read_bytes() for r in by_path]
    assert [(r.row, r.name, r.classes, r.product_id, r.split) for r in held] == \
        [(r.row, r.name, r.classes, r.product_id, r.split) for r in by_path]
    table = pq.read_table(tmp_path / "held.parquet").to_pylist()
    table[1]["image"] = b"" if form == "binary" else {"bytes": b"", "path": "x.png"}
    table[2]["image"] = None if form == "binary" else {"bytes": None, "path": "images/gone.png"}  # path fallback
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "bad.parquet")
    recs = list(iter_catalog(tmp_path / "bad.parquet"))
    assert recs[1].error == "row 2, column image: the photo's bytes are empty"
    assert recs[2].image == (None if form == "binary" else str(tmp_path / "images" / "gone.png"))
    assert recs[0].error is None and recs[0].image == held[0].image


@pytest.mark.parametrize("name, says", [
    ("catalog.xlsx", "is a spreadsheet workbook: save it as CSV (UTF-8)"),
    ("catalog.csv.gz", "is compressed: decompress it first"),
    ("catalog.json", "is one JSON array; huse reads JSON Lines, one object per line"),
])
def test_files_that_are_not_catalogs_say_what_they_are(tmp_path, name, says):
    """Read as CSV, each gave a misleading error (an unknown column, 'looks like UTF-16')."""
    path = tmp_path / name
    path.write_bytes(b'[{"image": "a.png", "name": "tee"}]' if name.endswith(".json") else b"PK\x03\x04\x00\x00")
    with pytest.raises(HuseError, match=re.escape(f"catalog {path} {says}")):
        read_catalog(path)


def test_json_lines_named_json_read_as_jsonl(tmp_path):
    rows = [{"image": "a.png", "name": "tee", "classes": "a<b"}, {"image": "b.png", "name": "shirt", "classes": "a<c"}]
    _write_jsonl(tmp_path / "c.jsonl", rows)
    (tmp_path / "c.json").write_bytes((tmp_path / "c.jsonl").read_bytes())
    assert read_catalog(tmp_path / "c.json") == read_catalog(tmp_path / "c.jsonl")
