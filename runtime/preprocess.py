"""Image decoding and preprocessing: the one implementation used by training and serving.

Training imports `decode_image` and `preprocess` from here, so the array a model saw in
training is bit-for-bit the array it sees in serving (tests/runtime/test_parity.py).

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
- Pillow's warnings (corrupt EXIF, decompression bomb) are reported per item by `load_image`
  (`warnings=`), naming the file, instead of going to stderr.
- Zero-size or undecodable images, or inputs of another type, are refused with an error naming the item.

`confine_path(base, path)` refuses absolute paths and `..` for catalogs from third parties
(the catalog and CLI code call it when asked to confine image reads to the images folder).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

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


def _open(source: ImageInput, max_pixels: int, stack: contextlib.ExitStack) -> Image.Image:
    if not isinstance(source, (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray)):
        raise HuseError(f"an image must be a file path, encoded bytes, a PIL image or a uint8 array; "
                        f"got {type(source).__name__}")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise HuseError(f"array image must be uint8 HxW, HxWx1, HxWx3 or HxWx4; got {source.dtype} {source.shape}")
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return Image.fromarray(arr)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    if not os.path.isfile(source):  # never open a FIFO or a device named by a catalog
        raise HuseError(f"image file {source} {'is not a file' if os.path.exists(source) else 'does not exist'}")
    # Our own file object, closed when decoding ends: Pillow keeps multi-frame files open otherwise.
    return Image.open(stack.enter_context(open(source, "rb")))


# warnings.catch_warnings changes process-wide state; decodes that record warnings take turns.
_WARNINGS_LOCK = threading.Lock()


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
        return _decode(source, name, max_pixels, max_bytes, draft_size)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _decode(source, name, max_pixels, max_bytes, draft_size)
        finally:
            for w in caught:
                if issubclass(w.category, (ResourceWarning, DeprecationWarning)):
                    continue  # about Python or Pillow, not about the image
                text = f"image {name}: {w.category.__name__}: {w.message}"
                if text not in warnings_out:
                    warnings_out.append(text)


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _decode(source: ImageInput, name: str, max_pixels: int, max_bytes: int,
            draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        with contextlib.ExitStack() as stack:
            return _decode_open(source, max_pixels, max_bytes, draft_size, stack)
    except HuseError as e:
        raise HuseError(f"image {name}: {e}") from None
    except Image.DecompressionBombError as e:
        raise HuseError(f"image {name}: {e} (refused before decoding; the cap here is {max_pixels} pixels)") from None
    except (OSError, ValueError, SyntaxError) as e:
        # Pillow names an in-memory file by its repr: an address that differs per process
        # and tells a server's client nothing.
        said = _OBJECT_REPR.sub("<bytes>", str(e))
        raise HuseError(f"image {name} could not be decoded ({type(e).__name__}: {said}); "
                        "check that the file is a complete JPEG/PNG/WebP image") from None


def _decode_open(source: ImageInput, max_pixels: int, max_bytes: int, draft_size: tuple[int, int] | None,
                 stack: contextlib.ExitStack) -> Image.Image:
    img = _open(source, max_pixels, stack)
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
    need = w * h * (_DECODE_BYTES.get(img.mode, 4) + _CONVERT_BYTES.get(img.mode, 3))
    if need > max_bytes:
        raise HuseError(f"decoding it ({w}x{h}, mode {img.mode}) would take about {need / 2**20:.0f} MiB, over "
                        f"the cap of {max_bytes / 2**20:.0f} MiB; resize it first or raise max_bytes")
    img.load()
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


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


def preprocess(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize and normalise one decoded RGB image.

    Each channel becomes `(pixel / 255 - mean) / std` in float32, the same float32 operations in
    the same order for every pixel (tests/runtime/test_preprocess.py checks it to the last bit).

    Args:
        img: an RGB image from `decode_image`.
        spec: the bundle's preprocessing spec.
    Returns:
        float32 array (3, H, W), C-contiguous.
    """
    h, w = spec.size
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[spec.resize])
    # CHW in uint8 first: the float32 passes then run over contiguous memory (2x faster than strided)
    out = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)).astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    out -= np.asarray(spec.mean, np.float32)[:, None, None]
    out /= np.asarray(spec.std, np.float32)[:, None, None]
    return out


def load_image(source: ImageInput, spec: ImageSpec, warnings: list[str] | None = None) -> np.ndarray:
    """`decode_image` then `preprocess`: the path every image takes, in training and serving.

    Args:
        source: the image.
        spec: the bundle's preprocessing spec (caps, draft decoding, size, normalisation).
        warnings: Pillow's warnings about this image are appended here (None: left to the warnings module).
    """
    img = decode_image(source, spec.max_pixels, spec.max_bytes, spec.size if spec.jpeg_draft else None, warnings)
    return preprocess(img, spec)
