"""Classifier's public stage hooks (what huse-bench times) and its missing-precision message."""

from __future__ import annotations

import numpy as np
import pytest

from huse.runtime import Classifier
from huse.runtime.errors import HuseError


def test_stage_hooks_give_the_same_answer_as_classify(tiny_bundle, tiny_catalog):
    import csv

    with open(tiny_catalog, newline="") as f:
        rows = list(csv.DictReader(f))[:4]
    images = [str(tiny_catalog.parent / r["image"]) for r in rows]
    with Classifier(tiny_bundle, backend="onnxruntime") as clf:
        assert clf.loaded_files == {}
        arrays = clf.preprocess_images(images)
        assert arrays.shape[0] == 4 and arrays.dtype == np.float32
        logits = clf.run_graph("image", {"image": arrays})["logits"]
        expected = clf.predict_proba(images=images)
        np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
        assert set(clf.loaded_files) == {"image"} and clf.loaded_files["image"].suffix == ".onnx"
        with pytest.raises(HuseError):
            clf.preprocess_images([str(tiny_catalog.parent / "no-such.png")])
