"""`huse-export --dla-core`: what DLA cannot run is refused before any export or build, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from huse.runtime.backends.trt.loader import check_dla, dla_in_tensorrt
from huse.runtime.errors import HuseError


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "huse.export.cli", *args], capture_output=True, text=True, timeout=300)


def test_dla_on_an_fp32_only_export_fails_before_anything_is_built(tiny_run, tmp_path):
    out = _export(str(tiny_run), "--out", str(tmp_path / "bundle"), "--dla-core", "0")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "DLA runs FP16 or INT8 only" in out.stderr and "add --fp16 or --int8" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no bundle, no OUT.partial: refused before the fp32 export


def test_dla_on_an_fp32_bundle_and_a_dynamic_batch_are_refused(tiny_bundle):
    before = (tiny_bundle / "manifest.json").read_bytes()
    out = _export(str(tiny_bundle), "--dla-core", "0")
    assert out.returncode == 1 and "this export has fp32" in out.stderr
    out = _export(str(tiny_bundle), "--dla-core", "0", "--fp16", "--batch", "1:8:64")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "DLA has no dynamic dimensions" in out.stderr and "--batch 8:8:8" in out.stderr
    assert (tiny_bundle / "manifest.json").read_bytes() == before


def test_dla_rule_picks_a_fixed_batch_and_says_which():
    assert check_dla(None, ["fp32"], (1, 8, 64)) == (1, 8, 64)  # no DLA: nothing to check
    assert check_dla(0, ["fp32", "fp16"], None) == (8, 8, 8)
    assert check_dla(1, ["int8"], (4, 4, 4)) == (4, 4, 4)
    with pytest.raises(HuseError, match="DLA cores are numbered from 0"):
        check_dla(-1, ["fp16"], None)


@pytest.mark.parametrize("version, has_dla", [("10.0.1", True), ("10.3.0", True), ("10.7.0", True), ("10.8.0", False),
                                              ("10.16.1", False), ("11.0.0", False), ("11.3.0", False),
                                              ("11.4.0", False), ("11.4.1", True)])
def test_which_tensorrt_releases_have_dla(version, has_dla):
    """NVIDIA's 'Working with DLA' (TensorRT 11.4.1): 10.7 was the last 10.x with DLA, none in 11.0-11.3,
    11.4.0 only on Windows on ARM, 11.4.1 on AGX Orin with JetPack 7.2.2+."""
    assert dla_in_tensorrt(version) is has_dla
