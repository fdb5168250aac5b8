"""Image decoding and preprocessing: the one implementation used by training and serving.

Training imports `load_image` from here and serving calls `load_images` (the same steps, a batch
at a time), so the array a model saw in training is bit-for-bit the array it sees in serving
(tests/runtime/test_parity.py, tests/runtime/test_preprocess.py).

A batch costs about what Pillow's decoder costs: each image is resized (an L image as one plane) into
one planar uint8 buffer, the EXIF parse is skipped for images that carry no orientation metadata, and
the batch is normalised in one vectorised pass (benchmarks/prepare.py measures it against the decoder).
Small plain PNGs (thumbnails: 8-bit, no metadata) skip `Image.open` and are decoded by Pillow's own PNG
decoder and resized a batch at a time, to the same bytes (`_decode_small_pngs`).

Documented normalisations of awkward inputs (each item either normalises or fails alone):
- EXIF orientation is applied.
- Alpha (RGBA, LA, palette with transparency) is composited onto white, the usual
  background of product photos.
- 16-bit and 32-bit greyscale ("I;16", "I", "F") are scaled to 8 bits by their own range.
- CMYK, greyscale and bilevel images are converted to RGB.
- Images with more than `max_pixels` pixels are refused before decoding (no decompression bomb),
  and so are images whose decoding would need more than `max_bytes` of memory (decoded pixels
  plus the conversion to 8-bit RGB): pixels alone undercount a 16-bit or RGBA image.
- Large JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, Pillow's `draft`) when the
  spec's `jpeg_draft` is on and the target size allows it: 1/2, 1/4 or 1/8, never below the
  target. It changes pixel values slightly, so it is part of the spec that training and serving
  share (bundles made before it have no `jpeg_draft` key and decode JPEGs in full).
- Pillow's warnings (corrupt EXIF, decompression bomb) are reported per item by `load_images` and
  `load_image` (`warnings=`), naming the file, instead of going to stderr, without making
  concurrent decodes take turns (`_WarningCapture`).
- Zero-size or undecodable images, or inputs of another type, are refused with an error naming the item.

`confine_path(base, path)` refuses absolute paths and `..` for catalogs from third parties
(the catalog and CLI code call it when asked to confine image reads to the images folder).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from huse.runtime.errors import HuseError

ImageInput = Union[str, Path, bytes, "Image.Image", np.ndarray]

# 50 megapixels: far above any product photo, far below what exhausts a 4 GB Jetson.
DEFAULT_MAX_PIXELS = 50_000_000
# 256 MiB for one decode: a 50 MP RGB JPEG (150 MB) passes; a 7000x7000 16-bit PNG (a 110 KB
# file, ~340 MB to decode and convert) does not. One image per item, so a batch's decoding peak
# stays one image's, well inside a 4 GB Jetson beside the model.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# Bytes per pixel to decode each Pillow mode, plus what `_to_rgb` allocates converting it.
_DECODE_BYTES = {"1": 1, "L": 1, "P": 1, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "LA": 2, "La": 2, "PA": 2,
                 "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
_CONVERT_BYTES = {"RGB": 0, "P": 15, "RGBA": 11, "RGBa": 11, "LA": 11, "La": 11, "PA": 15,
                  "I;16": 5, "I;16B": 5, "I;16L": 5, "I": 5, "F": 5}  # others: 3 (one RGB copy)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class ImageSpec:
    """What the image graph expects; stored in the bundle manifest under "preprocessing"."""

    size: tuple[int, int]  # (height, width) the image is resized to, aspect ratio not kept
    mean: tuple[float, float, float]  # per-channel, in [0, 1] pixel units
    std: tuple[float, float, float]
    resize: str = "bilinear"  # Pillow filter; Pillow antialiases when it downsamples
    channels: str = "RGB"
    layout: str = "NCHW"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # memory one decode may take (see DEFAULT_MAX_BYTES)
    jpeg_draft: bool = True  # decode large JPEGs at 1/2..1/8 scale when still >= size; False in older bundles

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSpec":
        if d.get("resize", "bilinear") not in _RESAMPLE:
            raise HuseError(f"Unknown resize method {d['resize']!r} in the bundle; known: {sorted(_RESAMPLE)}")
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resize=d.get("resize", "bilinear"), channels=d.get("channels", "RGB"),
                   layout=d.get("layout", "NCHW"), max_pixels=int(d.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   max_bytes=int(d.get("max_bytes", DEFAULT_MAX_BYTES)),
                   # absent: a bundle from before draft decoding, whose model saw full decodes
                   jpeg_draft=bool(d.get("jpeg_draft", False)))


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def confine_path(base: str | Path, path: str | Path) -> Path:
    """BASE/PATH for an image path read from a catalog, refused if it could leave BASE.

    For catalogs from third parties: an absolute path, a drive, `..` or a link that resolves
    outside BASE is refused. Not applied by default (a catalog of your own may name images
    anywhere); the catalog reader and `huse classify` apply it when asked to confine reads.

    Args:
        base: the images folder.
        path: the path as the catalog gives it.
    Returns:
        The path joined onto `base` (not resolved, so messages show what the catalog said).
    Raises:
        HuseError: naming the path and why.
    """
    text = os.fspath(path)
    why = None
    if not text:
        why = "is empty"
    elif os.path.isabs(text) or text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text):
        why = "is absolute"
    elif ".." in re.split(r"[\\/]", text) or "\x00" in text:
        why = "climbs out with '..'"
    else:
        root = Path(base).resolve()
        real = (Path(base) / text).resolve()
        if real != root and root not in real.parents:
            why = "resolves (through a link) outside it"
    if why:
        raise HuseError(f"image path {text!r} {why}; image reads are confined to {base}")
    return Path(base) / text


def is_url(text: str) -> bool:
    """Whether an image reference is a URL (https://, s3://, gs://, ...) rather than a file path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)


def _open(source: ImageInput, stack: contextlib.ExitStack) -> Image.Image:
    if not isinstance(source, (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray)):
        raise HuseError(f"an image must be a file path, encoded bytes, a PIL image or a uint8 array; "
                        f"got {type(source).__name__}")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise HuseError(f"array image must be uint8 HxW, HxWx1, HxWx3 or HxWx4; got {source.dtype} {source.shape}"
                            + _array_hint(source))
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return Image.fromarray(arr)
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else _read_file(source, stack)
    if not isinstance(data, bytes):  # streamed: the header is checked against the caps before the rest is read
        return Image.open(data)
    return Image.open(io.BytesIO(data), formats=_formats(data))


def _array_hint(a: np.ndarray) -> str:
    """What a refused array most likely is, as torch and torchvision pipelines hand them over."""
    hints = []
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        hints.append("it looks channels-first (CxHxW): pass a.transpose(1, 2, 0)")
    if a.dtype.kind == "f":
        hints.append("floats: pass the photo's uint8 pixels (from [0, 1]: (a * 255).round().astype(np.uint8)), "
                     "not a normalised tensor")
    return "; " + "; ".join(hints) if hints else ""


class _FileError(HuseError):
    """`_read_file`'s refusal of a path: its message names the file already (`_decode` adds no name to it)."""


def _read_file(path: str | Path, stack: contextlib.ExitStack | None) -> "bytes | io.RawIOBase | None":
    """An image file's bytes, read in one call (Pillow reads a file object in a dozen small calls, a third of
    a small PNG's preparation). A file over `_READ_WHOLE` comes back open, to be streamed and closed with
    `stack` (Pillow keeps multi-frame files open otherwise); without a stack, None.

    Raises:
        _FileError: the file does not exist or is not a regular file.
    """
    try:
        # Non-blocking, so that a FIFO named by a catalog cannot hang the open; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if is_url(str(path)):
            raise _FileError(f"image {path} is a URL: huse reads photos from files or bytes, never from the network; "
                            "download them first and name the files (or hold them in a Parquet catalog)") from None
        hint = "; it has backslashes: a Windows path? write / between folders" if "\\" in str(path) else ""
        raise _FileError(f"image file {path} does not exist{hint}") from None
    except OSError:
        if os.path.exists(path) and not os.path.isfile(path):  # a folder, on Windows
            raise _FileError(f"image file {path} is not a file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # never read a FIFO, a device or a folder named by a catalog
            raise _FileError(f"image file {path} is not a file")
        if st.st_size > _READ_WHOLE:
            if stack is None:
                return None
            f = open(fd, "rb", buffering=0)
            fd = None  # now f's
            stack.callback(f.close)
            return f
        data = os.read(fd, st.st_size + 1)  # the size fstat gave, and one more byte to see the end
        if len(data) != st.st_size:  # a short read, or the file changed since: read to its end
            data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        return data
    finally:
        if fd is not None:
            os.close(fd)


# Files up to this size are read in one call (any product photo); larger ones are streamed.
_READ_WHOLE = 32 * 1024 * 1024


def _formats(data: bytes) -> tuple[str, ...] | None:
    """The one Pillow format whose signature starts `data` (Pillow would try its plugins in turn and pick
    the same), or None: let Pillow probe them all."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ("PNG",)
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG",)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",)
    return None


# --- small plain PNGs, a batch at a time ------------------------------------------------------
# A 28x28 PNG decodes in ~6 us of zlib, but Image.open + load spent ~20 us more in Pillow's Python (plugin,
# chunk reader, ImageFile.load) and resizing it alone ~15 us more than in a batch. Small PNGs with nothing
# but pixels in them are parsed here and decoded by Pillow's own PNG decoder (the "zip" decoder that
# ImageFile.load runs for a PNG, the same bytes in), all images of one size and mode into one tall image,
# then resized together: Pillow resizes in two passes (rows, then columns; _resize_stacked), and each
# pass treats every row or column on its own, so the stacked images come out with the bytes each gets
# alone (tests/runtime/test_preprocess.py checks every fashion-products PNG and generated ones of each
# mode and filter against the full path). Anything else, and any item the decoder refuses, takes the
# full path, which keeps every check and words every error.

class _SmallPng(NamedTuple):
    size: tuple[int, int]  # (width, height)
    mode: str  # L, RGB, LA or RGBA (8 bits a sample; Pillow's rawmode is the same)
    data: bytes  # the IDAT chunks' zlib stream


_PNG_SIGNATURE_IHDR = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
_PNG_IHDR = struct.Struct(">IIBBBBBI")  # width, height, depth, colour type, compression, filter, interlace, CRC
_PNG_CHUNK = struct.Struct(">I4s")
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit colour types (PngImagePlugin._MODES)
# Chunks Pillow only records in `info` (never pixels, orientation or a warning), at the length it expects.
_PNG_INERT = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
# "Small": up to 256x256 pixels (a thumbnail: bigger images spend their time decoding). A tall image holds
# at most 64 images and 2**20 pixels (4 MiB as Pillow stores RGB), whatever the batch size.
_SMALL_PNG_MAX = 256 * 256
_TALL_PIXELS = 1 << 20
_TALL_IMAGES = 64


def _small_png(data: bytes, max_pixels: int, max_bytes: int) -> _SmallPng | None:
    """`data`'s chunks when it is a small plain PNG within the caps: 8-bit L/RGB/LA/RGBA, not interlaced,
    IHDR, only `_PNG_INERT` chunks, one run of IDAT, IEND at the end, every CRC right. Else None."""
    if data[:16] != _PNG_SIGNATURE_IHDR or len(data) < 45:
        return None
    w, h, depth, colour, compression, filtering, interlace, crc = _PNG_IHDR.unpack_from(data, 16)
    mode = _PNG_MODES.get(colour)
    if (mode is None or depth != 8 or compression or filtering or interlace or zlib.crc32(data[12:29]) != crc
            or not 0 < w * h <= min(max_pixels, _SMALL_PNG_MAX)
            or (Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS)
            or _decode_need(w, h, mode) > max_bytes):
        return None
    pos, idat = 33, []
    while pos + 12 <= len(data):
        length, cid = _PNG_CHUNK.unpack_from(data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return None
        if cid == b"IDAT":
            idat.append(data[pos + 8:end])
        elif cid == b"IEND":
            return _SmallPng((w, h), mode, b"".join(idat)) if idat and not length and end + 4 == len(data) else None
        elif (idat or _PNG_INERT.get(cid) != length
              or zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big")):
            return None  # any other chunk, or one after the image data, or a broken one
        pos = end + 4
    return None


def _decode_small_pngs(pngs: list[_SmallPng], spec: ImageSpec, out: np.ndarray, rows: list[int]) -> list[bool]:
    """Decode PNGs of one size and mode and resize them into `out[rows]` ((N, 3, H, W) uint8), one tall image
    at a time. Returns, per PNG, whether it decoded (False: Pillow's decoder refused its data, and its row
    holds nothing of use)."""
    (w, h), mode = pngs[0].size, pngs[0].mode
    per = min(_TALL_IMAGES, _TALL_PIXELS // (w * h))
    ok = []
    for s in range(0, len(pngs), per):
        group = pngs[s:s + per]
        tall = Image.new(mode, (w, h * len(group)))
        for k, png in enumerate(group):
            # what ImageFile.load does for a PNG's tile, with the tile placed in the tall image
            decoder = Image.core.zip_decoder(mode, mode)
            try:
                decoder.setimage(tall.im, (0, k * h, w, (k + 1) * h))
                n, err = decoder.decode(png.data)
            finally:
                decoder.cleanup()
            ok.append(n < 0 and err == 0)  # finished, without error
        if mode not in ("RGB", "L"):
            tall = _to_rgb(tall)  # alpha on white, pixel by pixel: the same for a stack as for each image
        out[rows[s:s + len(group)]] = _resize_stacked(tall, len(group), spec)
    return ok


def _resize_stacked(tall: Image.Image, n: int, spec: ImageSpec) -> np.ndarray:
    """Resize `n` images of one size stacked top to bottom in `tall` (an RGB or L image) to the spec's size,
    to the bytes Pillow gives each alone. Returns (n, C, H, W) uint8 (C: 3, or 1 for L).

    Pillow resizes in two passes, rounding to 8 bits in between: one over rows (a stack's rows never mix),
    one over columns, for which the images are laid side by side (so that columns never mix either), in the
    order Pillow itself takes for one image (`_pass_order`)."""
    th, tw = spec.size
    w, h = tall.width, tall.height // n
    resample = _RESAMPLE[spec.resize]
    order = _pass_order(tall.mode, (w, h), (tw, th), resample)
    if order is None:  # a Pillow whose resize is not two passes: each image alone
        out = np.empty((n, 3, th, tw), np.uint8)
        for k in range(n):
            _resized(tall.crop((0, k * h, w, (k + 1) * h)), spec, out[k])
        return out
    c = len(tall.getbands())
    a = np.frombuffer(tall.tobytes(), np.uint8).reshape(n, h, w, c)  # image, row, column, band
    for axis in order:
        rows, cols = a.shape[1:3]
        if axis == "h" and cols != tw:
            im = _image(a.reshape(n * rows, cols, c)).resize((tw, n * rows), resample)
            a = np.frombuffer(im.tobytes(), np.uint8).reshape(n, rows, tw, c)
        elif axis == "v" and rows != th:
            side = a.transpose(1, 0, 2, 3).reshape(rows, n * cols, c)
            im = _image(side).resize((n * cols, th), resample)
            a = np.frombuffer(im.tobytes(), np.uint8).reshape(th, n, cols, c).transpose(1, 0, 2, 3)
    return a.transpose(0, 3, 1, 2)


def _image(a: np.ndarray) -> Image.Image:
    """An (H, W, C) uint8 array as an L (C = 1) or RGB image."""
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[2] == 1 else a))


@functools.lru_cache(maxsize=1024)
def _pass_order(mode: str, size: tuple[int, int], target: tuple[int, int], resample: int) -> str | None:
    """The order of Pillow's two passes resizing a `mode` image of `size` to `target`: "hv" (rows first) or
    "vh", found by asking Pillow on a noise image, since it depends on the version (Pillow 13 goes columns
    first when the height loses more than twice as many pixels as the width; earlier versions, rows first).
    None when neither order gives Pillow's bytes."""
    (w, h), (tw, th) = size, target
    noise = np.random.default_rng(0).integers(0, 256, (h, w, Image.getmodebands(mode)), np.uint8)
    probe = _image(noise)
    direct = probe.resize(target, resample).tobytes()
    for order, first in (("hv", (tw, h)), ("vh", (w, th))):
        if probe.resize(first, resample).resize(target, resample).tobytes() == direct:
            return order
    return None


class _WarningCapture:
    """Pillow's warnings, per item, without serialising decodes.

    `warnings.catch_warnings` swaps process-wide state, so the decodes that recorded warnings used to
    take turns under one lock: no two prepare threads could decode at once. Here the first decode that
    wants warnings installs one dispatcher (filter "always", so a repeated warning is reported for every
    file); each thread names its own list (a warning is emitted on the thread that decodes), and the last
    decode out restores what was there before. Warnings from threads with no list go where they went.
    """

    def __init__(self):
        self._lock = threading.Lock()  # guards the install count, not the decodes
        self._users = 0
        self._saved: Any = None
        self._local = threading.local()

    @contextlib.contextmanager
    def installed(self):
        """While open, `item(said)` collects the current thread's warnings into `said`."""
        with self._lock:
            if self._users == 0:
                self._saved = warnings.catch_warnings()
                self._saved.__enter__()
                self._forward = warnings.showwarning
                warnings.simplefilter("always")
                warnings.showwarning = self._show
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._saved.__exit__(None, None, None)
                    self._saved = None

    @contextlib.contextmanager
    def item(self, said: list[str] | None):
        self.collect(said)
        try:
            yield
        finally:
            self.collect(None)

    def collect(self, said: list[str] | None) -> None:
        """From now on, the current thread's warnings go into `said` (None: where they went before)."""
        self._local.said = said

    def _show(self, message, category, filename, lineno, file=None, line=None):
        said = getattr(self._local, "said", None)
        if said is None:
            self._forward(message, category, filename, lineno, file, line)
        elif not issubclass(category, (ResourceWarning, DeprecationWarning)):  # about Python/Pillow, not the image
            said.append(f"{category.__name__}: {message}")


_CAPTURE = _WarningCapture()


def decode_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 draft_size: tuple[int, int] | None = None, warnings_out: list[str] | None = None) -> Image.Image:
    """Decode one image into an 8-bit RGB Pillow image, applying the normalisations above.

    Args:
        source: a path, encoded bytes, a Pillow image or a uint8 array.
        max_pixels: refuse images with more pixels than this before decoding them.
        max_bytes: refuse images whose decoding and conversion would take more memory than this.
        draft_size: (height, width) the image will be resized to: a JPEG may be decoded at a
            reduced scale that stays at least this large (None: full decode).
        warnings_out: Pillow's warnings about this image are appended here, naming it (None:
            they go to the warnings module as usual).
    Returns:
        An RGB `PIL.Image.Image` (fully loaded).
    Raises:
        HuseError: naming the item, when it cannot be used.
    """
    name = _describe(source)
    if warnings_out is None:
        return _decode(source, name, max_pixels, max_bytes, draft_size, rgb=True)
    said: list[str] = []
    with _CAPTURE.installed(), _CAPTURE.item(said):
        try:
            return _decode(source, name, max_pixels, max_bytes, draft_size, rgb=True)
        finally:
            _report(said, name, warnings_out)


def _report(said: list[str], name: str, out: list[str]) -> None:
    for w in said:
        text = f"image {name}: {w}"
        if text not in out:
            out.append(text)


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _decode(source: ImageInput, name: str | None, max_pixels: int, max_bytes: int,
            draft_size: tuple[int, int] | None, rgb: bool) -> Image.Image:
    """The loaded, upright image (RGB when `rgb`, else RGB or L as decoded), errors naming the item
    (`name`, or `_describe(source)` when None: built only when there is an error)."""
    try:
        with contextlib.ExitStack() as stack:
            img = _decode_open(source, max_pixels, max_bytes, draft_size, stack)
            # L stays L: resizing one plane and repeating it gives the same bytes as resizing its RGB
            # copy (tests/runtime/test_preprocess.py), for a third of the work.
            return img if img.mode == "RGB" or (img.mode == "L" and not rgb) else _to_rgb(img)
    except _FileError:
        raise
    except (HuseError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        name = name or _describe(source)
        if isinstance(e, HuseError):
            raise HuseError(f"image {name}: {e}") from None
        if isinstance(e, Image.DecompressionBombError):
            raise HuseError(f"image {name}: {e} (refused before decoding; the cap here is {max_pixels} pixels)") from None
        what = _what_it_is(_head(source))
        if what:
            raise HuseError(f"image {name} could not be decoded: it is {what}") from None
        # Pillow names an in-memory file by its repr: an address that differs per process
        # and tells a server's client nothing.
        said = _OBJECT_REPR.sub("<bytes>", str(e))
        raise HuseError(f"image {name} could not be decoded ({type(e).__name__}: {said}); "
                        "check that the file is a complete JPEG/PNG/WebP image") from None


def _head(source: ImageInput, n: int = 512) -> bytes | None:
    """The first `n` bytes of an encoded image (a file or bytes; None for anything else or an unreadable file)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:n])
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                return f.read(n)
        except OSError:
            return None
    return None


# ISO-BMFF brands of HEIC/HEIF, the photos phones take by default (AVIF shares the container; Pillow reads it).
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")


def _what_it_is(head: bytes | None) -> str | None:
    """What a file that failed to decode is, from its first bytes, when that says more than Pillow's error
    (catalogs gathered by download or export hold error pages, drawings and phone photos named .jpg)."""
    if head is None:
        return None
    if not head:
        return "empty (0 bytes): a download or copy that did not finish?"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return ("a HEIC/HEIF photo (phones' default format), which Pillow does not read: convert it to JPEG "
                "(e.g. heif-convert, from Debian's libheif-examples)")
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "a JPEG XL image, which Pillow does not read: convert it to JPEG or PNG"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page, not a photo (a download that saved an error or sign-in page?): fetch the photo again"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG drawing: rasterise it first (e.g. rsvg-convert -w 512 drawing.svg -o drawing.png)"
    if text.startswith(b"%pdf"):
        return "a PDF document, not a photo"
    if text.startswith((b"{", b"[", b"<?xml")):
        return f"{'XML' if text.startswith(b'<') else 'JSON'} text, not a photo (an API's answer saved as the file?)"
    return None


# What Pillow's `getexif` reads an orientation from: an image with none of these is upright, and
# building its Exif object (a fifth of a small PNG's decode) can be skipped.
_ORIENTATION_SOURCES = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})


def _decode_open(source: ImageInput, max_pixels: int, max_bytes: int, draft_size: tuple[int, int] | None,
                 stack: contextlib.ExitStack) -> Image.Image:
    img = _open(source, stack)
    w, h = img.size
    if w == 0 or h == 0:
        raise HuseError("it has zero size")
    if w * h > max_pixels:
        raise HuseError(f"it has {w}x{h} = {w * h} pixels, over the cap of {max_pixels}; "
                        "resize it first or raise max_pixels")
    if draft_size and img.format == "JPEG":
        side = max(draft_size)  # both sides, so an EXIF rotation still leaves enough pixels
        img.draft(None, (side, side))
    w, h = img.size
    need = _decode_need(w, h, img.mode)
    if need > max_bytes:
        raise HuseError(f"decoding it ({w}x{h}, mode {img.mode}) would take about {need / 2**20:.0f} MiB, over "
                        f"the cap of {max_bytes / 2**20:.0f} MiB; resize it first or raise max_bytes")
    img.load()
    if (_ORIENTATION_SOURCES.intersection(img.info) or hasattr(img, "tag_v2")) and \
            img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return img


def _decode_need(w: int, h: int, mode: str) -> int:
    """Bytes of memory that decoding a w x h image of `mode` and converting it to 8-bit RGB takes."""
    return w * h * (_DECODE_BYTES.get(mode, 4) + _CONVERT_BYTES.get(mode, 3))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raw = np.asarray(img)
        lo, hi = float(raw.min()), float(raw.max())
        out = np.zeros(raw.shape, np.uint8)
        if hi > lo:  # a band of rows at a time: float64 for the whole image was 8 bytes a pixel
            k = 255.0 / (hi - lo)
            for r in range(0, raw.shape[0], 256):
                out[r:r + 256] = np.round((raw[r:r + 256].astype(np.float64) - lo) * k)
        return Image.fromarray(out, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def normalise(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Normalise a batch of 8-bit RGB images: (N, 3, H, W) uint8 -> (N, 3, H, W) float32.

    Each channel becomes `(pixel / 255 - mean) / std` in float32, the same float32 operations in
    the same order for every pixel (tests/runtime/test_preprocess.py checks it to the last bit), so
    a batch gives each image the bytes it gets alone. One pass per operation over the whole batch:
    per image, numpy's fixed cost per call was a third of a small PNG's preparation.
    """
    out = pixels.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    for c in range(out.shape[1]):  # a float32 scalar per channel: numpy's fast loop (a (3, 1, 1) operand took 2x)
        plane = out[:, c]
        plane -= np.float32(spec.mean[c])
        plane /= np.float32(spec.std[c])
    return out


def _resized(img: Image.Image, spec: ImageSpec, out: np.ndarray) -> None:
    """Resize a decoded RGB or L image to the spec's size into `out` (3, H, W) uint8 (planar, so that the
    batch's float passes run over contiguous memory and an L plane is three contiguous copies)."""
    h, w = spec.size
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[spec.resize])
    # tobytes, not np.asarray: the array interface runs the same encoder plus a dict (a 64x64 L plane:
    # 10 us against 14 on a busy core). L is (H, W, 1) here, repeated into the three planes.
    out[...] = np.frombuffer(img.tobytes(), np.uint8).reshape(h, w, len(img.getbands())).transpose(2, 0, 1)


def preprocess(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize and normalise one decoded RGB image (see `normalise`).

    Args:
        img: an RGB image from `decode_image`.
        spec: the bundle's preprocessing spec.
    Returns:
        float32 array (3, H, W), C-contiguous.
    """
    pixels = np.empty((1, 3, *spec.size), np.uint8)
    _resized(img, spec, pixels[0])
    return normalise(pixels, spec)[0]


@dataclass
class ImageBatch:
    """Images decoded and normalised together by `load_images`.

    `array` holds one row per image that decoded, in input order; `rows` maps an input index to its
    row. Items that were None appear nowhere; items that failed appear in `errors` only."""

    n: int  # inputs, None included
    array: np.ndarray  # (len(rows), 3, H, W) float32
    rows: dict[int, int]
    errors: dict[int, str]
    warnings: dict[int, str] = field(default_factory=dict)  # Pillow's, naming the file

    def __len__(self) -> int:
        return self.n

    @property
    def arrays(self) -> dict[int, np.ndarray]:
        """Input index -> its (3, H, W) array (views of `array`)."""
        return {i: self.array[r] for i, r in self.rows.items()}

    @classmethod
    def concat(cls, batches: Sequence["ImageBatch"]) -> "ImageBatch":
        """One batch holding the items of `batches` one after another (e.g. the photos of concurrent
        requests to a server, embedded as one batch)."""
        n = rows_before = 0
        rows, errors, warnings = {}, {}, {}
        for b in batches:
            rows.update({n + i: rows_before + r for i, r in b.rows.items()})
            errors.update({n + i: e for i, e in b.errors.items()})
            warnings.update({n + i: w for i, w in b.warnings.items()})
            n, rows_before = n + b.n, rows_before + len(b.array)
        return cls(n, np.concatenate([b.array for b in batches]), rows, errors, warnings)

    def split(self, counts: Sequence[int]) -> list["ImageBatch"]:
        """The inverse of `concat`: consecutive batches of `counts` items (e.g. the photos of several
        requests to a server, decoded as one batch), indexed from 0 each; their arrays are views."""
        if sum(counts) != self.n:
            raise ValueError(f"counts add up to {sum(counts)}, not the batch's {self.n} items")
        starts = np.cumsum([0, *counts]).tolist()
        parts: list[tuple[dict, dict, dict]] = [({}, {}, {}) for _ in counts]
        for k, mapping in enumerate((self.rows, self.errors, self.warnings)):
            for i, v in mapping.items():
                j = bisect.bisect_right(starts, i) - 1
                parts[j][k][i - starts[j]] = v
        out, row = [], 0
        for count, (rows, errors, warnings) in zip(counts, parts):
            out.append(ImageBatch(count, self.array[row:row + len(rows)], {i: r - row for i, r in rows.items()},
                                  errors, warnings))
            row += len(rows)
        return out

    def stack(self, items: list[int]) -> np.ndarray:
        """The arrays of `items` (decoded ones, in this order) as one (len(items), 3, H, W) batch; no copy
        when they are all the decoded images in input order, the usual case."""
        rows = [self.rows[i] for i in items]
        if rows == list(range(len(self.array))):
            return self.array
        return self.array[rows]


def load_images(sources: Sequence[ImageInput | None], spec: ImageSpec, warnings: bool = True) -> ImageBatch:
    """Decode, resize and normalise images into one batch: the path every image takes in serving (`load_image`,
    which training calls, gives each image the same bytes). A bad image is that item's error, never the batch's.

    Each image is resized straight into one planar uint8 batch buffer (small plain PNGs of one size together,
    see `_decode_small_pngs`); the batch is then normalised at once.

    Args:
        sources: the images (None for a missing one).
        spec: the bundle's preprocessing spec (caps, draft decoding, size, normalisation).
        warnings: collect Pillow's warnings per item (False: left to the warnings module).
    Returns:
        An `ImageBatch`.
    """
    pixels = np.empty((len(sources), 3, *spec.size), np.uint8)  # by input index; compacted at the end
    draft = spec.size if spec.jpeg_draft else None
    done: list[int] = []
    errors: dict[int, str] = {}
    said: dict[int, str] = {}
    small: dict[tuple, list[tuple[int, _SmallPng]]] = {}

    def full_path(i: int, data: bytes | None) -> None:
        """Item i through `_decode` (from `data`, its bytes already read, when given)."""
        found: list[str] | None = [] if warnings else None
        try:
            _load_into(sources[i] if data is None else data, spec, draft, found, pixels[i],
                       None if data is None else _describe(sources[i]))
            done.append(i)
        except HuseError as e:
            errors[i] = str(e)
        if found:
            texts: list[str] = []
            _report(found, _describe(sources[i]), texts)
            said[i] = "; ".join(texts)

    with _CAPTURE.installed() if warnings else contextlib.nullcontext():
        for i, source in enumerate(sources):
            if source is None:
                continue
            data = _bytes_of(source)
            png = _small_png(data, spec.max_pixels, spec.max_bytes) if data is not None else None
            if png is None:
                full_path(i, data)
            else:
                small.setdefault((png.size, png.mode), []).append((i, png))
        for group in small.values():
            decoded = _decode_small_pngs([png for _, png in group], spec, pixels, [i for i, _ in group])
            for (i, _), ok in zip(group, decoded):
                if ok:
                    done.append(i)
                else:
                    full_path(i, None)  # Pillow's decoder refused the data: the full path words the error
    rows = sorted(done)
    kept = pixels if len(rows) == len(sources) else pixels[rows]
    return ImageBatch(len(sources), normalise(kept, spec), {i: r for r, i in enumerate(rows)}, errors, said)


def _bytes_of(source: ImageInput) -> bytes | None:
    """The encoded bytes of a path or bytes item (None for anything else, or a file that cannot be read whole
    here: the full path then reads it again and words the error)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        try:
            return _read_file(source, None)
        except (HuseError, OSError):
            return None
    return None


def _load_into(source: ImageInput, spec: ImageSpec, draft: tuple[int, int] | None, said: list[str] | None,
               out: np.ndarray, name: str | None = None) -> None:
    """Decode one image and resize it into `out` (3, H, W) uint8; its Pillow warnings into `said`; errors
    naming `name` (None: the source)."""
    _CAPTURE.collect(said)  # not `with _CAPTURE.item`: a generator per image cost more than the PNG's header
    try:
        img = _decode(source, name, spec.max_pixels, spec.max_bytes, draft, rgb=False)
        _resized(img, spec, out)
    finally:
        _CAPTURE.collect(None)


def load_image(source: ImageInput, spec: ImageSpec, warnings: list[str] | None = None) -> np.ndarray:
    """One image as `load_images` prepares it in a batch, to the same bytes.

    Args:
        source: the image.
        spec: the bundle's preprocessing spec (caps, draft decoding, size, normalisation).
        warnings: Pillow's warnings about this image are appended here (None: left to the warnings module).
    Returns:
        float32 array (3, H, W), C-contiguous.
    Raises:
        HuseError: naming the image, when it cannot be used.
    """
    pixels = np.empty((1, 3, *spec.size), np.uint8)
    said: list[str] | None = [] if warnings is not None else None
    with _CAPTURE.installed() if warnings is not None else contextlib.nullcontext():
        try:
            _load_into(source, spec, spec.size if spec.jpeg_draft else None, said, pixels[0])
        finally:
            if said:
                _report(said, _describe(source), warnings)
    return normalise(pixels, spec)[0]
