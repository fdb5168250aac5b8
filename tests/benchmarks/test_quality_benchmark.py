"""The quality benchmark and the catalog converter, on tiny inputs."""

from __future__ import annotations

import json

from click.testing import CliRunner


def test_quality_benchmark_tabulates_huse_against_the_baseline(tiny_catalog, tmp_path):
    from huse.benchmarks.quality import main

    args = ["--catalog", f"tiny={tiny_catalog}", "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    for a in ("--backbone=tiny", "--image-size=32", "--embed-dim=32", "--epochs=3", "--text-encoder=cnn"):
        args += ["--train-arg", a]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads(next((tmp_path / "out").glob("quality-*.json")).read_text())
    row = result["rows"][0]
    assert row["catalog"] == "tiny" and row["text_encoder"] == "cnn"
    for mode in ("fused", "image", "text"):
        assert abs(row[f"diff_{mode}"] - (row[f"huse_{mode}"] - row[f"baseline_{mode}"])) < 1e-12
        assert 0 <= row[f"baseline_defaults_{mode}"] <= 1
    assert row["baseline_settings"]["folds"] == 5
    # huse-train's defaults on a small catalog: settings from 5 folds, the shipped model refitted on train + val and
    # scored on test beside the tuned LR fitted on the same rows
    assert row["cv"]["folds"] == 5 and row["final_fit"]["splits"] == ["train", "val"]
    assert 0 <= row["refit_fused"] <= 1 and 0 <= row["refit_baseline_fused"] <= 1
    assert "| tiny |" in r.output and "LR C=1" in r.output
    # A second run reuses the finished training run instead of training again.
    stamp = (tmp_path / "runs" / result["recipe"] / "tiny" / "wall_s.txt").stat().st_mtime_ns
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (tmp_path / "runs" / result["recipe"] / "tiny" / "wall_s.txt").stat().st_mtime_ns == stamp


SOURCE = '''var t = 1, e = /* @__PURE__ */ ((i) => (i.ARROWS = "arrows", i.OFFICE = "office", i))(e || {}), a = /* @__PURE__ */ ((i) => (i.ARROWS = "arrows", i.OFFICE = "office & editing", i))(a || {});
const n = [
  {
    name: "arrow-up",
    pascal_name: "ArrowUp",
    categories: [e.ARROWS],
    figma_category: a.ARROWS,
    tags: ["up"],
  },
  {
    name: "pencil-simple",
    pascal_name: "PencilSimple",
    alias: { name: "pencil", pascal_name: "Pencil" },
    categories: [e.OFFICE, e.ARROWS],
    figma_category: a.OFFICE,
    tags: ["write"],
  },'''


def test_phosphor_metadata_parses_into_two_level_classes():
    from huse.benchmarks.catalogs import _ENTRY, _enum, _split

    figma, cats = _enum(SOURCE, "a"), _enum(SOURCE, "e")
    assert figma == {"ARROWS": "arrows", "OFFICE": "office & editing"} and cats["OFFICE"] == "office"
    entries = _ENTRY.findall(SOURCE)
    assert [(name, fig) for name, _, fig in entries] == [("arrow-up", "ARROWS"), ("pencil-simple", "OFFICE")]
    assert entries[1][1].split(",")[0].strip() == "e.OFFICE"  # the first category is the second level
    assert _split("arrow-up", 0) == _split("arrow-up", 0) in ("train", "val", "test")


def test_pick_products_drops_small_classes_and_caps_large_ones():
    from huse.benchmarks.catalogs import MAX_PRODUCTS, MIN_PRODUCTS, pick_products

    icons = [(f"big-{i}", "big") for i in range(3 * MAX_PRODUCTS)] + [(f"small-{i}", "small") for i in range(MIN_PRODUCTS - 1)]
    icons += [(f"ok-{i}", "ok") for i in range(MIN_PRODUCTS)]
    picked = pick_products(icons, seed=0)
    assert set(picked) == {"big", "ok"} and len(picked["big"]) == MAX_PRODUCTS and len(picked["ok"]) == MIN_PRODUCTS
    assert picked == pick_products(list(reversed(icons)), seed=0)  # the pick depends on the seed, not the order
    assert picked["big"] != pick_products(icons, seed=1)["big"]


def test_write_catalog_rasterises_every_view_and_keeps_a_product_in_one_split(tmp_path):
    import csv

    import numpy as np
    import pytest
    from PIL import Image

    pytest.importorskip("resvg_py")
    from huse.benchmarks.catalogs import RASTER, write_catalog

    def square(width):
        return lambda name: (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#000" '
                             f'stroke-width="{width}"><rect x="4" y="4" width="16" height="16"/></svg>')

    path = write_catalog(tmp_path, {"a<b": ["box-one", "box-two"]}, {"thin": square(1), "bold": square(3)}, seed=0)
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    assert [(r["name"], r["classes"]) for r in rows] == [("box one", "a<b")] * 2 + [("box two", "a<b")] * 2
    assert len({r["split"] for r in rows if r["product_id"] == "box-one"}) == 1
    thin, bold = (Image.open(tmp_path / rows[k]["image"]) for k in (0, 1))
    assert thin.size == (RASTER, RASTER)
    ink = [(np.asarray(im.convert("RGBA"))[..., 3] > 0).sum() for im in (thin, bold)]
    assert ink[1] > ink[0] > 0  # the views differ as drawn


def test_mdi_icons_multi_lists_every_kept_tag_of_an_icon(tmp_path):
    import csv

    import pytest

    pytest.importorskip("resvg_py")
    from huse.benchmarks.catalogs import MDI, MIN_PRODUCTS, mdi_icons_multi

    # a package folder as `npm pack` leaves it in the cache (_fetch reuses it)
    pkg = tmp_path / "cache" / MDI.replace("/", "_").replace("@", "") / "package"
    (pkg / "svg").mkdir(parents=True)
    tags = {f"bank-{i}": ["Banking"] for i in range(MIN_PRODUCTS)}
    tags.update({f"cart-{i}": ["Shopping", "Banking"] if i < 3 else ["Shopping"] for i in range(MIN_PRODUCTS)})
    tags["coin-odd"] = ["Banking", "Rare"]  # "Rare" has too few icons to be a class: left out of the set
    tags["smile"] = ["Emoji", "Banking"]  # emoji-like icons are never used
    meta = []
    for name, t in tags.items():
        for n in (name, f"{name}-outline"):
            meta.append({"name": n, "tags": t, "deprecated": False})
            (pkg / "svg" / f"{n}.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">'
                                                  '<rect x="4" y="4" width="16" height="16"/></svg>')
    (pkg / "meta.json").write_text(json.dumps(meta))
    path = mdi_icons_multi(tmp_path / "cat", cache=tmp_path / "cache")
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    classes = {r["product_id"]: r["classes"] for r in rows}
    assert len(rows) == 2 * len(classes)  # filled and outline
    assert classes["cart-0"] == "banking|shopping" and classes["cart-5"] == "shopping"
    assert classes["coin-odd"] == "banking" and "smile" not in classes


def test_multilabel_benchmark_scores_the_shipped_refit_against_the_lr_on_the_same_rows(tiny_multi_catalog, tmp_path):
    from huse.benchmarks.multilabel import main

    args = ["--catalog", str(tiny_multi_catalog), "--name", "tiny", "--work", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--precision", "fp16"]
    for a in ("--backbone=tiny", "--epochs=3", "--cv-folds=3"):
        args += ["--train-arg", a]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "out" / "tiny.json").read_text())
    m = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    ff = m["final_fit"]
    assert result["shipped"] == {"rows": ["train", "val"], "epochs": m["cv"]["epochs"], "cv_folds": 3,
                                 "thresholds_from": "out-of-fold predictions"}
    # the bars compare the refit with the LR fitted on the same rows, not the held-out pair
    assert result["run_test"] == {"huse": ff["test"], "baseline": ff["baseline_test"]}
    assert result["held_out_test"] == {"huse": m["test"], "baseline": m["baseline"]["test"]}
    bar = result["bars"]["micro_f1"]
    assert bar["baseline"] == ff["baseline_test"]["fused"]["micro_f1"]
    # the bundle is the refit read at the shipped thresholds: the runtime gives the run's own test figures
    for key in ("micro_f1", "map"):
        assert abs(result["runtime_test_fused"]["fp32"][key] - ff["test"]["fused"][key]) < 1e-6
    assert "one-vs-rest LR fitted on train + val" in r.output and "3-fold out-of-fold predictions" in r.output
