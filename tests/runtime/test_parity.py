"""What the model saw in training is bit-for-bit what it sees in serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from huse.runtime import Classifier
from huse.runtime.preprocess import _small_png, load_image
from huse.runtime.tokenizer import normalise_title


def test_train_and_serve_inputs_are_identical(tiny_run, tiny_bundle):
    from huse.train.data import load_source
    from huse.train.trainer import encode_titles
    from huse.runtime.tokenizer import load_tokenizer
    import json

    cfg = json.loads((tiny_run / "config.json").read_text())
    ds = load_source(cfg["data"])
    from huse.runtime.preprocess import ImageSpec

    train_spec = ImageSpec.from_dict(cfg["preprocessing"])
    train_tok = load_tokenizer(cfg["tokenizer"], tiny_run)
    clf = Classifier(tiny_bundle, backend="onnxruntime")
    for i in range(0, len(ds.images), 17):
        # the catalog's PNGs are small plain ones: serving decodes them on the batch path (_decode_small_pngs),
        # training on the full path (Image.open), and the arrays must still be the same bytes
        assert _small_png(Path(ds.images[i]).read_bytes(), train_spec.max_pixels, train_spec.max_bytes)
        train_img = load_image(ds.images[i], train_spec)  # what Trainer feeds the backbone
        served = clf.decode([ds.images[i]])  # what the runtime feeds image.onnx
        assert not served.errors
        assert train_img.dtype == served.array.dtype and np.array_equal(train_img, served.array[0])
        train_ids = encode_titles(train_tok, [ds.titles[i]])["input_ids"].numpy()
        serve_ids = clf.tokenizer.inputs([normalise_title(ds.titles[i]) or ""])["input_ids"]
        assert np.array_equal(train_ids, serve_ids)
