"""Fixtures for the reliability suite: a guard that proves no inference ran, and bundle copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def no_inference(monkeypatch):
    """Counts onnxruntime inferences; a tampering test asserts the count stays 0."""
    from huse.runtime.backends.onnxrt.runner import OnnxrtRunner

    calls = []
    real = OnnxrtRunner.infer

    def counting(self, feed):
        calls.append(self.path)
        return real(self, feed)

    monkeypatch.setattr(OnnxrtRunner, "infer", counting)
    return calls


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, free to tamper with."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out
