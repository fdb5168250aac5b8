"""benchmarks/prepare.py's pieces on a few generated files (a correctness check; no figures are read)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from huse.benchmarks import prepare


def _files(tmp_path, n=5):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        img = Image.fromarray(rng.integers(0, 256, (120 + k, 90, 3), dtype=np.uint8))
        out.append(tmp_path / f"{k}.jpg")
        img.save(out[-1], "JPEG", quality=90)
        out.append(tmp_path / f"{k}.png")
        img.convert("L").save(out[-1])
    return out


def test_stage_breakdown_names_every_step_and_prepare_holds_parity(tmp_path):
    from huse.runtime.tokenizer import WordTokenizer

    files = _files(tmp_path)
    titles = ["black leather boots", "red wool scarf"] * 5
    spec = prepare._spec(32)
    stages = prepare.stage_breakdown(files, spec, titles, WordTokenizer.build(titles), seconds=0.01)
    assert set(stages) == {"read_us", "decode_us", "resize_us", "normalise_us", "prepare_us", "tokenise_us"}
    assert all(v > 0 for v in stages.values())
    assert prepare.parity(files, spec)


def test_stage_breakdown_of_small_pngs_adds_the_small_png_steps(tmp_path):
    pngs = [f for f in _files(tmp_path) if f.suffix == ".png"]  # small plain greyscale PNGs, as fashion-products'
    stages = prepare.stage_breakdown(pngs, prepare._spec(32), seconds=0.01)
    assert set(stages) == {"read_us", "decode_us", "resize_us", "normalise_us", "prepare_us", "read_whole_us",
                           "small_png_parse_us", "small_png_decode_resize_us"}
    assert all(v > 0 for v in stages.values())


def test_decoders_read_jpeg_and_draft_never_goes_below_the_input(tmp_path):
    files = _files(tmp_path, 1)
    for side in (None, 32):
        for name, fn in prepare.decoders(side).items():
            px = fn(files[0])
            assert px.ndim == 3 and px.shape[2] == 3, name
            assert min(px.shape[:2]) >= (side or 90), name


def test_thread_scaling_reports_each_pool_size_and_chunk(tmp_path):
    rows = prepare.thread_scaling(_files(tmp_path), prepare._spec(32), seconds=0.01, max_threads=2, chunks=(64, 2))
    assert [(r["threads"], r["chunk"]) for r in rows] == [(1, 64), (2, 64), (1, 2), (2, 2)]
    assert rows[0]["efficiency"] == rows[2]["efficiency"] == 1.0 and all(r["items_s"] > 0 for r in rows)


def test_pillow_loop_is_the_plain_rgb_resize_of_each_file(tmp_path):
    files = _files(tmp_path, 2)
    out = prepare.pillow_loop(32)(files)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    with Image.open(files[1]) as img:  # a greyscale PNG: the loop converts it to RGB first
        expected = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[1], expected)
