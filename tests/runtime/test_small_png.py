"""Small plain PNGs take a batch path (parsed here, Pillow's own decoder, resized a batch at a time): every
array it gives must be the full path's (`load_image`, what training calls), and anything unusual must take
the full path with every guarantee (errors naming the file, caps, EXIF orientation, alpha, 16 bits).

The PNGs are written here, with each PNG row filter chosen, so every filter the decoder undoes is covered.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from huse.runtime import preprocess as pp
from huse.runtime.errors import HuseError
from huse.runtime.preprocess import ImageSpec, load_image, load_images

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COLOUR_TYPES = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}


def _chunk(cid: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(cid + body))


def _filtered(raw: np.ndarray, ftype: int, bpp: int) -> bytes:
    """PNG scanlines of `raw` (rows x bytes, uint8), every row with filter `ftype` (0 None .. 4 Paeth)."""
    a = raw.astype(np.int32)
    left = np.zeros_like(a)
    left[:, bpp:] = a[:, :-bpp]
    up = np.zeros_like(a)
    up[1:] = a[:-1]
    upleft = np.zeros_like(a)
    upleft[1:, bpp:] = a[:-1, :-bpp]
    if ftype == 0:
        pred = np.zeros_like(a)
    elif ftype == 1:
        pred = left
    elif ftype == 2:
        pred = up
    elif ftype == 3:
        pred = (left + up) // 2
    else:
        p = left + up - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    rows = ((a - pred) % 256).astype(np.uint8)
    return np.concatenate([np.full((len(rows), 1), ftype, np.uint8), rows], axis=1).tobytes()


def _png(arr: np.ndarray, mode: str, ftype: int = 4, before: tuple[bytes, ...] = (), after: tuple[bytes, ...] = (),
         idat_parts: int = 1, depth: int = 8, interlace: int = 0) -> bytes:
    """A PNG of `arr` (H x W x bands uint8) written chunk by chunk: `before`/`after` the image data, which is
    split over `idat_parts` IDAT chunks."""
    h, w = arr.shape[:2]
    bpp = arr.shape[2] if arr.ndim == 3 else 1
    stream = zlib.compress(_filtered(arr.reshape(h, w * bpp), ftype, bpp))
    cut = [len(stream) * k // idat_parts for k in range(idat_parts + 1)]
    ihdr = struct.pack(">IIBBBBB", w, h, depth, COLOUR_TYPES[mode], 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(before)
            + b"".join(_chunk(b"IDAT", stream[cut[k]:cut[k + 1]]) for k in range(idat_parts))
            + b"".join(after) + _chunk(b"IEND", b""))


def _noise(h: int, w: int, mode: str, seed: int = 0) -> np.ndarray:
    bands = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8)
    return arr[..., 0] if bands == 1 else arr


def _spec(size=(64, 64), resize="bilinear", **kw) -> ImageSpec:
    return ImageSpec(size=size, mean=MEAN, std=STD, resize=resize, **kw)


@pytest.fixture
def full_path_calls(monkeypatch):
    """Counts the items that went through the full path (`_decode`) instead of the small-PNG path."""
    calls = []
    real = pp._decode

    def counting(source, *a, **kw):
        calls.append(source)
        return real(source, *a, **kw)

    monkeypatch.setattr(pp, "_decode", counting)
    return calls


def _same_as_alone(sources, spec, batch) -> None:
    """Every item of `batch` is what `load_image` gives it alone: the same array, or the same error."""
    for i, source in enumerate(sources):
        if source is None:  # neither a row nor an error
            assert i not in batch.rows and i not in batch.errors
            continue
        try:
            alone = load_image(source, spec)
        except HuseError as e:
            assert batch.errors[i] == str(e)
            continue
        assert i not in batch.errors
        np.testing.assert_array_equal(batch.array[batch.rows[i]], alone)


@pytest.mark.parametrize("mode", ["L", "RGB", "LA", "RGBA"])
def test_each_mode_and_row_filter_gives_the_full_paths_bytes(mode, full_path_calls):
    # my PNG writer first: Pillow reads back the very pixels written, whatever the filter
    for ftype in range(5):
        arr = _noise(9, 7, mode, ftype)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(_png(arr, mode, ftype)))), arr)
    sources = [_png(_noise(28, 28, mode, seed), mode, ftype=seed % 5) for seed in range(10)]
    spec = _spec()
    batch = load_images(sources, spec)
    assert not full_path_calls and not batch.errors and sorted(batch.rows) == list(range(10))
    _same_as_alone(sources, spec, batch)


@pytest.mark.parametrize("resize", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size, target", [((28, 28), (64, 64)), ((28, 28), (20, 64)), ((60, 200), (64, 20)),
                                          ((200, 60), (20, 64)), ((50, 30), (24, 40)), ((28, 28), (28, 28)),
                                          ((28, 28), (28, 64)), ((1, 5), (13, 31))])
def test_stacked_resize_equals_each_image_resized_alone(size, target, resize, full_path_calls):
    """Both of Pillow's pass orders (rows first; columns first when the height shrinks much more than the
    width), one pass only, and no resize at all."""
    h, w = size
    sources = [_png(_noise(h, w, mode, seed), mode, ftype=4) for seed, mode in enumerate(["RGB", "L", "RGB"])]
    spec = _spec(target, resize)
    batch = load_images(sources, spec)
    assert not full_path_calls
    _same_as_alone(sources, spec, batch)


def test_a_batch_of_many_sizes_and_kinds_keeps_input_order(tmp_path, full_path_calls):
    """More small PNGs than one tall image holds, of two sizes, among items that take the full path."""
    jpeg = io.BytesIO()
    Image.fromarray(_noise(40, 30, "RGB"), "RGB").save(jpeg, "JPEG")
    sources: list = []
    for k in range(150):
        if k % 2:
            sources.append(_png(_noise(28, 28, "L", k), "L", ftype=k % 5))
        elif k % 3:
            path = tmp_path / f"p{k}.png"
            path.write_bytes(_png(_noise(17, 33, "RGB", k), "RGB", ftype=k % 5))
            sources.append(path)
        else:
            sources.append([None, jpeg.getvalue(), b"not an image", tmp_path / "missing.png"][k // 6 % 4])
    spec = _spec((32, 32))
    batch = load_images(sources, spec)
    assert set(batch.errors) == {k for k, s in enumerate(sources) if isinstance(s, bytes) and s == b"not an image"} | \
        {k for k, s in enumerate(sources) if s == tmp_path / "missing.png"}
    others = [s for s in sources if s is not None and not (isinstance(s, bytes) and s.startswith(b"\x89PNG"))
              and not (isinstance(s, type(tmp_path)) and s.name.startswith("p"))]  # JPEG, junk, missing file
    assert len(full_path_calls) == len(others) == 18
    assert list(batch.rows) == sorted(batch.rows) and list(batch.rows.values()) == list(range(len(batch.rows)))
    _same_as_alone(sources, spec, batch)


def _orientation_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    return exif.tobytes()


def _odd_pngs() -> dict[str, bytes]:
    """PNGs the small-PNG path must leave to the full path, each for its own reason."""
    grey, rgb = _noise(12, 20, "L"), _noise(12, 20, "RGB")
    ok = _png(rgb, "RGB")
    broken_ihdr = bytearray(ok)
    broken_ihdr[29] ^= 0xFF  # IHDR's CRC
    bad_filter = _png(grey, "L", ftype=0)
    raw = bytearray(zlib.decompress(bad_filter[41:-16]))
    raw[0] = 9  # no such row filter
    bad_filter = bad_filter[:33] + _chunk(b"IDAT", zlib.compress(bytes(raw))) + _chunk(b"IEND", b"")
    buf = io.BytesIO()
    Image.fromarray(grey, "L").convert("P").save(buf, "PNG")
    deep = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 65536, (12, 20), dtype=np.uint16)).save(deep, "PNG")
    return {
        "exif orientation (eXIf)": _png(rgb, "RGB", before=(_chunk(b"eXIf", _orientation_exif()),)),
        "text after the image": _png(rgb, "RGB", after=(_chunk(b"tEXt", b"Comment\x00hello"),)),
        "transparency (tRNS)": _png(rgb, "RGB", before=(_chunk(b"tRNS", b"\x00\x01\x00\x02\x00\x03"),)),
        "palette": buf.getvalue(),
        "16 bits": deep.getvalue(),
        "interlaced": _png(grey, "L", interlace=1),
        "broken IHDR CRC": bytes(broken_ihdr),
        "unknown row filter": bad_filter,
        "truncated": ok[:60],
        "nothing after IDAT": ok[:-12],
    }


@pytest.mark.parametrize("name", list(_odd_pngs()))
def test_unusual_pngs_take_the_full_path_with_its_result(name, full_path_calls):
    data = _odd_pngs()[name]
    spec = _spec((16, 16))
    batch = load_images([data], spec)
    assert len(full_path_calls) == 1  # not decoded by the small-PNG path
    _same_as_alone([data], spec, batch)


def test_exif_orientation_still_turns_an_otherwise_plain_png():
    rgb = _noise(12, 20, "RGB")
    batch = load_images([_png(rgb, "RGB", before=(_chunk(b"eXIf", _orientation_exif()),))], _spec((20, 12), "nearest"))
    upright = np.asarray(Image.fromarray(rgb, "RGB").transpose(Image.Transpose.ROTATE_270))  # orientation 6
    assert batch.array.shape == (1, 3, 20, 12)
    np.testing.assert_array_equal(load_images([upright], _spec((20, 12), "nearest")).array, batch.array)


def test_inert_chunks_keep_the_small_path_and_broken_ones_leave_it(full_path_calls):
    rgb = _noise(12, 20, "RGB")
    inert = (_chunk(b"gAMA", struct.pack(">I", 45455)), _chunk(b"sRGB", b"\x00"),
             _chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)), _chunk(b"cHRM", bytes(32)))
    plain = _png(rgb, "RGB", before=inert, idat_parts=3)
    bad = bytearray(plain)
    bad[33 + 8 + 4 - 1] ^= 1  # the last byte of gAMA's value: its CRC no longer matches
    spec = _spec((16, 16))
    batch = load_images([plain], spec)
    assert not full_path_calls
    _same_as_alone([plain], spec, batch)
    full_path_calls.clear()
    batch = load_images([bytes(bad)], spec)
    assert len(full_path_calls) == 1
    _same_as_alone([bytes(bad)], spec, batch)


def test_caps_refuse_small_pngs_as_before(tmp_path):
    path = tmp_path / "small.png"
    path.write_bytes(_png(_noise(30, 40, "RGBA"), "RGBA"))
    for spec, says in [(_spec(max_pixels=1000), "over the cap of 1000"),
                       (_spec(max_bytes=10_000), "MiB, over the cap")]:
        batch = load_images([path], spec)
        assert batch.rows == {} and says in batch.errors[0] and str(path) in batch.errors[0]
        with pytest.raises(HuseError) as e:
            load_image(path, spec)
        assert batch.errors[0] == str(e.value)


def test_every_fashion_products_png_gives_the_full_paths_bytes(tmp_path, full_path_calls):
    """The real catalog the bar is measured on: 600 Fashion-MNIST product photos as `huse data export` writes them."""
    from huse.train.fashion import export_catalog, fmnist_dir

    try:
        fmnist_dir()
    except HuseError:
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    export_catalog(tmp_path, limit=200)
    files = sorted((tmp_path / "images").glob("*.png"))
    assert len(files) == 600
    spec = _spec()
    for s in range(0, len(files), 64):
        batch = load_images(files[s:s + 64], spec)
        assert not full_path_calls  # every one took the small-PNG path
        _same_as_alone(files[s:s + 64], spec, batch)
        full_path_calls.clear()
