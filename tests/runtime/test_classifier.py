"""The Classifier API on a tiny real bundle: modes, bad items, hierarchy scores, embeddings."""

from __future__ import annotations

import io
import csv

import numpy as np
import pytest
from PIL import Image

from huse.runtime import Classifier, HuseError


def _rows(catalog):
    with open(catalog) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def clf(tiny_bundle):
    with Classifier(tiny_bundle, backend="onnxruntime", batch_size=16) as c:
        yield c


@pytest.fixture(scope="module")
def items(tiny_catalog):
    rows = _rows(tiny_catalog)[::10]
    return [str(tiny_catalog.parent / r["image"]) for r in rows], [r["name"] for r in rows]


@pytest.mark.parametrize("mode", ["image", "text", "fused"])
def test_each_mode_returns_ranked_probabilities(clf, items, mode):
    images, titles = items
    out = clf.classify(images=images, titles=titles, mode=mode, top_k=3)
    assert len(out) == len(images)
    for r in out:
        assert "error" not in r, r
        assert r["mode"] == mode
        scores = [t["score"] for t in r["top_k"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert all(0.0 <= s <= 1.0 for s in scores)


def test_repr_names_the_bundle_and_how_it_runs(clf, tiny_bundle):
    assert repr(clf) == (f"Classifier({str(tiny_bundle)!r}, backend='onnxruntime', device='cpu', precision='fp32', "
                         f"classes={len(clf.labels)})")


def test_modes_follow_what_each_item_has(clf, items):
    images, titles = items
    out = clf.classify(images=[images[0], None, images[2]], titles=[titles[0], titles[1], None])
    assert [r["mode"] for r in out] == ["fused", "text", "image"]


@pytest.mark.parametrize("mode", ["auto", "text"])
def test_title_only_batch_names_each_unusable_title_and_classifies_the_rest_as_alone(clf, items, mode):
    _, titles = items
    batch = [titles[0], None, "   ", 42, titles[1], "Ｆｕｌｌ-width tee", titles[2]]
    out = clf.classify(titles=batch, mode=mode, top_k=3)
    assert [r["index"] for r in out] == list(range(len(batch)))
    assert out[1] == {"index": 1, "error": "item 1 has no usable " + ("title" if mode == "text" else "image or title")}
    assert out[2]["error"] == out[1]["error"].replace("item 1", "item 2")
    assert out[3] == {"index": 3, "error": "title must be text; got int"}
    for i in (0, 4, 5, 6):
        alone = clf.classify(titles=[batch[i]], mode=mode, top_k=3)[0]
        assert out[i] == dict(alone, index=i) and out[i]["mode"] == "text"
    out[0]["top_k"][0]["score"] = -1.0  # results are the caller's: changing one changes nothing else
    assert clf.classify(titles=batch, mode=mode, top_k=3)[0]["top_k"][0]["score"] >= 0


@pytest.mark.parametrize("rows,classes", [(1, 10), (64, 10), (1, 5000), (64, 1000), (3, 4000)])
def test_top_classes_are_a_stable_sorts_first_k(rows, classes):
    """Large batches are partitioned before sorting; the answer is still the stable sort's, ties to the lower class."""
    from huse.runtime.classifier import top_classes

    rng = np.random.default_rng(classes + rows)
    probs = rng.random((rows, classes), dtype=np.float32)
    probs[::2] = np.round(probs[::2], 2)  # ties, at the k-th score too
    probs[-1, :7] = probs[-1].max()  # a row whose best 7 all tie
    for k in (1, 5, 7, classes + 3):
        np.testing.assert_array_equal(top_classes(probs, k), np.argsort(-probs, axis=1, kind="stable")[:, :k])


def test_parent_score_is_sum_of_children(clf, items):
    images, titles = items
    probs = clf.predict_proba(images=images[:4], titles=titles[:4])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    for p in probs:
        for k in range(1, clf.hierarchy.depth):
            parents, children = clf.hierarchy.level_probs(p, k), clf.hierarchy.level_probs(p, k + 1)
            np.testing.assert_allclose(parents.sum(), children.sum(), atol=1e-6)
    r = clf.classify(images=images[:1], titles=titles[:1])[0]
    path = r["path"]
    assert [p["level"] for p in path] == [1, 2, 3]
    assert path[0]["score"] >= path[1]["score"] >= path[2]["score"]
    assert path[2]["label"].startswith(path[1]["label"] + "<")


def test_one_bad_item_never_fails_the_batch(clf, items, tmp_path):
    images, titles = items
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    batch_images = [images[0], str(corrupt), str(tmp_path / "missing.jpg"), buf.getvalue(), b"not an image", images[1]]
    batch_titles = [titles[0], None, "", None, "Acme black tee", "x" * 10_000]
    out = clf.classify(images=batch_images, titles=batch_titles)
    assert "error" not in out[0] and out[0]["mode"] == "fused"
    assert "corrupt.png" in out[1]["error"]
    assert "missing.jpg" in out[2]["error"]
    assert out[3]["mode"] == "image"  # RGBA composited on white, documented
    assert out[4]["mode"] == "text" and "could not be decoded" in out[4]["warning"]
    assert out[5]["mode"] == "fused"  # 10,000 characters are capped, not an error


def test_a_filtered_dataframe_column_is_read_in_order_not_by_label(clf, items):
    """`df[mask]["name"]` keeps its row labels; reading it by position gave item 1 another row's photo."""
    pd = pytest.importorskip("pandas")
    images, titles = items
    df = pd.DataFrame({"image": [None, *images[:3]], "name": ["skip me", *titles[:3]]})
    sub = df.iloc[1:]  # labels 1, 2, 3
    sub.loc[2, "image"] = None  # the second product has no photo: classified by its title
    want = clf.classify(images=[images[0], None, images[2]], titles=titles[:3])
    assert clf.classify(images=sub["image"], titles=sub["name"]) == want
    assert [r["mode"] for r in want] == ["fused", "text", "fused"]
    np.testing.assert_array_equal(clf.embed_text(sub["name"]).vectors, clf.embed_text(titles[:3]).vectors)
    np.testing.assert_array_equal(clf.predict_proba(images=sub["image"].iloc[[0, 2]], titles=sub["name"].iloc[[0, 2]]),
                                  clf.predict_proba(images=[images[0], images[2]], titles=[titles[0], titles[2]]))
    np.testing.assert_array_equal(clf.decode(sub["image"].iloc[[0, 2]]).array, clf.decode([images[0], images[2]]).array)


def test_non_utf8_title_is_normalised(clf):
    out = clf.classify(titles=[b"Acme \xff\xfe tee"], mode="text")
    assert out[0]["mode"] == "text"


def test_embeddings_are_unit_norm_and_failures_are_nan(clf, items):
    images, titles = items
    e = clf.embed_image(images[:3] + [b"junk", None])
    assert e.vectors.shape == (5, clf.manifest["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(e.vectors[:3], axis=1), 1.0, atol=1e-5)
    assert np.isnan(e.vectors[3:]).all() and 3 in e.errors
    assert e.errors[4] == "item 4: no image"  # a NaN row always has its reason (a missing photo had none)
    t = clf.embed_text([titles[0], "", None])
    np.testing.assert_allclose(np.linalg.norm(t.vectors[0]), 1.0, atol=1e-5)
    assert set(t.errors) == {1, 2}


def test_batches_do_not_change_results(tiny_bundle, items):
    images, titles = items
    with Classifier(tiny_bundle, backend="onnxruntime", batch_size=3) as small, \
            Classifier(tiny_bundle, backend="onnxruntime", batch_size=64) as big:
        np.testing.assert_allclose(small.predict_proba(images, titles), big.predict_proba(images, titles), atol=1e-6)


def test_clear_errors_for_wrong_use(tiny_bundle):
    with pytest.raises(HuseError, match="no 'int8' models"):
        Classifier(tiny_bundle, precision="int8")
    with pytest.raises(HuseError, match="available backends"):
        Classifier(tiny_bundle, backend="tflite")
    c = Classifier(tiny_bundle, backend="onnxruntime")
    with pytest.raises(HuseError, match="2 images but 1 titles"):
        c.classify(images=[b"a", b"b"], titles=["x"])
    with pytest.raises(HuseError, match="needs images, titles or both"):
        c.classify()


def test_auto_backend_falls_back_to_cpu_with_a_reason(tiny_bundle, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="huse.runtime"):
        c = Classifier(tiny_bundle)
    assert (c.backend, c.device) == ("onnxruntime", "cpu")
    assert "not tensorrt" in caplog.text


def test_tensorrt_by_name_is_refused_at_once_where_it_cannot_run(tiny_bundle):
    from huse.runtime.backends import gpu_backends

    ok, why = gpu_backends()["tensorrt"]
    if ok:
        pytest.skip("TensorRT is usable here: Classifier(backend='tensorrt') runs")
    with pytest.raises(HuseError, match=r"backend='tensorrt' was asked for but TensorRT is not usable here \(") as e:
        Classifier(tiny_bundle, backend="tensorrt")
    assert why in str(e.value)
