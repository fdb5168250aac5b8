"""lazy_import: a missing heavy module names itself and the extra that installs it."""

from __future__ import annotations

import sys

import pytest

from huse.runtime._lazy import lazy_import
from huse.runtime.errors import HuseError


def test_missing_module_names_module_and_extra():
    name = "huse_edge_no_such_module_xyz"
    with pytest.raises(HuseError) as e:
        lazy_import(name, "ort")
    msg = str(e.value)
    assert f"{name} is needed here but could not be imported" in msg
    assert "ModuleNotFoundError" in msg  # the original error is kept in the message
    assert "`pip install 'huse-edge[ort]'`" in msg
    assert isinstance(e.value.__cause__, ModuleNotFoundError)


def test_broken_module_is_reported_the_same_way(monkeypatch):
    # A native library that fails to load raises OSError or similar, not ImportError.
    class Broken:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "huse_edge_broken_native":
                raise OSError("libcudart.so.12: cannot open shared object file")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(HuseError) as e:
        lazy_import("huse_edge_broken_native", "trt")
    msg = str(e.value)
    assert "huse_edge_broken_native" in msg
    assert "OSError: libcudart.so.12" in msg
    assert "`pip install 'huse-edge[trt]'`" in msg


def test_present_module_is_returned():
    import json

    assert lazy_import("json", "ort") is json


# A fresh interpreter in which `import torch` fails as it does where the [train] extra is missing.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from huse.runtime import cli
sys.argv = [sys.argv[1], *sys.argv[2:]]
getattr(cli, sys.argv[0])()
"""


def run_without_torch(entry: str, *args: str):
    import subprocess

    return subprocess.run([sys.executable, "-c", NO_TORCH, entry, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry, args", [("main", ["train"]), ("train_main", [])])
def test_train_without_torch_is_one_line_naming_the_extra(tmp_path, entry, args):
    r = run_without_torch(entry, *args, "--dataset", "fashion-products", "--out", str(tmp_path / "run"))
    assert r.returncode == 1, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr  # one line, no traceback
    assert r.stderr.startswith("error: `huse train` needs the train extra")
    assert "No module named 'torch'" in r.stderr and "pip install 'huse-edge[train]'" in r.stderr


@pytest.mark.parametrize("entry, args", [("main", ["train"]), ("train_main", [])])
def test_train_help_without_torch_works_and_names_the_extra(entry, args):
    r = run_without_torch(entry, *args, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "--epochs" in r.stdout, r.stderr
    assert "pip install 'huse-edge[train]' (not installed here: torch is missing)" in " ".join(r.stdout.split())


def test_a_stage_with_its_extra_installed_has_plain_help():
    pytest.importorskip("onnx")
    from click.testing import CliRunner

    from huse.runtime.cli import main

    r = CliRunner().invoke(main, ["export", "--help"])
    assert r.exit_code == 0 and "not installed here" not in r.output


@pytest.mark.parametrize("package", ["huse.runtime", "huse.train", "huse.export", "huse.benchmarks"])
def test_every_package_states_what_it_exports_and_each_name_resolves(package):
    pytest.importorskip("torch")  # huse.train and huse.export's names need the [train]/[export] extras
    import importlib

    mod = importlib.import_module(package)
    assert mod.__all__ == sorted(set(mod.__all__))
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope


def test_stage_packages_import_nothing_heavy_until_a_name_is_used():
    import subprocess

    code = ("import sys, huse.train, huse.export, huse.benchmarks, huse.train.cli\n"
            "print([m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"

