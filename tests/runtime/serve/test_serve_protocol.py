"""The wire formats (pure functions) and Prepared.merge, without a server."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from huse.runtime.serve.protocol import (HEADER_LENGTH, RequestError, classify_tensors, encode_infer_response,
                                         parse_infer_request, parse_v1_items)


def binary_request(tensors: dict[str, list[bytes]], outputs=None, params=None) -> tuple[bytes, str]:
    raw = {k: b"".join(struct.pack("<I", len(x)) + x for x in v) for k, v in tensors.items()}
    head = {"inputs": [{"name": k, "datatype": "BYTES", "shape": [len(v)], "parameters": {"binary_data_size": len(raw[k])}}
                       for k, v in tensors.items()]}
    if outputs is not None:
        head["outputs"] = outputs
    if params:
        head["parameters"] = params
    h = json.dumps(head).encode()
    return h + b"".join(raw.values()), str(len(h))


def test_binary_bytes_inputs_round_trip_and_empty_means_absent():
    body, length = binary_request({"image": [b"\x89PNG...", b""], "title": [b"", "caf\u00e9".encode()]})
    req = parse_infer_request(body, length)
    assert req.items.images == [b"\x89PNG...", None] and req.items.titles == [None, "caf\u00e9".encode()]


def test_binary_outputs_as_triton_lays_them_out():
    results = [{"index": 0, "mode": "fused", "top_k": [{"label": "a<b", "score": 0.75}],
                "path": [{"level": 1, "label": "a", "score": 1.0}, {"level": 2, "label": "a<b", "score": 0.75}]},
               {"index": 1, "error": "image <bytes> could not be decoded"}]
    tensors = classify_tensors(results, depth=2, min_confidence=0.8)
    body, length = binary_request({"title": [b"x", b"y"]},
                                  outputs=[{"name": "top_k_scores", "parameters": {"binary_data": True}},
                                           {"name": "needs_review", "parameters": {"binary_data": True}},
                                           {"name": "error"}])
    out, headers = encode_infer_response("huse", tensors, parse_infer_request(body, length))
    n = int(headers[HEADER_LENGTH])
    head, raw = json.loads(out[:n]), out[n:]
    assert [o["name"] for o in head["outputs"]] == ["top_k_scores", "needs_review", "error"]
    scores_size = head["outputs"][0]["parameters"]["binary_data_size"]
    assert np.frombuffer(raw[:scores_size], np.float32).tolist() == [0.75, 0.0]
    assert np.frombuffer(raw[scores_size:], np.bool_).tolist() == [True, False]  # 0.75 < 0.8: review it
    assert head["outputs"][2]["data"] == ["", "image <bytes> could not be decoded"]


@pytest.mark.parametrize("body, length, message", [
    (b'{"inputs": []}', None, "no 'inputs'"),
    (b'{"inputs": [{"name": "title", "datatype": "BYTES", "shape": [1], "data": [3]}]}', None, "is a int"),
    (b'{"inputs": [{"name": "title", "datatype": "BYTES", "shape": [-1], "data": []}]}', None, "shape"),
    (b'{"inputs": [{"name": "title", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', "7", "not valid JSON"),
    (b'{"inputs": [{"name": "title", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', "999", "but the body holds"),
])
def test_malformed_requests_name_the_problem(body, length, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_infer_request(body, length)
    assert e.value.status == 400


def test_v1_items_take_a_data_url_and_say_what_else_is_wrong():
    """What JavaScript clients send: a FileReader data URL is the photo; a URL, a path or a parameter
    inside an item is named for what it is."""
    png = b"\x89PNG\r\n\x1a\n...."
    b64 = base64.b64encode(png).decode()
    items = parse_v1_items({"items": [{"image": f"data:image/png;base64,{b64}"}, {"image": b64, "title": "t"}]})
    assert items.images == [png, png]
    for image, says in (("https://cdn.example.com/a.jpg", "never reads a URL or a file path"),
                        ("/srv/photos/a.jpg", "never reads a URL or a file path"), ("not base64!", "is not base64;")):
        with pytest.raises(RequestError, match=says):
            parse_v1_items({"items": [{"image": image}]})
    with pytest.raises(RequestError, match=r"item 0 has \['top_k'\].*go beside the list"):
        parse_v1_items({"items": [{"title": "t", "top_k": 3}]})


def test_binary_element_longer_than_its_data_is_refused():
    head = b'{"inputs": [{"name": "title", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}'
    with pytest.raises(RequestError, match="says 9 bytes but only 2 remain"):
        parse_infer_request(head + b"\x09\x00\x00\x00ab", str(len(head)))


def test_unknown_output_is_refused():
    tensors = classify_tensors([{"index": 0, "error": "x"}], depth=1)
    req = parse_infer_request(b'{"inputs": [{"name": "title", "datatype": "BYTES", "shape": [1], "data": ["a"]}], '
                              b'"outputs": [{"name": "logits"}]}')
    with pytest.raises(RequestError, match="no output 'logits'"):
        encode_infer_response("huse", tensors, req)


def test_merged_prepared_batches_describe_like_separate_calls(tiny_bundle, tiny_catalog):
    from huse.runtime import Classifier
    from huse.runtime.classifier import Prepared

    photo = (tiny_catalog.parent / "images" / "img_1_3.png").read_bytes()
    with Classifier(tiny_bundle, backend="onnxruntime", threads=1) as clf:
        parts = [clf.prepare([photo, None], ["Acme tee", "Birch boots"]), clf.prepare(None, ["", "tote"], "text"),
                 clf.prepare([b"junk"], None)]
        merged = Prepared.merge(parts)
        got = clf.describe(merged, clf.infer(merged), 3)
        want = [r for p in parts for r in clf.describe(p, clf.infer(p), 3)]
    assert [r.get("error") for r in got] == [r.get("error") for r in want]
    for g, w in zip(got, want):
        assert g.get("mode") == w.get("mode") and g["index"] == w["index"]
        if "top_k" in w:
            assert [t["label"] for t in g["top_k"]] == [t["label"] for t in w["top_k"]]
            np.testing.assert_allclose([t["score"] for t in g["top_k"]], [t["score"] for t in w["top_k"]], atol=1e-5)
