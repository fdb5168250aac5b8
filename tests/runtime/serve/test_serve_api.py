"""`huse serve` answers what the Python API answers: /v2 (tritonclient, binary data on and off),
/v1/classify, /v1/embed and /v1/search, over real sockets to a real server subprocess."""

from __future__ import annotations

import base64
import csv
import json
import urllib.request

import numpy as np
import pytest

from huse.runtime import Classifier
from tests.runtime.serve.conftest import post, post_json

SCORE_TOL = 1e-5  # fp32: the server batches items differently from the reference call


@pytest.fixture(scope="module")
def clf(tiny_bundle):
    with Classifier(tiny_bundle, backend="onnxruntime", threads=1) as c:
        yield c


@pytest.fixture(scope="module")
def items(tiny_catalog):
    """Six products: photo+title, photo only, title only, an empty title, an unreadable photo."""
    rows = list(csv.DictReader(open(tiny_catalog)))[::20]
    photos = [(tiny_catalog.parent / r["image"]).read_bytes() for r in rows]
    titles = [r["name"] for r in rows]
    images = [photos[0], photos[1], None, photos[3], b"not a photo", photos[5]]
    titles = [titles[0], None, titles[2], "", "Acme navy tee", titles[5]]
    return images, titles


def same_results(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w), (g, w)
        assert g.get("error") == w.get("error") and g.get("warning") == w.get("warning")
        if "top_k" in w:
            assert g["mode"] == w["mode"]
            assert [t["label"] for t in g["top_k"]] == [t["label"] for t in w["top_k"]]
            np.testing.assert_allclose([t["score"] for t in g["top_k"]], [t["score"] for t in w["top_k"]], atol=SCORE_TOL)
            assert [(p["level"], p["label"]) for p in g["path"]] == [(p["level"], p["label"]) for p in w["path"]]
            np.testing.assert_allclose([p["score"] for p in g["path"]], [p["score"] for p in w["path"]], atol=SCORE_TOL)


def test_health_metadata_and_readiness(server):
    with urllib.request.urlopen(server.url + "/v2/health/live") as r:
        assert r.status == 200
    with urllib.request.urlopen(server.url + "/v2/health/ready") as r:
        assert r.status == 200
    with urllib.request.urlopen(server.url + "/v2") as r:
        meta = json.loads(r.read())
    assert meta["name"] == "huse" and "binary_tensor_data" in meta["extensions"]
    with urllib.request.urlopen(server.url + "/v2/models/huse") as r:
        meta = json.loads(r.read())
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "title": "BYTES"}
    assert {o["name"] for o in meta["outputs"]} >= {"top_k_labels", "top_k_scores", "path_labels", "needs_review", "error"}
    status, _, body = post(server.url + "/v2/models/nope/infer", b"{}")
    assert status == 404 and "huse_embed" in json.loads(body)["error"]


def test_v1_classify_equals_the_python_api(server, clf, items):
    images, titles = items
    req = {"items": [{k: v for k, v in (("image", base64.b64encode(i).decode() if i else None), ("title", t))
                      if v is not None} for i, t in zip(images, titles)], "top_k": 3}
    status, got = post_json(server.url + "/v1/classify", req)
    assert status == 200, got
    same_results(got["results"], clf.classify(images=images, titles=titles, top_k=3))
    assert "error" in got["results"][4] or "warning" in got["results"][4]


def test_v1_fields_a_route_does_not_take_are_refused_by_name(server):
    for route, body, field in [("/v1/classify", {"items": [{"title": "Acme navy tee"}], "topk": 3}, "topk"),
                               ("/v1/classify", {"items": [{"title": "Acme navy tee"}], "space": "visual"}, "space"),
                               ("/v1/embed", {"items": [{"title": "Acme navy tee"}], "top_k": 3}, "top_k")]:
        status, got = post_json(server.url + route, body)
        assert status == 400 and f"['{field}']" in got["error"] and "items" in got["error"], (route, got)
    status, got = post_json(server.url + "/v1/classify", {"items": [{"title": "Acme navy tee"}], "top_k": 2,
                                                          "mode": "text"})
    assert status == 200 and len(got["results"][0]["top_k"]) == 2, got
    # one item as the object itself (as a /v1/search query): the same answer as a list of one
    status, one = post_json(server.url + "/v1/classify", {"title": "Acme navy tee", "top_k": 2, "mode": "text"})
    assert status == 200 and one == got, one
    status, emb = post_json(server.url + "/v1/embed", {"title": "Acme navy tee"})
    status_list, emb_list = post_json(server.url + "/v1/embed", {"items": [{"title": "Acme navy tee"}]})
    assert status == status_list == 200 and emb == emb_list and len(emb["results"]) == 1, emb
    status, bad = post_json(server.url + "/v1/classify", {"name": "Acme navy tee"})  # neither items nor an item
    assert status == 400 and 'or one item {"image"' in bad["error"], bad


def test_v1_classify_multipart_upload(server, clf, items):
    images, titles = items
    boundary = "huse-test-boundary"
    parts = []
    for i, (img, title) in enumerate(zip(images[:2], titles[:2])):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p{i}.png"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + img + b"\r\n")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="title"\r\n\r\n{title or ""}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, out = post(server.url + "/v1/classify", body,
                          {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, out
    same_results(json.loads(out)["results"], clf.classify(images=images[:2], titles=titles[:2]))
    # a field the route does not take is named, not ignored (as in a JSON request): here a file field 'photo'
    photo = (f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="p.png"\r\n'
             f'Content-Type: image/png\r\n\r\n'.encode() + images[0] + f"\r\n--{boundary}--\r\n".encode())
    status, _, out = post(server.url + "/v1/classify", photo, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "unknown field(s) ['photo'] in the upload" in json.loads(out)["error"], out


def test_v1_embed_equals_the_python_api(server, clf, items):
    images, titles = items
    req = {"items": [{"image": base64.b64encode(images[0]).decode()}, {"title": titles[2]},
                     {"image": base64.b64encode(b"junk").decode()}]}
    status, got = post_json(server.url + "/v1/embed", req)
    assert status == 200, got
    res = got["results"]
    np.testing.assert_allclose(res[0]["embedding"], clf.embed_image([images[0]]).vectors[0], atol=1e-5)
    np.testing.assert_allclose(res[1]["embedding"], clf.embed_text([titles[2]]).vectors[0], atol=1e-5)
    assert "embedding" not in res[2] and res[2]["error"] == clf.embed_image([b"junk"]).errors[0]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_classifies_like_the_python_api(server, clf, items, binary):
    """NVIDIA's own client, unmodified: BYTES inputs, binary data on and off."""
    httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    images, titles = items
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_model_ready("huse")
        # JSON cannot hold raw bytes: with binary data off a photo travels base64-encoded.
        photo = np.array([(i if binary else base64.b64encode(i)) if i else b"" for i in images], dtype=object)
        title = np.array([(t or "").encode() for t in titles], dtype=object)
        inputs = [httpclient.InferInput("image", [len(images)], "BYTES"),
                  httpclient.InferInput("title", [len(images), 1], "BYTES")]
        inputs[0].set_data_from_numpy(photo, binary_data=binary)
        inputs[1].set_data_from_numpy(title.reshape(-1, 1), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                   for n in ("top_k_labels", "top_k_scores", "path_labels", "path_scores", "mode", "error", "warning")]
        result = client.infer("huse", inputs, outputs=outputs, parameters={"top_k": 3})
    finally:
        client.close()
    want = clf.classify(images=images, titles=titles, top_k=3)

    def text(x):
        return x.decode() if isinstance(x, bytes) else x
    labels, scores = result.as_numpy("top_k_labels"), result.as_numpy("top_k_scores")
    path_labels, errors = result.as_numpy("path_labels"), result.as_numpy("error")
    assert labels.shape == (len(images), 3) and scores.dtype == np.float32
    for i, w in enumerate(want):
        assert text(errors[i, 0]) == w.get("error", "")
        assert text(result.as_numpy("warning")[i, 0]) == w.get("warning", "")
        if "top_k" not in w:
            continue
        assert [text(x) for x in labels[i]] == [t["label"] for t in w["top_k"]]
        np.testing.assert_allclose(scores[i], [t["score"] for t in w["top_k"]], atol=SCORE_TOL)
        assert [text(x) for x in path_labels[i] if text(x)] == [p["label"] for p in w["path"]]
        assert text(result.as_numpy("mode")[i, 0]) == w["mode"]


def test_tritonclient_embeds(server, clf, items):
    httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    images, _ = items
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("image", [2], "BYTES")
        inp.set_data_from_numpy(np.array([images[0], b"junk"], dtype=object))
        result = client.infer("huse_embed", [inp])  # no outputs named: all of them, binary
        # the client's own parameters (binary_data_output, priority, timeout) pass; a misspelt one is named
        client.infer("huse_embed", [inp], priority=1, timeout=10_000_000, parameters={"space": "universal"})
        with pytest.raises(Exception, match=r"unknown field\(s\) \['topk'\] in the parameters of a 'huse' request"):
            client.infer("huse", [inp], parameters={"topk": 3})  # it was answered with the default 5
    finally:
        client.close()
    emb = result.as_numpy("embedding")
    np.testing.assert_allclose(emb[0], clf.embed_image([images[0]]).vectors[0], atol=1e-5)
    assert np.isnan(emb[1]).all() and result.as_numpy("error")[1, 0]
