"""--confine-images: for catalogs from third parties, an image path that could leave the images
folder (absolute, '..', a link out) is that row's error, never read and never a failed run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from huse.runtime.catalog import iter_catalog
from huse.runtime.cli import main

ESCAPES = {2: "is absolute", 3: "climbs out with '..'", 4: "resolves (through a link) outside it"}


@pytest.fixture
def hostile(tiny_catalog, tmp_path) -> tuple[Path, Path]:
    """(catalog, images folder): rows 1 and 5 are inside; 2-4 name a real, decodable photo outside it."""
    images = tmp_path / "imgs"
    images.mkdir()
    src = tiny_catalog.parent / "images"
    shutil.copy(src / "img_0_0.png", images / "a.png")
    shutil.copy(src / "img_2_0.png", images / "b.png")
    shutil.copy(src / "img_1_0.png", tmp_path / "secret.png")  # outside: readable if nothing stops it
    (images / "link.png").symlink_to(tmp_path / "secret.png")
    catalog = tmp_path / "third_party.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id"])
        w.writerow(["a.png", "Acme black tee", "clothing<tops<t-shirts", "p1"])
        w.writerow([str(tmp_path / "secret.png"), "Acme navy shirt", "clothing<tops<shirts", "p2"])
        w.writerow(["../secret.png", "Birch black shirt", "clothing<tops<shirts", "p3"])
        w.writerow(["link.png", "Cobalt navy shirt", "clothing<tops<shirts", "p4"])
        w.writerow(["b.png", "Acme black boots", "shoes<boots<ankle boots", "p5"])
    return catalog, images


def test_catalog_refuses_escaping_paths_only_when_asked(hostile):
    catalog, images = hostile
    plain = list(iter_catalog(catalog, images))
    assert [r.error for r in plain] == [None] * 5 and all(Path(r.image).is_file() for r in plain)
    confined = list(iter_catalog(catalog, images, confine=True))
    for r in confined:
        if r.row in ESCAPES:
            assert r.error.startswith(f"row {r.row}, column image: image path ") and ESCAPES[r.row] in r.error, r.error
            assert r.image is None and r.product_id == f"p{r.row}" and r.name  # the rest of the row is kept
        else:
            assert r.error is None and r.image == str(images / ("a.png" if r.row == 1 else "b.png"))


@pytest.mark.parametrize("command", ["classify", "embed"])
def test_cli_confined_rows_get_an_error_and_the_run_completes(command, hostile, tiny_bundle, tmp_path):
    catalog, images = hostile
    out = tmp_path / "out"
    args = [command, str(tiny_bundle), "--data", str(catalog), "--images", str(images), "--format", "jsonl",
            "--no-progress", "--max-error-rate", "1"]
    r = CliRunner().invoke(main, args + ["--out", str(out), "--confine-images"])
    assert r.exit_code == 0, r.output
    assert "3 with errors" in r.output, r.output
    rows = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [row["row"] for row in rows] == [1, 2, 3, 4, 5]  # every row answered, in order
    for row in rows:
        if row["row"] in ESCAPES:
            assert row["error"].startswith(f"row {row['row']}, column image:") and ESCAPES[row["row"]] in row["error"]
        else:
            assert not row.get("error"), row
    # default off: the same catalog is read as given (a catalog of your own may name images anywhere)
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "plain")])
    assert r.exit_code == 0 and "0 with errors" in r.output, r.output


def test_resume_refuses_a_changed_confine_setting(hostile, tiny_bundle, tmp_path):
    from huse.runtime.bulk import BulkJob, run_bulk
    from huse.runtime.errors import HuseError

    catalog, images = hostile
    job = BulkJob(bundle=str(tiny_bundle), data=str(catalog), out=str(tmp_path / "o"), images=str(images),
                  shard_rows=2, max_shards=1, progress=False, format="jsonl")
    run_bulk(job)  # one shard done, then "interrupted"
    with pytest.raises(HuseError, match="confine_images"):
        run_bulk(BulkJob(**{**job.__dict__, "resume": True, "confine_images": True, "max_shards": None}))


def test_index_build_leaves_confined_rows_out_and_lists_them(hostile, tiny_bundle, tmp_path):
    pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")
    from huse.runtime import Index

    catalog, images = hostile
    r = CliRunner().invoke(main, ["index", "build", str(tiny_bundle), "--data", str(catalog), "--images", str(images),
                                  "--out", str(tmp_path / "idx"), "--confine-images"])
    assert r.exit_code == 0, r.output
    idx = Index.open(tmp_path / "idx")
    excluded = {(e["row"], e["modality"]): e["error"] for e in idx.excluded()}
    assert set(excluded) == {(row, m) for row in ESCAPES for m in ("image", "text")}
    assert all(ESCAPES[row] in err for (row, _), err in excluded.items())
    hits = idx.search(texts=["shirt"], k=10, target="product")[0]
    assert sorted(h.row for h in hits) == [1, 5]
    assert "--confine-images" in CliRunner().invoke(main, ["index", "build", "--help"]).output
    assert "Off by default" in CliRunner().invoke(main, ["classify", "--help"]).output
