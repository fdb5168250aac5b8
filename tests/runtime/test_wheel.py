"""`pip install huse-edge` gets everything the commands read from the package: a wheel built from this tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_page_and_the_triton_template_under_one_namespace(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    # setuptools ships a folder that Python can import only if `packages` lists it, and says so in a warning
    # (today's wheel holds the files anyway; a later setuptools drops them).
    assert "BuildBackendWarning" not in build.stdout + build.stderr, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("huse_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("huse/runtime/serve/static/index.html", "huse/runtime/serve/static/app.js",
                 "huse/runtime/serve/static/app.css", "huse/export/triton_model/model.py",
                 "huse/runtime/serve/app.py", "huse/train/trainer.py", "huse/benchmarks/arm64/check.py"):
        assert name in names, f"{name} is missing from {wheel.name}"
    tops = {n.split("/")[0] for n in names if not n.startswith("huse_edge-")}
    assert tops == {"huse"}, tops  # no top-level `train`, `runtime` or `export` module
