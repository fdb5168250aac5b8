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
