"""The arm64 check (benchmarks/arm64): its short form, which CI runs, and the comparison it rests on.

The short form is issue 23's CI bar: fp32, fp16 and int8-cpu, 64 products of the tiny bundle, `huse info`,
`huse classify` and `huse search` under emulated aarch64 (qemu-aarch64-static) against x86 in the
same run. Outside CI it skips, saying why, where QEMU or Debian's arm64 packages are unavailable;
in CI (CI=true) it fails instead, so that a CI machine without them cannot pass by skipping.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess

import pytest

from huse.benchmarks.arm64.check import FP32_SCORE_ATOL, compare_predictions, run_check, sample_catalog
from huse.runtime.errors import HuseError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the arm64 check, and cannot: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def arm64_ready(tmp_path_factory):
    """The aarch64 sysroot and wheels (cached in ~/.cache/huse/arm64 between runs)."""
    if shutil.which("qemu-aarch64-static") is None:
        _skip_or_fail("qemu-aarch64-static is not installed (apt-get install qemu-user-static, or `make arm64-setup`)")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        _skip_or_fail("no apt-get/dpkg: the aarch64 Python comes from Debian's arm64 packages")
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in arches:
        _skip_or_fail("dpkg has no arm64 architecture (as root: `make arm64-setup`)")
    from huse.benchmarks.arm64.env import build_env

    try:
        build_env(tmp_path_factory.mktemp("arm64-setup"), say=lambda s: None)
    except HuseError as e:  # e.g. no route to the Debian mirror or PyPI
        _skip_or_fail(f"the aarch64 environment could not be built: {e}")


@pytest.fixture(scope="module")
def cpu_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with its int8-cpu graphs (the form onnxruntime's Arm and x86 u8s8 kernels run) and
    its fp16 graphs (on a CPU: the fp32 graphs with the fp16 weights)."""
    from huse.export.api import ExportOptions, export

    bundle = tmp_path_factory.mktemp("arm64") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    # The gate is the export's business (tests/export); here only Arm against x86 matters.
    export(bundle, None, ExportOptions(fp16=True, int8_cpu=True, calib_size=64, eval_size=0, engine="skip",
                                       accuracy_gate=False, say=lambda s: None))
    return bundle


def test_short_form_on_emulated_aarch64_matches_x86(arm64_ready, cpu_bundle, tiny_catalog, tmp_path):
    report = run_check(cpu_bundle, tiny_catalog, tmp_path, precisions=("fp32", "fp16", "int8-cpu"), limit=64,
                       say=lambda s: None)
    arm, x86 = report["versions"]["aarch64"], report["versions"]["x86_64"]
    assert arm["machine"] == "aarch64" and x86["machine"] == "x86_64"
    assert arm["heavy_installed"] == []  # the lean runtime alone: no torch, onnx or polygraphy in the aarch64 env
    assert "files verified" in report["info"]["aarch64"] and report["info"]["aarch64"] == report["info"]["x86_64"]
    fp32, int8 = report["precisions"]["fp32"], report["precisions"]["int8-cpu"]
    assert fp32["n"] == 64 and fp32["errors"] == 0
    assert fp32["agreement"] == 100.0 and fp32["max_score_diff"] <= FP32_SCORE_ATOL, fp32
    assert int8["n"] == 64 and int8["agreement"] >= 99.0, int8
    fp16 = report["precisions"]["fp16"]  # the fp32 graphs' kernels on both sides: the x86 answers
    assert fp16["n"] == 64 and fp16["agreement"] == 100.0 and fp16["max_score_diff"] <= FP32_SCORE_ATOL, fp16
    assert report["search"]["passed"] and report["search"]["hits"] > 0, report["search"]
    for graphs in report["kernels"].values():
        for counts in graphs.values():
            assert counts["aarch64"] and counts["x86_64"]
    assert report["passed"]


def _row(label: str, score: float, other: str = "b", other_score: float = 0.1) -> dict:
    return {"row": 0, "label": label, "score": score,
            "top_k": [{"label": label, "score": score}, {"label": other, "score": other_score}]}


def test_comparison_counts_a_changed_top1_and_the_score_difference():
    x86 = [_row("a", 0.9), _row("a", 0.8), _row("c", 0.6, "a", 0.4), _row("a", 0.7)]
    arm = [_row("a", 0.9), _row("a", 0.80005), _row("a", 0.5, "c", 0.45), {"row": 3, "error": "row 3: bad image"}]
    r = compare_predictions(arm, x86)
    assert (r["n"], r["errors"]) == (3, 1)
    assert r["agreement"] == pytest.approx(100 * 2 / 3)
    assert r["max_score_diff"] == pytest.approx(0.15)  # label c: 0.45 on aarch64 vs 0.6 on x86
    assert r["disagreements"][0]["aarch64"][0] == "a" and r["disagreements"][0]["x86"][0] == "c"
    with pytest.raises(HuseError, match="cannot be compared"):
        compare_predictions(arm[:2], x86)


def test_sample_spreads_over_a_sorted_catalog_with_absolute_image_paths(tiny_catalog, tmp_path):
    out = tmp_path / "sample.csv"
    assert sample_catalog(tiny_catalog, out, 8) == 8
    rows = list(csv.DictReader(open(out, newline="")))
    assert len({r["classes"] for r in rows}) == 4  # the tiny catalog is sorted by class, 30 rows each
    assert all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in rows)


def test_a_pin_replaces_only_its_package_and_unknown_ones_are_refused():
    from huse.benchmarks.arm64.env import PINS, with_pins

    pins = with_pins(["onnxruntime==1.23.2"])
    assert "onnxruntime==1.23.2" in pins and len(pins) == len(PINS)
    assert [p for p in pins if not p.startswith("onnxruntime")] == [p for p in PINS if not p.startswith("onnxruntime")]
    with pytest.raises(HuseError, match="torch"):
        with_pins(["torch==2.13.0"])


def test_sample_keeps_the_held_out_split_when_the_catalog_has_one(tmp_path):
    data = tmp_path / "catalog.csv"
    data.write_text("image,name,classes,split\n" + "".join(f"i{i}.png,t{i},a<b,{s}\n" for i, s in
                                                           enumerate(["train", "test", "val", "test"])))
    assert sample_catalog(data, tmp_path / "s.csv", 10, split="test") == 2
    assert {r["name"] for r in csv.DictReader(open(tmp_path / "s.csv", newline=""))} == {"t1", "t3"}
    with pytest.raises(HuseError, match="no rows of split 'holdout'"):
        sample_catalog(data, tmp_path / "s.csv", 10, split="holdout")
