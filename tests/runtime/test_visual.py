"""Visual-similarity vectors (issue 10): Classifier.embed_visual, and bundles exported before them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from huse.runtime import Classifier, HuseError
from huse.runtime.bundle import load_manifest, write_manifest
from tests.models.make_bundles import make_pre_visual_bundle


@pytest.fixture(scope="module")
def old_bundle(tiny_bundle, tmp_path_factory):
    return make_pre_visual_bundle(tiny_bundle, tmp_path_factory.mktemp("old") / "bundle")


def _rewrite(bundle, **change):
    m = json.loads((bundle / "manifest.json").read_text())
    for key in ("format", "format_version", "files"):
        m.pop(key)
    m.update(change)
    write_manifest(bundle, m)


def test_embed_visual_is_unit_norm_and_a_bad_image_is_a_nan_row(tiny_bundle, records, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    photos = [records[0].image, str(tmp_path / "bad.png"), records[1].image]
    with Classifier(tiny_bundle) as clf:
        e = clf.embed_visual(photos)
        assert e.vectors.shape == (3, clf.manifest["visual_dim"]) and clf.manifest["visual_dim"] == 32  # tiny backbone
        np.testing.assert_allclose(np.linalg.norm(e.vectors[[0, 2]], axis=1), 1.0, atol=1e-5)
        assert np.isnan(e.vectors[1]).all() and set(e.errors) == {1}
        assert not np.allclose(e.vectors[0], e.vectors[2])  # two photos, two vectors
        # One run of the image graph gives both vectors, each as its own call gives it.
        img, vis = clf.embed_image_visual(photos)
        np.testing.assert_allclose(vis.vectors, e.vectors, atol=1e-6)
        np.testing.assert_allclose(img.vectors, clf.embed_image(photos).vectors, atol=1e-6)
        assert set(img.errors) == set(vis.errors) == {1}


def test_a_bundle_from_before_visual_vectors_keeps_working_and_says_to_reexport(old_bundle, records):
    import onnx

    m = load_manifest(old_bundle)
    assert "visual_dim" not in m
    assert [o.name for o in onnx.load(str(old_bundle / m["models"]["fp32"]["image"])).graph.output] == ["embedding", "logits"]
    with Classifier(old_bundle) as clf:
        assert clf.classify(images=[records[0].image])[0]["top_k"]
        assert np.isfinite(clf.embed_image([records[0].image]).vectors).all()
        with pytest.raises(HuseError, match=r"has no visual-similarity output.*Re-export it with this huse-edge version"):
            clf.embed_visual([records[0].image])
        with pytest.raises(HuseError, match=r"Re-export"):
            clf.embed_image_visual([records[0].image])


@pytest.mark.parametrize("source, visual_dim, why", [
    ("old", 32, r"it has no output 'visual'"),  # the manifest promises an output the graph lacks
    ("new", 7, r"output visual has width 32"),
])
def test_the_manifest_must_describe_the_visual_output(source, visual_dim, why, old_bundle, tiny_bundle, records, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(old_bundle if source == "old" else tiny_bundle, bundle)
    _rewrite(bundle, visual_dim=visual_dim)
    want = rf"manifest field visual_dim = {visual_dim} does not match graph .*{why}"
    with Classifier(bundle) as clf, pytest.raises(HuseError, match=want):
        clf.embed_image([records[0].image])


def test_a_visual_dim_that_is_not_a_width_is_refused(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    _rewrite(bundle, visual_dim="32")
    with pytest.raises(HuseError, match="manifest field visual_dim must be a positive integer"):
        load_manifest(bundle)
