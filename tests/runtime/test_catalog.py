"""Reading catalogs: CSV and JSONL agree, image paths resolve, bad rows are named."""

from __future__ import annotations

import json
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
def test_unknown_column_is_refused_naming_column_and_file(tmp_path, fmt):
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
    assert str(list(COLUMNS)) in msg  # lists the known columns


def test_duplicate_column_is_refused(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("image,name,name\na.jpg,tee,shirt\n", encoding="utf-8")
    with pytest.raises(HuseError, match="column 'name' appears twice") as e:
        read_catalog(path)
    assert str(path) in str(e.value)


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
