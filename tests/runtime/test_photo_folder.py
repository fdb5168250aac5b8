"""`huse data catalog FOLDER`: a folder of photos becomes a catalog that every command reads."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from huse.runtime.catalog import read_catalog
from huse.runtime.cli import main
from huse.runtime.errors import HuseError
from huse.runtime.photo_folder import write_folder_catalog


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _image_folder(catalog: Path, folder: Path) -> list[dict[str, str]]:
    """The catalog's photos laid out as torchvision's ImageFolder does (one folder per class level), each
    titled by a .txt beside it; returns the rows in the order the folder lists them."""
    rows = list(csv.DictReader(open(catalog, newline="")))
    for r in rows:
        target = folder.joinpath(*r["classes"].split("<")) / Path(r["image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(catalog.parent / r["image"], target)
        if r["name"]:
            target.with_suffix(".txt").write_text(r["name"] + "\n", encoding="utf-8")
        r["image"] = target.relative_to(folder).as_posix()
    return sorted(rows, key=lambda r: r["image"].split("/"))


def test_an_image_folder_classifies_as_its_catalog_does(tiny_bundle, tiny_catalog, tmp_path):
    """Same photos, titles and classes as the catalog file, so the same predictions and accuracy."""
    folder = tmp_path / "photos"
    rows = _image_folder(tiny_catalog, folder)
    r = _run("data", "catalog", folder, "--classes-from-folders")
    assert r.exit_code == 0, r.output
    titled = sum(bool(x["name"]) for x in rows)
    assert f"wrote {folder / 'catalog.csv'}: {len(rows)} photos, {titled} with a title, 4 classes from their folders" \
        in r.output
    got = list(csv.DictReader(open(folder / "catalog.csv", newline="")))
    assert [(g["image"], g["name"], g["classes"]) for g in got] == [(x["image"], x["name"], x["classes"]) for x in rows]
    want = tmp_path / "want.csv"
    with open(want, "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "name", "classes"])
        w.writeheader()
        w.writerows({k: x[k] for k in ("image", "name", "classes")} for x in rows)
    for data, out in ((folder / "catalog.csv", "a.jsonl"), (want, "b.jsonl")):
        r = _run("classify", tiny_bundle, "--data", data, "--images", folder, "--out", tmp_path / out, "--no-progress")
        assert r.exit_code == 0 and "0 with errors, 0 with warnings" in r.output, r.output
    a, b = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl"))
    assert [(x["label"], x["score"], x["classes"]) for x in a] == [(x["label"], x["score"], x["classes"]) for x in b]


def test_titles_from_file_names_hidden_files_heic_and_other_files(tmp_path, tiny_catalog):
    folder = tmp_path / "photos"
    (folder / ".thumbs").mkdir(parents=True)
    png = next((tiny_catalog.parent / "images").glob("*.png"))
    for name in ("black-leather_boot.png", ".hidden.png", ".thumbs/x.png", "titled.PNG"):
        shutil.copy(png, folder / name)
    (folder / "titled.txt").write_text("  Red   wool\nscarf ", encoding="utf-8")
    for name in ("a.heic", "b.HEIF", "notes.json", "README"):
        (folder / name).write_bytes(b"x")
    done = write_folder_catalog(folder, names_from_file_names=True)
    rows = list(csv.DictReader(open(folder / "catalog.csv", newline="")))
    assert rows == [{"image": "black-leather_boot.png", "name": "black leather boot"},
                    {"image": "titled.PNG", "name": "Red wool scarf"}]
    assert (done.photos, done.titled, done.heif, done.other) == (2, 2, 2, {".json": 1, "(none)": 1})
    r = _run("data", "catalog", folder, "--out", tmp_path / "plain.csv")  # no names from file names: untitled
    assert r.exit_code == 0, r.output
    assert "1 photo has no title: classified by photo alone" in r.output
    assert "skipped 2 HEIC/HEIF photos: Pillow does not read HEIC; convert them to JPEG" in r.output
    # the first catalog.csv is a file like any other there
    assert "skipped 3 files without a photo's suffix ((none) 1, .csv 1, .json 1)" in r.output
    # photos outside the catalog's folder are named by absolute paths, and resolve
    assert [rec.image for rec in read_catalog(tmp_path / "plain.csv")] == \
        [str(folder.resolve() / "black-leather_boot.png"), str(folder.resolve() / "titled.PNG")]


def test_the_summary_counts_one_of_a_kind_in_the_singular(tmp_path, tiny_catalog):
    folder = tmp_path / "photos"
    (folder / "shoes").mkdir(parents=True)
    png = next((tiny_catalog.parent / "images").glob("*.png"))
    shutil.copy(png, folder / "shoes" / "boot.png")
    shutil.copy(png, folder / "loose.png")
    for name in ("a.heic", "notes.json"):
        (folder / name).write_bytes(b"x")
    r = _run("data", "catalog", folder, "--classes-from-folders")
    assert r.exit_code == 0, r.output
    assert f"wrote {folder / 'catalog.csv'}: 2 photos, 0 with a title, 1 class from their folders" in r.output
    for line in ("note: 1 photo at the top of the folder has no class", "note: 2 photos have no title",
                 "skipped 1 HEIC/HEIF photo:", "skipped 1 file without a photo's suffix (.json 1)"):
        assert line in r.output, r.output


def test_refusals_name_what_to_do(tmp_path, tiny_catalog):
    folder = tmp_path / "photos"
    (folder / "shoes>boots").mkdir(parents=True)
    (folder / "a.heic").write_bytes(b"x")
    with pytest.raises(HuseError, match=r"no photos under .*; 1 HEIC/HEIF photo: convert them to JPEG"):
        write_folder_catalog(folder)
    assert not (folder / "catalog.csv").exists() and not list(folder.glob(".catalog.csv*"))
    shutil.copy(next((tiny_catalog.parent / "images").glob("*.png")), folder / "shoes>boots" / "x.png")
    with pytest.raises(HuseError, match=r"folder .*shoes>boots: its name cannot be a class level as it is"):
        write_folder_catalog(folder, classes_from_folders=True)
    write_folder_catalog(folder)  # without classes the folder's name does not matter
    with pytest.raises(HuseError, match=r"catalog.csv exists; choose another --out"):
        write_folder_catalog(folder)
    with pytest.raises(HuseError, match="is not a folder of photos"):
        write_folder_catalog(tmp_path / "nowhere")


@pytest.mark.parametrize("command", [["classify", "BUNDLE", "--out", "o.jsonl"], ["embed", "BUNDLE", "--out", "o"],
                                     ["index", "build", "BUNDLE", "--out", "idx"], ["train", "--out", "run"]])
def test_a_folder_given_as_the_catalog_names_the_command_that_makes_one(tiny_bundle, tmp_path, command):
    args = [tiny_bundle if a == "BUNDLE" else tmp_path / a if a in ("o.jsonl", "o", "idx", "run") else a for a in command]
    r = _run(*args, "--data", tmp_path)
    assert r.exit_code == 1, r.output
    assert f"catalog {tmp_path} is a folder; huse reads a catalog file (CSV, JSON Lines or Parquet). For a folder of " \
           f"photos, write one first: huse data catalog {tmp_path}" in r.output
