"""A multi-label bundle through `huse serve` (issue 22): the `huse` model's v2 tensors carry each
item's label set (`labels`: per item the JSON of /v1/classify's "labels"), read here by the unmodified
tritonclient and compared with Classifier.classify."""

from __future__ import annotations

import csv
import json
import urllib.request

import numpy as np
import pytest

from huse.runtime import Classifier
from tests.runtime.serve.conftest import post_json

SCORE_TOL = 1e-5


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_the_label_sets_of_a_multi_label_bundle(start_server, tiny_multi_bundle,
                                                                   tiny_multi_catalog, binary):
    httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    rows = list(csv.DictReader(open(tiny_multi_catalog)))[::15][:4]
    images = [(tiny_multi_catalog.parent / r["image"]).read_bytes() for r in rows] + [b"not a photo"]
    titles = [r["name"] for r in rows] + [""]
    s = start_server(bundle=tiny_multi_bundle)
    with urllib.request.urlopen(s.url + "/v2/models/huse") as r:
        outputs = {o["name"]: o for o in json.load(r)["outputs"]}
    assert outputs["labels"] == {"name": "labels", "datatype": "BYTES", "shape": [-1, 1]}
    client = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
    try:
        inputs = [httpclient.InferInput("image", [len(images), 1], "BYTES"),
                  httpclient.InferInput("title", [len(images), 1], "BYTES")]
        if binary:
            inputs[0].set_data_from_numpy(np.array([[i] for i in images], dtype=object), binary_data=True)
        else:  # JSON: photos travel base64-encoded
            import base64
            inputs[0].set_data_from_numpy(np.array([[base64.b64encode(i)] for i in images], dtype=object),
                                          binary_data=False)
        inputs[1].set_data_from_numpy(np.array([[t.encode()] for t in titles], dtype=object), binary_data=binary)
        result = client.infer("huse", inputs, outputs=[httpclient.InferRequestedOutput(n, binary_data=binary)
                                                       for n in ("labels", "error", "top_k_labels")])
    finally:
        client.close()
    with Classifier(tiny_multi_bundle, threads=1) as clf:
        want = clf.classify(images=images, titles=[t or None for t in titles])
    sets, errors = result.as_numpy("labels"), result.as_numpy("error")
    assert sets.shape == (len(images), 1)

    def text(x):
        return x.decode() if isinstance(x, bytes) else x
    for i, w in enumerate(want):
        if "error" in w:  # no label set for an item that could not be classified, and its error says why
            assert text(sets[i, 0]) == "" and text(errors[i, 0]) == w["error"]
            continue
        got = json.loads(text(sets[i, 0]))
        assert got and [g["label"] for g in got] == [x["label"] for x in w["labels"]]
        assert [g["path"] for g in got] == [x["path"] for x in w["labels"]]
        np.testing.assert_allclose([g["score"] for g in got], [x["score"] for x in w["labels"]], atol=SCORE_TOL)
        assert [g["threshold"] for g in got] == [x["threshold"] for x in w["labels"]]


def test_single_label_model_has_no_labels_output(server):
    with urllib.request.urlopen(server.url + "/v2/models/huse") as r:
        assert "labels" not in {o["name"] for o in json.load(r)["outputs"]}


def test_needs_review_is_the_same_rule_as_huse_classify(start_server, tiny_multi_bundle, tiny_multi_catalog):
    """`--min-confidence P` marks an item needs_review in /v1/classify and /v2 exactly where `huse classify`
    does: with a label set, when any label is below P. The server once read the top-1 alone, so a product
    whose second label was unsure went to the review queue from `huse classify` and passed as sure here."""
    from huse.runtime.bulk import prediction_fields

    rows = list(csv.DictReader(open(tiny_multi_catalog)))[:60]
    titles = [r["name"] for r in rows]
    with Classifier(tiny_multi_bundle, threads=1) as clf:
        want = clf.classify(titles=titles)
    # P between the top-1 and the least confident label of a product with several labels
    split = [w for w in want if len(w["labels"]) > 1 and w["labels"][-1]["score"] < w["labels"][0]["score"] - 1e-3]
    assert split, "no title here gets several labels of different scores"
    p = (split[0]["labels"][-1]["score"] + split[0]["labels"][0]["score"]) / 2
    expected = [prediction_fields(w, p)["needs_review"] for w in want]
    assert any(expected) and not all(expected)
    s = start_server("--min-confidence", str(p), bundle=tiny_multi_bundle)
    status, v1 = post_json(s.url + "/v1/classify", {"items": [{"title": t} for t in titles]})
    assert status == 200
    assert [r["needs_review"] for r in v1["results"]] == expected
    status, v2 = post_json(s.url + "/v2/models/huse/infer", {"inputs": [
        {"name": "title", "datatype": "BYTES", "shape": [len(titles)], "data": titles}]})
    assert status == 200
    assert {o["name"]: o for o in v2["outputs"]}["needs_review"]["data"] == expected
