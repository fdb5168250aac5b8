"""Image decoding and preprocessing: every documented normalisation and refusal.

All images are made here with Pillow/numpy; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from huse.runtime.errors import HuseError
from huse.runtime.preprocess import ImageSpec, decode_image, load_image, preprocess

# fp32 normalisation: x * float32(1/255) then (x - mean) / std, all in float32;
# compared with the float64 formula, a few ulps of a value of order 1.
FP32_ATOL = 1e-6

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _pixels(img: Image.Image) -> list:
    assert img.mode == "RGB"
    return np.asarray(img).tolist()


def _expected(rgb, mean=MEAN, std=STD) -> np.ndarray:
    return (np.asarray(rgb, np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


# --- normalisations -------------------------------------------------------------------------

def test_rgb_pixel_maps_to_normalised_value():
    arr = np.array([[[0, 128, 255], [10, 20, 30]],
                    [[255, 255, 255], [1, 2, 3]]], dtype=np.uint8)
    spec = ImageSpec(size=(2, 2), mean=MEAN, std=STD)
    x = load_image(_png(Image.fromarray(arr, "RGB")), spec)
    assert x.dtype == np.float32
    assert x.shape == (3, 2, 2)
    assert x.flags["C_CONTIGUOUS"]
    for r in range(2):
        for c in range(2):
            np.testing.assert_allclose(x[:, r, c], _expected(arr[r, c]), rtol=0, atol=FP32_ATOL)


def test_rgb_image_is_passed_through_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_image(_png(Image.fromarray(arr, "RGB")))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), arr)


def test_resize_gives_spec_shape_and_keeps_a_uniform_colour():
    spec = ImageSpec(size=(4, 6), mean=MEAN, std=STD, resize="bicubic")
    x = load_image(Image.new("RGB", (17, 9), (200, 50, 25)), spec)
    assert x.shape == (3, 4, 6)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    expected = _expected((200, 50, 25))
    for ch in range(3):
        np.testing.assert_allclose(x[ch], np.full((4, 6), expected[ch]), rtol=0, atol=FP32_ATOL)


def test_preprocess_channel_order_is_rgb_in_nchw():
    img = Image.new("RGB", (3, 2), (255, 0, 0))
    x = preprocess(img, ImageSpec(size=(2, 3), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    assert x.shape == (3, 2, 3)
    np.testing.assert_array_equal(x[0], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(x[1], np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(x[2], np.zeros((2, 3), np.float32))


def test_rgba_is_composited_on_white():
    arr = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = decode_image(_png(Image.fromarray(arr, "RGBA")))
    px = _pixels(out)
    assert px[0][0] == [255, 255, 255]  # fully transparent red -> white, not red or black
    assert px[0][1] == [0, 0, 255]  # opaque stays as it is
    # half-transparent black over white is mid grey (Pillow's integer blend: within 1)
    assert all(abs(v - 127) <= 1 for v in px[0][2])


def test_la_is_composited_on_white():
    arr = np.array([[[0, 0], [40, 255]]], dtype=np.uint8)
    img = Image.fromarray(arr, "LA")
    assert img.mode == "LA"
    assert _pixels(decode_image(_png(img))) == [[[255, 255, 255], [40, 40, 40]]]


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    data = _png(img, transparency=0)  # palette index 0 is fully transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert _pixels(decode_image(data)) == [[[255, 255, 255], [200, 100, 50]]]


def test_16bit_greyscale_is_scaled_by_its_range():
    a = np.array([[100, 1100], [600, 350]], dtype=np.uint16)
    data = _png(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    # (v - 100) * 255 / 1000, rounded: 0, 255, 127.5 -> 128, 63.75 -> 64
    assert _pixels(out) == [[[0, 0, 0], [255, 255, 255]], [[128, 128, 128], [64, 64, 64]]]


def test_32bit_int_greyscale_is_scaled_by_its_range():
    img = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert img.mode == "I"
    assert _pixels(decode_image(img)) == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_float_greyscale_is_scaled_by_its_range():
    img = Image.fromarray(np.array([[0.5, 0.75, 1.5]], dtype=np.float32))
    assert img.mode == "F"
    # (0.75 - 0.5) / 1.0 * 255 = 63.75 -> 64
    assert _pixels(decode_image(img)) == [[[0, 0, 0], [64, 64, 64], [255, 255, 255]]]


def test_constant_wide_greyscale_becomes_black_not_nan():
    img = Image.fromarray(np.full((2, 2), 777, dtype=np.int32))
    assert _pixels(decode_image(img)) == [[[0, 0, 0]] * 2] * 2


def test_cmyk_is_converted_to_rgb():
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    img.putpixel((1, 0), (0, 0, 0, 0))  # no ink: white
    assert _pixels(decode_image(img)) == [[[255, 0, 0], [255, 255, 255]]]


def test_greyscale_becomes_rgb_with_equal_channels():
    arr = np.array([[0, 77, 255]], dtype=np.uint8)
    out = decode_image(_png(Image.fromarray(arr, "L")))
    assert _pixels(out) == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_bilevel_becomes_rgb_with_equal_channels():
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    data = _png(img)
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert _pixels(decode_image(data)) == [[[0, 0, 0], [255, 255, 255]]]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 0))
    img.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = decode_image(_png(img, exif=exif))
    assert out.size == (1, 2)  # (width, height): the 2x1 image now stands upright
    assert _pixels(out) == [[[255, 0, 0]], [[0, 0, 255]]]  # left pixel ends on top


def test_no_exif_keeps_orientation():
    out = decode_image(_png(Image.new("RGB", (2, 1))))
    assert out.size == (2, 1)


# --- arrays ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1), (3, 4, 3), (3, 4, 4)])
def test_uint8_arrays_are_accepted(shape):
    arr = np.full(shape, 90, dtype=np.uint8)
    if len(shape) == 3 and shape[2] == 4:
        arr[..., 3] = 255  # opaque, so the composite keeps the value
    out = decode_image(arr)
    assert out.size == (4, 3)
    assert _pixels(out) == [[[90, 90, 90]] * 4] * 3


def test_transparent_rgba_array_becomes_white():
    arr = np.zeros((1, 1, 4), dtype=np.uint8)
    assert _pixels(decode_image(arr)) == [[[255, 255, 255]]]


@pytest.mark.parametrize("arr", [
    np.zeros((3, 4, 3), dtype=np.float32),
    np.zeros((3, 4, 3), dtype=np.uint16),
    np.zeros((3, 4, 3), dtype=np.int64),
    np.zeros((3, 4, 2), dtype=np.uint8),
    np.zeros((2, 3, 4, 3), dtype=np.uint8),
    np.zeros((5,), dtype=np.uint8),
], ids=["float32", "uint16", "int64", "2-channels", "4-dims", "1-dim"])
def test_other_arrays_are_refused(arr):
    with pytest.raises(HuseError, match="uint8 HxW, HxWx1, HxWx3 or HxWx4") as e:
        decode_image(arr)
    assert str(arr.dtype) in str(e.value)
    assert str(arr.shape) in str(e.value)


@pytest.mark.parametrize("arr, hint", [
    (np.zeros((3, 8, 8), dtype=np.uint8), "channels-first (CxHxW): pass a.transpose(1, 2, 0)"),
    (np.zeros((8, 8, 3), dtype=np.float32), "(a * 255).round().astype(np.uint8)"),
    (np.zeros((3, 8, 8), dtype=np.float32), "channels-first"),
], ids=["chw", "float", "chw-float"])
def test_a_tensor_handed_over_as_an_image_is_refused_with_the_fix(arr, hint):
    """What torch pipelines hold (CxHxW, floats in [0, 1]) is refused, saying how to pass it instead."""
    with pytest.raises(HuseError, match=re.escape(hint)):
        decode_image(arr)
    assert "channels-first" not in _refusal(np.zeros((8, 8, 2), dtype=np.uint8))


def _refusal(arr) -> str:
    with pytest.raises(HuseError) as e:
        decode_image(arr)
    return str(e.value)


# --- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [np.zeros((0, 5), dtype=np.uint8), Image.new("RGB", (0, 0))],
                         ids=["array", "pillow"])
def test_zero_size_is_refused_naming_the_item(source):
    with pytest.raises(HuseError) as e:
        decode_image(source)
    msg = str(e.value)
    assert "zero size" in msg
    assert f"<{type(source).__name__}>" in msg


def test_over_max_pixels_is_refused_before_decoding(tmp_path):
    # A header that says 100x100, then no pixel data: decoding would fail with a
    # different error, so getting the cap error proves the check comes first.
    data = _png(Image.new("L", (100, 100), 7))
    path = tmp_path / "huge.png"
    path.write_bytes(data[:60])
    with pytest.raises(HuseError) as e:
        decode_image(path, max_pixels=50)
    msg = str(e.value)
    assert str(path) in msg
    assert "100x100 = 10000 pixels" in msg
    assert "cap of 50" in msg
    assert "raise max_pixels" in msg


def test_max_pixels_from_spec_is_used_by_load_image(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(_png(Image.new("RGB", (10, 10))))
    spec = ImageSpec(size=(2, 2), mean=MEAN, std=STD, max_pixels=99)
    with pytest.raises(HuseError, match="cap of 99"):
        load_image(path, spec)
    assert load_image(path, ImageSpec(size=(2, 2), mean=MEAN, std=STD, max_pixels=100)).shape == (3, 2, 2)


def test_image_at_max_pixels_is_accepted():
    assert decode_image(np.zeros((5, 10), np.uint8), max_pixels=50).size == (10, 5)


def test_truncated_png_file_is_refused_naming_it(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png(Image.fromarray(arr, "RGB"))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HuseError) as e:
        decode_image(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "could not be decoded" in msg
    assert "check that the file is a complete JPEG/PNG/WebP image" in msg


def test_corrupt_png_bytes_are_refused():
    arr = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = bytearray(_png(Image.fromarray(arr, "RGB")))
    data[60:80] = b"\x00" * 20  # inside the compressed pixel data
    with pytest.raises(HuseError, match="<bytes> could not be decoded.*complete JPEG/PNG/WebP"):
        decode_image(bytes(data))


def test_random_bytes_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(HuseError) as e:
        decode_image(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "check that the file is a complete JPEG/PNG/WebP image" in msg


@pytest.mark.parametrize("content, says", [
    (b"", "it is empty (0 bytes)"),
    (b"\n<!DOCTYPE html><html><body>403 Forbidden</body></html>", "it is an HTML page, not a photo"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "it is an SVG drawing: rasterise it first"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "it is a HEIC/HEIF photo"),
    (b"\xff\x0a\xfa\x7f" + bytes(64), "it is a JPEG XL image"),
    (b"%PDF-1.7\n", "it is a PDF document"),
    (b'{"error": "not found"}', "it is JSON text, not a photo"),
])
def test_a_file_that_is_not_a_photo_is_named_for_what_it_is(tmp_path, content, says):
    """Catalogs gathered by download or export hold error pages, drawings and phone photos named .jpg: the
    error says what the file is and what to do, not only that Pillow could not identify it."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(HuseError, match=f"image {re.escape(str(path))} could not be decoded: {re.escape(says)}"):
        decode_image(path)
    if content:  # the same for the bytes themselves (a server's client, a Parquet catalog)
        with pytest.raises(HuseError, match=f"image <bytes> could not be decoded: {re.escape(says)}"):
            decode_image(content)


def test_random_bytes_are_refused():
    with pytest.raises(HuseError, match="<bytes> could not be decoded"):
        decode_image(b"not an image at all")


def test_missing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(HuseError, match="does not exist") as e:
        decode_image(path)
    assert str(path) in str(e.value)
    with pytest.raises(HuseError, match="does not exist"):
        decode_image(str(path))


# --- ImageSpec ------------------------------------------------------------------------------

def test_image_spec_round_trips_through_dict():
    spec = ImageSpec(size=(224, 200), mean=MEAN, std=STD, resize="bicubic", max_pixels=1234)
    d = spec.to_dict()
    assert d["size"] == [224, 200] and d["mean"] == list(MEAN) and d["std"] == list(STD)
    assert ImageSpec.from_dict(json.loads(json.dumps(d))) == spec


def test_image_spec_defaults_fill_missing_keys():
    spec = ImageSpec.from_dict({"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]})
    # A manifest without jpeg_draft predates draft decoding: its model saw full JPEG decodes.
    assert spec == ImageSpec(size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), jpeg_draft=False)
    assert spec.resize == "bilinear"
    assert ImageSpec(size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1)).jpeg_draft  # new specs (training) draft


def test_unknown_resize_is_refused_listing_known():
    d = ImageSpec(size=(8, 8), mean=MEAN, std=STD).to_dict()
    d["resize"] = "lanczos5"
    with pytest.raises(HuseError, match="lanczos5") as e:
        ImageSpec.from_dict(d)
    assert "['bicubic', 'bilinear', 'nearest']" in str(e.value)


def test_normalisation_is_bit_identical_to_the_formula():
    """The in-place channel arithmetic must equal normalising each pixel directly, to the last bit."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    for mean, std in [(MEAN, STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.1, 0.7, 0.33), (0.9, 0.05, 1.7))]:
        spec = ImageSpec(size=(9, 11), mean=mean, std=std)
        direct = np.asarray(arr, np.float32) * np.float32(1.0 / 255.0)
        direct = ((direct - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)
        got = preprocess(Image.fromarray(arr, "RGB"), spec)
        assert got.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(got, direct)


# --- memory caps, draft decoding, warnings, confinement -------------------------------------

def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_16bit_image_under_the_pixel_cap_is_refused_by_the_byte_cap():
    # 4000x4000 16-bit: 16 MP, far under the 50 MP pixel cap, yet ~110 MiB to decode and convert.
    data = _png(Image.fromarray(np.zeros((4000, 4000), np.uint16)))
    assert len(data) < 200_000
    with pytest.raises(HuseError, match=r"<bytes>: decoding it \(4000x4000, mode I;16\) would take about 107 MiB, "
                                        r"over the cap of 64 MiB"):
        decode_image(data, max_bytes=64 * 2**20)
    assert decode_image(data, max_bytes=128 * 2**20).size == (4000, 4000)


def test_default_byte_cap_refuses_a_16bit_7000_square_png(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.zeros((7000, 7000), np.uint16)).save(path)
    with pytest.raises(HuseError, match="over the cap of 256 MiB") as e:
        load_image(path, ImageSpec(size=(8, 8), mean=MEAN, std=STD))
    assert str(path) in str(e.value)


def test_16bit_chunked_scaling_matches_the_whole_image_formula():
    a = np.random.default_rng(4).integers(0, 65536, (600, 7), dtype=np.uint16)  # > one 256-row band
    out = np.asarray(decode_image(Image.fromarray(a)))[..., 0]
    lo, hi = float(a.min()), float(a.max())
    np.testing.assert_array_equal(out, np.round((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def test_large_jpeg_is_draft_decoded_when_the_spec_says_so():
    data = _jpeg(Image.new("RGB", (1600, 1200), (30, 120, 200)))
    full = decode_image(data)
    assert full.size == (1600, 1200)
    # draft picks the largest reduction (1/2, 1/4, 1/8) that keeps both sides >= 64x64's longest side
    small = decode_image(data, draft_size=(64, 64))
    assert small.size == (200, 150)
    x = load_image(data, ImageSpec(size=(64, 64), mean=MEAN, std=STD))  # jpeg_draft on by default
    np.testing.assert_allclose(x[:, 10, 10], _expected((30, 120, 200)), atol=0.05)
    # a PNG is never drafted
    assert decode_image(_png(Image.new("RGB", (1600, 1200))), draft_size=(64, 64)).size == (1600, 1200)


def test_draft_never_goes_below_the_target_even_when_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the 1600x400 image stands 400x1600
    data = _jpeg(Image.new("RGB", (1600, 400), (0, 0, 0)), exif=exif)
    img = decode_image(data, draft_size=(300, 100))
    assert img.size[0] >= 100 and img.size[1] >= 300
    assert img.size[1] > img.size[0]  # rotation still applied


def _corrupt_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Acme camera maker"  # Make: an ASCII tag whose value lives past the IFD
    good = exif.tobytes()
    # Claim far more bytes for the tag's value than the EXIF block holds: Pillow warns and skips it.
    order = "little" if good[6:8] == b"II" else "big"  # after the "Exif\0\0" header
    bad = bytearray(good)
    at = bad.find((0x010F).to_bytes(2, order))
    bad[at + 4:at + 8] = (100000).to_bytes(4, order)  # the entry's count
    return _jpeg(Image.new("RGB", (8, 8), (10, 20, 30)), exif=bytes(bad))


def test_pillow_warning_becomes_the_items_warning_naming_it(tmp_path):
    path = tmp_path / "odd exif.jpg"
    path.write_bytes(_corrupt_exif_jpeg())
    said: list[str] = []
    x = load_image(path, ImageSpec(size=(8, 8), mean=MEAN, std=STD), warnings=said)
    assert x.shape == (3, 8, 8)
    assert said and all(w.startswith(f"image {path}: UserWarning:") for w in said)
    assert "Skipping tag 271" in " ".join(said)  # the EXIF Make tag


@pytest.mark.parametrize("bad, why", [("/etc/hostname", "is absolute"), ("../secret.png", "climbs out with '..'"),
                                      ("a/../../b.png", "climbs out"), ("C:\\x.png", "is absolute"),
                                      ("a\\..\\..\\b.png", "climbs out"), ("", "is empty")])
def test_confine_path_refuses_escapes(tmp_path, bad, why):
    with pytest.raises(HuseError, match="image reads are confined to") as e:
        from huse.runtime.preprocess import confine_path

        confine_path(tmp_path, bad)
    assert why in str(e.value) and repr(bad) in str(e.value)


def test_confine_path_refuses_a_link_out_and_keeps_paths_inside(tmp_path):
    from huse.runtime.preprocess import confine_path

    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "out").symlink_to(tmp_path)
    assert confine_path(tmp_path / "images", "sub/a.png") == tmp_path / "images" / "sub" / "a.png"
    assert confine_path(tmp_path / "images", "./sub/../sub/a.png".replace("../sub/", "")) == tmp_path / "images" / "./sub/a.png"
    with pytest.raises(HuseError, match="through a link"):
        confine_path(tmp_path / "images", "out/catalog.csv")


@pytest.mark.parametrize("item", [7, {"path": "a.png"}, 3.5, ["a.png"]], ids=["int", "dict", "float", "list"])
def test_other_input_types_are_refused_as_the_items_error(item):
    with pytest.raises(HuseError, match=f"an image must be a file path, encoded bytes, a PIL image or a uint8 array; "
                                        f"got {type(item).__name__}"):
        decode_image(item)


# --- batches: the serving path gives each image the bytes training gives it alone -----------

def _mixed_sources(tmp_path):
    rng = np.random.default_rng(7)
    grey = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(grey)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8), "RGB"), exif=exif)
    rgba = rng.integers(0, 256, (30, 20, 4), dtype=np.uint8)
    deep = Image.fromarray(rng.integers(0, 65536, (50, 30), dtype=np.uint16))
    big_jpeg = _jpeg(Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), "RGB"))
    return [grey, rotated, None, _png(Image.fromarray(rgba, "RGBA")), b"not an image", deep, big_jpeg,
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]


@pytest.mark.parametrize("size, resize", [((64, 64), "bilinear"), ((24, 40), "bicubic"), ((64, 64), "nearest")])
def test_batch_rows_are_bit_identical_to_single_images(tmp_path, size, resize):
    from huse.runtime.preprocess import load_images

    spec = ImageSpec(size=size, mean=MEAN, std=STD, resize=resize)
    sources = _mixed_sources(tmp_path)
    batch = load_images(sources, spec)
    assert set(batch.errors) == {4} and "<bytes> could not be decoded" in batch.errors[4]
    assert sorted(batch.rows) == [0, 1, 3, 5, 6, 7]  # None is neither a row nor an error
    assert batch.array.shape == (6, 3, *size) and batch.array.dtype == np.float32
    for i, row in batch.rows.items():
        alone = load_image(sources[i], spec)  # what training computes, one image at a time
        np.testing.assert_array_equal(batch.array[row], alone)
        # and the long way round: decode to RGB, resize and normalise that one image
        np.testing.assert_array_equal(alone, preprocess(decode_image(sources[i], draft_size=size), spec))
    np.testing.assert_array_equal(batch.stack([1, 5]), batch.array[[1, 3]])
    assert batch.stack(sorted(batch.rows)) is batch.array  # all of them, in order: no copy


@pytest.mark.parametrize("resize", ["bilinear", "bicubic", "nearest"])
def test_greyscale_resized_as_one_plane_equals_resizing_its_rgb_copy(resize):
    """The fast path resizes L images as L: the bytes must equal resizing the RGB conversion."""
    rng = np.random.default_rng(11)
    for h, w in [(28, 28), (1, 5), (300, 17), (97, 203)]:
        grey = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        for size in [(64, 64), (224, 224), (13, 31)]:
            spec = ImageSpec(size=size, mean=MEAN, std=STD, resize=resize)
            np.testing.assert_array_equal(load_image(_png(grey), spec), preprocess(grey.convert("RGB"), spec))


def test_xmp_orientation_is_applied():
    """Images without EXIF skip the EXIF parse; an XMP orientation (which Pillow also reads) still counts."""
    from PIL import PngImagePlugin

    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 0))
    img.putpixel((1, 0), (0, 0, 255))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    out = decode_image(_png(img, pnginfo=info))
    assert out.size == (1, 2)
    assert _pixels(out) == [[[255, 0, 0]], [[0, 0, 255]]]


def test_batch_warnings_name_their_item_and_leave_the_warnings_module_as_it_was(tmp_path):
    import threading
    import warnings as pywarnings

    from huse.runtime.preprocess import load_images

    bad = tmp_path / "odd exif.jpg"
    bad.write_bytes(_corrupt_exif_jpeg())
    good = tmp_path / "fine.png"
    good.write_bytes(_png(Image.new("RGB", (8, 8), (1, 2, 3))))
    spec = ImageSpec(size=(8, 8), mean=MEAN, std=STD)
    before = (pywarnings.showwarning, list(pywarnings.filters))
    results, failures = {}, []

    def work(k):  # threads decoding at once, as the prepare pool does: each item keeps its own warnings
        try:
            for _ in range(20):
                sources = [good, bad] if k % 2 else [bad, good, bad]
                results.setdefault(k, []).append(load_images(sources, spec).warnings)
        except Exception as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    for k, runs in results.items():
        for said in runs:
            assert sorted(said) == ([1] if k % 2 else [0, 2])
            assert all(w.startswith(f"image {bad}: UserWarning:") and "Skipping tag 271" in w for w in said.values())
    assert (pywarnings.showwarning, list(pywarnings.filters)) == before
    with pytest.warns(UserWarning, match="Skipping tag 271"):  # uncollected, they reach the warnings module
        load_images([bad], spec, warnings=False)


# --- how files are opened ---------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_a_folder_named_as_an_image_is_refused_without_blocking(tmp_path):
    import os

    from huse.runtime.preprocess import load_images

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: a blocking open would hang here
    spec = ImageSpec(size=(8, 8), mean=MEAN, std=STD)
    batch = load_images([fifo, tmp_path], spec)
    assert batch.rows == {}
    assert batch.errors == {0: f"image file {fifo} is not a file", 1: f"image file {tmp_path} is not a file"}


def test_files_read_whole_and_streamed_give_the_same_arrays(tmp_path, monkeypatch):
    from huse.runtime import preprocess as pp

    sources = [s for s in _mixed_sources(tmp_path) if s is not None]
    paths = []
    for k, s in enumerate(sources):  # every source as a file, so both ways of reading a file are used
        if isinstance(s, np.ndarray):
            s = _png(Image.fromarray(s))
        if isinstance(s, bytes):
            (tmp_path / f"f{k}.img").write_bytes(s)
            s = tmp_path / f"f{k}.img"
        paths.append(s)
    spec = ImageSpec(size=(24, 40), mean=MEAN, std=STD)
    whole = pp.load_images(paths, spec)
    monkeypatch.setattr(pp, "_READ_WHOLE", 0)  # every file streamed, as files over the limit are
    streamed = pp.load_images(paths, spec)
    assert whole.rows == streamed.rows and len(whole.rows) == len(paths) - 1
    assert whole.errors.keys() == streamed.errors.keys() == {3}  # b"not an image", now a file
    np.testing.assert_array_equal(whole.array, streamed.array)


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "WEBP", "PNG", "JPEG"])
def test_every_format_decodes_whatever_the_file_is_called(tmp_path, fmt):
    # The format is taken from the file's first bytes (PNG, JPEG, WebP) or probed by Pillow (others);
    # the name's extension plays no part.
    arr = np.random.default_rng(7).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, fmt)
    path = tmp_path / "photo.jpg"
    path.write_bytes(buf.getvalue())
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert _pixels(decode_image(path)) == expected.tolist()
    assert _pixels(decode_image(buf.getvalue())) == expected.tolist()


@pytest.mark.parametrize("path, says", [
    ("photos\\shoes\\boot.jpg", "does not exist; it has backslashes: a Windows path? write / between folders"),
    ("https://cdn.example.com/boot.jpg", "is a URL: huse reads photos from files or bytes, never from the network"),
    ("photos/shoes/boot.jpg", "image file photos/shoes/boot.jpg does not exist"),
])
def test_a_missing_photo_says_what_its_name_looks_like(tmp_path, monkeypatch, path, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HuseError, match=re.escape(says)) as e:
        decode_image(path)
    assert ("backslashes" in str(e.value)) == ("\\" in path)
    assert str(e.value).count(path) == 1  # named once, not "image P: image file P ..."
