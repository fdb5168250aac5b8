"""Classifying through the runtime never imports torch, and the import is lean."""

from __future__ import annotations

import subprocess
import sys


def test_classify_never_imports_torch(tiny_bundle, tiny_catalog):
    image = next((tiny_catalog.parent / "images").glob("*.png"))
    code = f"""
import sys
import huse.runtime
from huse.runtime import Classifier
clf = Classifier({str(tiny_bundle)!r})
out = clf.classify(images=[{str(image)!r}], titles=["Acme black tee"])
assert out[0]["mode"] == "fused", out
for mod in ("huse.runtime.cli", "huse.runtime.backends.onnxrt.runner", "huse.runtime.backends.trt.gpu"):
    __import__(mod)
heavy = sorted(m for m in ("torch", "onnx", "polygraphy", "tensorrt", "huse.train", "huse.export") if m in sys.modules)
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cli_help_works_without_heavy_imports():
    code = """
import sys
from click.testing import CliRunner
from huse.runtime.cli import main
r = CliRunner().invoke(main, ["--help"])
assert r.exit_code == 0 and "classify" in r.output and "train" in r.output, r.output
r = CliRunner().invoke(main, ["classify", "--help"])
assert r.exit_code == 0, r.output
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
