"""MiniLM bundles pad a batch to its longest title (issue 24): a dynamic length axis in text.onnx and
fused.onnx, a "pad": "longest" tokenizer spec, and every consumer of that axis (serving merges, the
quantisers, TensorRT's profile). Old and word-CNN bundles keep their fixed length.

One tiny MiniLM run and bundle (tests/conftest.py) serve the whole file.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from huse.runtime.classifier import Classifier
from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import load_tokenizer

SHORT = ["red shirt", "blue", "green cotton shirt"]
LONG = ["a long title about a striped cotton summer shirt with short sleeves and a pocket for the weekend"]


def _length_axes(path) -> dict[str, list]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def test_the_minilm_bundle_pads_to_the_longest_title_on_a_dynamic_length_axis(tiny_minilm_bundle):
    m = json.loads((tiny_minilm_bundle / "manifest.json").read_text())
    assert m["tokenizer"]["pad"] == "longest" and m["tokenizer"]["pad_multiple"] == 1
    for precision, graphs in m["models"].items():  # fp32, fp16 and int8-cpu alike
        for g in ("text", "fused"):
            axes = _length_axes(tiny_minilm_bundle / graphs[g])
            assert isinstance(axes["input_ids"][1], str) and isinstance(axes["attention_mask"][1], str), (precision, g)
    assert m["trt_compat"]  # the static TensorRT check accepted the length axis
    with Classifier(tiny_minilm_bundle, backend="onnxruntime") as clf:
        for t in SHORT + LONG:  # each title alone: exactly its tokens, [CLS] and [SEP] included
            feed = clf.tokenizer.inputs([t])
            assert feed["input_ids"].shape[1] == feed["attention_mask"].sum() < 32, t
        longest = clf.tokenizer.inputs(LONG)["input_ids"].shape[1]
        assert clf.tokenizer.inputs(SHORT + LONG)["input_ids"].shape[1] == longest  # the batch's longest


def test_the_word_cnn_bundle_keeps_its_fixed_length(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert "pad" not in m["tokenizer"]
    assert _length_axes(tiny_bundle / "text.onnx")["input_ids"][1] == m["tokenizer"]["max_len"]


@pytest.mark.parametrize("width", [8, 32])
def test_text_graph_matches_torch_at_eight_tokens_and_at_max_length(tiny_minilm_run, tiny_minilm_bundle, width):
    import onnxruntime as ort
    import torch

    from huse.export.graphs import graph_specs
    from huse.train.trainer import load_run

    model, cfg = load_run(tiny_minilm_run)
    spec = json.loads((tiny_minilm_bundle / "manifest.json").read_text())["tokenizer"]
    feeds = load_tokenizer(dict(spec, pad="fixed", max_len=width), tiny_minilm_bundle).inputs(SHORT + LONG)
    assert feeds["input_ids"].shape == (4, width)
    g = graph_specs(model, cfg["fusion"]["image_weight"])["text"]
    with torch.no_grad():
        expected = g["module"](*(torch.from_numpy(feeds[n]) for n in g["inputs"]))
    sess = ort.InferenceSession(str(tiny_minilm_bundle / "text.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(g["outputs"], feeds)
    for name, e, o in zip(g["outputs"], expected, got):
        np.testing.assert_allclose(o, e.numpy(), atol=1e-4, err_msg=name)  # fp32 onnxruntime vs torch: 1e-4


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-cpu"])
def test_longest_padding_classifies_as_fixed_padding(tiny_minilm_bundle, tiny_catalog, precision):
    import csv

    rows = list(csv.DictReader(open(tiny_catalog, encoding="utf-8")))[:20]
    images = [str(tiny_catalog.parent / r["image"]) for r in rows]
    titles = [r["name"] for r in rows]
    with Classifier(tiny_minilm_bundle, backend="onnxruntime", precision=precision, threads=1) as clf:
        longest = {mode: clf.predict_proba(images=images if mode == "fused" else None, titles=titles)
                   for mode in ("text", "fused")}
        width = clf.tokenizer.inputs(titles)["input_ids"].shape[1]
        clf.tokenizer = load_tokenizer(dict(clf.manifest["tokenizer"], pad="fixed"), tiny_minilm_bundle)
        assert width < clf.tokenizer.max_len == clf.tokenizer.inputs(titles)["input_ids"].shape[1]
        for mode, p in longest.items():
            fixed = clf.predict_proba(images=images if mode == "fused" else None, titles=titles)
            np.testing.assert_allclose(p, fixed, atol=1e-5, err_msg=mode)


def test_a_serving_batch_of_requests_of_different_lengths_answers_as_each_alone(tiny_minilm_bundle, tiny_catalog):
    """The server's batch step (serve.models.ClassifyModel: prepare each request, merge, run once, finish)
    on requests tokenised to different widths gives each request what it gets alone."""
    from huse.runtime.serve.models import ClassifyModel
    from huse.runtime.serve.protocol import Items

    image = next(tiny_catalog.parent.rglob("*.png")).read_bytes()
    requests = [Items(None, SHORT), Items(None, LONG), Items([image, None], LONG + SHORT[:1]),
                Items([image], SHORT[2:])]
    with Classifier(tiny_minilm_bundle, backend="onnxruntime", threads=1) as clf:
        model = ClassifyModel(clf)
        alone = [model.finish([part], model.run(clf, [part]))[0]
                 for part in (model.prepare_many([r])[0] for r in requests)]
        parts = [model.prepare_many([r])[0] for r in requests]  # each tokenised alone, to its own width
        assert len({p.groups["text"][1]["input_ids"].shape[1] for p, _ in parts if "text" in p.groups}) >= 2
        together = model.finish(parts, model.run(clf, parts))
    assert [len(a) for a in alone] == [len(t) for t in together] == [3, 1, 2, 1]
    for a, b in zip([r for rs in alone for r in rs], [r for rs in together for r in rs]):
        assert a["mode"] == b["mode"] and [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        np.testing.assert_allclose([t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], atol=1e-5)


def test_a_manifest_asking_for_longest_padding_of_a_fixed_length_graph_is_refused(tiny_bundle, tmp_path):
    from huse.runtime.bundle import write_manifest

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["tokenizer"].update(pad="longest", pad_multiple=8)
    for key in ("format", "format_version", "files"):
        m.pop(key, None)
    write_manifest(bundle, m)
    with Classifier(bundle, backend="onnxruntime") as clf:
        with pytest.raises(HuseError, match=r"tokenizer.pad = longest does not match graph .*fixed length 8"):
            clf.classify(titles=["red shirt"], mode="text")


def test_the_tensorrt_profile_covers_the_title_lengths_the_tokenizer_feeds(tiny_minilm_bundle):
    from huse.runtime.backends.trt.loader import profile_shapes, token_range

    m = json.loads((tiny_minilm_bundle / "manifest.json").read_text())
    assert token_range(m) == (1, 32, 32)
    assert token_range({"tokenizer": dict(m["tokenizer"], pad_multiple=8)}) == (8, 32, 32)  # bundles before
    assert token_range({"tokenizer": {"type": "word", "max_len": 24}}) is None  # fixed graphs: no length range
    shapes = profile_shapes([("image", (-1, 3, 32, 32)), ("input_ids", (-1, -1)), ("attention_mask", (-1, -1))],
                            (1, 8, 64), "fused.onnx", token_range(m))
    assert shapes["input_ids"] == shapes["attention_mask"] == {"min": [1, 1], "opt": [8, 32], "max": [64, 32]}
    assert shapes["image"]["max"] == [64, 3, 32, 32]
    with pytest.raises(HuseError, match="dynamic non-batch dims"):  # only the token inputs' dim 1 may vary
        profile_shapes([("image", (-1, 3, -1, 32))], (1, 8, 64), "image.onnx", token_range(m))


@pytest.mark.gpu
def test_tensorrt_runs_the_minilm_text_graph_at_each_padded_width(tiny_minilm_bundle):
    """TensorRT takes the widths the tokenizer feeds (profile 8..32) and matches onnxruntime at each."""
    from huse.runtime.backends.trt.loader import engine_support

    ok, why = engine_support()
    if not ok:
        pytest.skip(why)
    with Classifier(tiny_minilm_bundle, backend="onnxruntime") as ort_clf, \
            Classifier(tiny_minilm_bundle, backend="tensorrt") as trt_clf:
        for titles in (SHORT, LONG, SHORT + LONG):
            np.testing.assert_allclose(trt_clf.predict_proba(titles=titles), ort_clf.predict_proba(titles=titles),
                                       atol=1e-3)  # fp32 TensorRT vs onnxruntime (TF32 off): 1e-3
