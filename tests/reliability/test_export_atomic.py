"""What a failed or interrupted export leaves: matches the README ("keeps nothing")."""

from __future__ import annotations

import json
import shutil

import pytest

from huse.runtime import Classifier, HuseError


@pytest.fixture
def failing_gate(monkeypatch):
    import huse.export.precision as precision

    real = precision.accuracy_gate

    def strict(ref, cand, labels, *, precision):
        return {**real(ref, cand, labels, precision=precision), "passed": False, "message": "agreement 90.00% < 99.90%"}

    monkeypatch.setattr(precision, "accuracy_gate", strict)


def test_failed_gate_on_a_new_bundle_keeps_nothing(tiny_run, tmp_path, failing_gate):
    from huse.export.api import ExportOptions, export

    out = tmp_path / "new"
    with pytest.raises(HuseError, match=r"fp16 accuracy gate failed .*nothing was written.*without --fp16 .*"
                                        r"`huse-export \.\.\. --fp16 --no-accuracy-gate`"):
        export(tiny_run, out, ExportOptions(fp16=True, eval_size=0, engine="skip", say=lambda s: None))
    assert list(tmp_path.iterdir()) == []  # no bundle, no .partial


def test_failed_gate_on_a_copy_keeps_nothing_and_the_source_is_untouched(bundle_copy, tmp_path, failing_gate):
    from huse.export.api import ExportOptions, export

    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(HuseError, match="nothing was written .*an existing one unchanged"):
        export(bundle_copy, tmp_path / "copy", ExportOptions(fp16=True, eval_size=0, engine="skip", say=lambda s: None))
    assert not (tmp_path / "copy").exists() and not (tmp_path / "copy.partial").exists()
    assert (bundle_copy / "manifest.json").read_bytes() == before


def test_leftovers_of_a_killed_export_are_removed_by_the_next(bundle_copy):
    from huse.export.api import ExportOptions, export

    (bundle_copy / "fp16").mkdir()
    (bundle_copy / "fp16" / "image.onnx").write_bytes(b"half written")
    (bundle_copy / "manifest.json.tmp").write_text("{")
    (bundle_copy / "NOTES.md").write_text("deployed to store 12")  # the user's own files are not leftovers
    (bundle_copy / "triton").mkdir()
    (bundle_copy / "triton" / "config.pbtxt").write_text("name: 'huse'")
    Classifier(bundle_copy)  # unlisted leftovers never stop a bundle from loading
    m = export(bundle_copy, None, ExportOptions(fp16=True, eval_size=0, engine="skip", say=lambda s: None))
    assert m["models"]["fp16"]["image"] == "fp16/image.onnx"
    assert not (bundle_copy / "manifest.json.tmp").exists()
    assert (bundle_copy / "NOTES.md").read_text() == "deployed to store 12"
    assert (bundle_copy / "triton" / "config.pbtxt").is_file()
    # re-adding a precision writes beside the live one, then drops the old folder
    m = export(bundle_copy, None, ExportOptions(fp16=True, eval_size=0, engine="skip", say=lambda s: None))
    assert m["models"]["fp16"]["image"] == "fp16.v2/image.onnx" and not (bundle_copy / "fp16").exists()
    assert json.loads((bundle_copy / "manifest.json").read_text())["files"].keys() == m["files"].keys()
    with Classifier(bundle_copy, precision="fp16") as clf:
        assert clf.classify(titles=["Acme tee"])[0]["top_k"]
