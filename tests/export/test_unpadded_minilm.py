"""MiniLM's exported graphs compute only the real tokens (issue 24, `MiniLM.without_padding`): the padding
of a batch is removed inside text.onnx and fused.onnx, and nothing a user sees changes.

One tiny MiniLM run and bundle (tests/conftest.py) serve the whole file.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from huse.runtime.classifier import Classifier
from huse.runtime.tokenizer import load_tokenizer

SHORT = ["red shirt", "blue", "green cotton shirt"]
# Longer than max_len (32) tokens: truncated, so its batch is exactly max_len wide with no padding.
LONG = ["a long title about a striped cotton summer shirt with short sleeves and a pocket for the weekend, "
        "washed linen, relaxed fit, mother of pearl buttons, made in portugal, size extra large"]


def _graph_inputs(graph_inputs: list[str], feed: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    n = feed["input_ids"].shape[0]
    image = np.random.default_rng(0).standard_normal((n, 3, image_size, image_size)).astype(np.float32)
    return {k: image if k == "image" else feed[k] for k in graph_inputs}


@pytest.mark.parametrize("titles", [SHORT, LONG, SHORT + LONG, SHORT[1:2], SHORT * 5 + LONG],
                         ids=["short", "one-at-max-length", "mixed", "batch-of-one", "mixed-16"])
def test_unpadded_graphs_match_the_padded_torch_model(tiny_minilm_run, tiny_minilm_bundle, titles):
    """text.onnx and fused.onnx (unpadded) against the trained torch model (padded) at the batch's own width."""
    import onnxruntime as ort
    import torch

    from huse.export.graphs import graph_specs
    from huse.train.trainer import load_run

    model, cfg = load_run(tiny_minilm_run)
    m = json.loads((tiny_minilm_bundle / "manifest.json").read_text())
    feed = load_tokenizer(m["tokenizer"], tiny_minilm_bundle).inputs(titles)
    specs = graph_specs(model, cfg["fusion"]["image_weight"])
    for name in ("text", "fused"):
        g = specs[name]
        inputs = _graph_inputs(g["inputs"], feed, m["model"]["image_size"])
        with torch.no_grad():
            expected = g["module"](*(torch.from_numpy(inputs[n]) for n in g["inputs"]))
        sess = ort.InferenceSession(str(tiny_minilm_bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for out, e, o in zip(g["outputs"], expected, sess.run(g["outputs"], inputs)):
            np.testing.assert_allclose(o, e.numpy(), atol=1e-4, err_msg=f"{name}:{out}")  # fp32 ort vs torch: 1e-4


def test_the_text_graph_multiplies_only_the_real_tokens(tiny_minilm_bundle, tmp_path):
    """The rows MiniLM's projections multiply are the batch's real tokens, not batch x width."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(tiny_minilm_bundle / "text.onnx"))
    query = [n for n in model.graph.node if "/layer.0/attention/self/query/" in n.name]
    assert len(query) == 1, [n.name for n in query]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(query[0].output[0]))
    path = tmp_path / "probe.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m = json.loads((tiny_minilm_bundle / "manifest.json").read_text())
    feed = load_tokenizer(m["tokenizer"], tiny_minilm_bundle).inputs(SHORT + LONG)
    rows = sess.run([query[0].output[0]], feed)[0]
    real = int(feed["attention_mask"].sum())
    assert real < feed["input_ids"].size  # the batch is padded ...
    assert rows.shape == (real, 384)  # ... and the projection saw only its real tokens


def _padded_bundle(tiny_minilm_run, tiny_minilm_bundle, folder):
    """The fp32 bundle with text.onnx and fused.onnx exported from the padded model, as bundles were before."""
    from huse.export.finish import stamp_labels
    from huse.export.graphs import export_onnx, graph_specs, optimize_onnx
    from huse.runtime.bundle import write_manifest
    from huse.train.trainer import load_run

    shutil.copytree(tiny_minilm_bundle, folder)
    model, cfg = load_run(tiny_minilm_run)
    m = json.loads((folder / "manifest.json").read_text())
    feed = load_tokenizer(m["tokenizer"], folder).inputs(SHORT)
    for name in ("text", "fused"):
        g = graph_specs(model, cfg["fusion"]["image_weight"])[name]
        path = folder / f"{name}.onnx"
        export_onnx(g["module"], _graph_inputs(g["inputs"], feed, m["model"]["image_size"]), g["inputs"],
                    g["outputs"], path, dynamic_length=True)
        optimize_onnx(path)
        stamp_labels(path, m["labels"])
    m["models"] = {"fp32": m["models"]["fp32"]}
    for key in ("format", "format_version", "files"):
        m.pop(key, None)
    write_manifest(folder, m)
    return folder


def test_classify_gives_what_the_padded_graphs_give(tiny_minilm_run, tiny_minilm_bundle, tiny_catalog, tmp_path):
    import csv

    padded = _padded_bundle(tiny_minilm_run, tiny_minilm_bundle, tmp_path / "padded")
    import onnx

    assert not any(n.op_type == "NonZero" for n in onnx.load(str(padded / "text.onnx")).graph.node)
    rows = list(csv.DictReader(open(tiny_catalog, encoding="utf-8")))[:24]
    images = [str(tiny_catalog.parent / r["image"]) for r in rows]
    titles = [r["name"] for r in rows[:-2]] + LONG + SHORT[1:2]  # mixed widths, one at max length
    with Classifier(tiny_minilm_bundle, backend="onnxruntime", threads=1) as new, \
            Classifier(padded, backend="onnxruntime", threads=1) as old:
        for mode in ("text", "fused"):
            imgs = images if mode == "fused" else None
            np.testing.assert_allclose(new.predict_proba(images=imgs, titles=titles),
                                       old.predict_proba(images=imgs, titles=titles), atol=1e-5, err_msg=mode)
            a = new.classify(images=imgs, titles=titles, mode=mode)
            b = old.classify(images=imgs, titles=titles, mode=mode)
            assert [r["top_k"][0]["label"] for r in a] == [r["top_k"][0]["label"] for r in b]
        np.testing.assert_allclose(new.embed_text(titles).vectors, old.embed_text(titles).vectors, atol=1e-5)


@pytest.mark.parametrize("precision", ["int8-cpu", "int8"])
def test_int8_calibrates_in_batches_with_different_token_counts(tiny_minilm_bundle, tmp_path, precision):
    """Calibration batches whose real-token counts differ (every real catalog's): the tensors after the
    NonZero differ in rows from batch to batch, which onnxruntime's histogram calibrators cannot stack."""
    import onnx
    import onnxruntime as ort

    from huse.export.finish import FLOAT_PREFIXES
    from huse.export.precision import quantize_int8, quantize_int8_cpu

    src = tiny_minilm_bundle / "fused.onnx"
    m = json.loads((tiny_minilm_bundle / "manifest.json").read_text())
    tok = load_tokenizer(dict(m["tokenizer"], pad="fixed"), tiny_minilm_bundle)  # one width, as export calibrates
    inputs = m["graphs"]["fused"]["inputs"]
    feeds = [_graph_inputs(inputs, tok.inputs(t), m["model"]["image_size"]) for t in (SHORT, SHORT[:1] + LONG, SHORT * 2)]
    assert len({int(f["attention_mask"].sum()) for f in feeds}) == 3
    exclude = [n.name for n in onnx.load(str(src)).graph.node if n.name.startswith(FLOAT_PREFIXES["minilm"])]
    quantize = quantize_int8_cpu if precision == "int8-cpu" else quantize_int8
    info = quantize(src, tmp_path / "fused.onnx", feeds, exclude_nodes=exclude)
    assert info["quantized_nodes"] > 0  # the image backbone at least
    sess = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    for f in feeds:
        probs = sess.run(["probs"], f)[0]
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-2)  # int8-cpu rounds the fusion Add too


def test_bulk_batches_of_mixed_title_lengths_classify_each_title_as_alone(tiny_minilm_bundle, tiny_catalog, tmp_path):
    """huse bulk on the unpadded bundle, text mode: batches of 7 whose titles differ in length (one at max
    length) answer every row as `classify` answers that title on its own."""
    from huse.runtime.bulk import BulkJob, read_predictions, run_bulk

    lines = tiny_catalog.read_text().splitlines()
    rows = lines[1:12] + [f"images/x.png,\"{LONG[0]}\",,long"] + lines[12:20]
    data = tmp_path / "c.csv"
    data.write_text("\n".join([lines[0]] + rows) + "\n")
    out = tmp_path / "out"
    run_bulk(BulkJob(bundle=str(tiny_minilm_bundle), data=str(data), out=str(out), mode="text", batch_size=7,
                     format="jsonl", threads=1, progress=False))
    got = read_predictions(out)
    assert len(got) == len(rows) and all(p.get("error") is None for p in got)
    with Classifier(tiny_minilm_bundle, backend="onnxruntime", threads=1) as clf:
        for p in got:
            alone = clf.classify(titles=[p["name"]], mode="text")[0]
            assert [t["label"] for t in p["top_k"]] == [t["label"] for t in alone["top_k"]], p["row"]
            np.testing.assert_allclose([t["score"] for t in p["top_k"]], [t["score"] for t in alone["top_k"]],
                                       atol=1e-5)
