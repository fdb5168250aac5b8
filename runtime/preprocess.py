"""Image decoding and preprocessing: the one implementation used by training and serving.

Training imports `decode_image` and `preprocess` from here, so the array a model saw in
training is bit-for-bit the array it sees in serving (tests/runtime/test_parity.py).

Documented normalisations of awkward inputs (each item either normalises or fails alone):
- EXIF orientation is applied.
- Alpha (RGBA, LA, palette with transparency) is composited onto white, the usual
  background of product photos.
- 16-bit and 32-bit greyscale ("I;16", "I", "F") are scaled to 8 bits by their own range.
- CMYK, greyscale and bilevel images are converted to RGB.
- Images with more than `max_pixels` pixels are refused before decoding (no decompression bomb).
- Zero-size or undecodable images are refused with an error naming the item.
"""

from __future__ import annotations

import functools
import io
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
                   layout=d.get("layout", "NCHW"), max_pixels=int(d.get("max_pixels", DEFAULT_MAX_PIXELS)))


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def _open(source: ImageInput, max_pixels: int) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise HuseError(f"array image must be uint8 HxW, HxWx1, HxWx3 or HxWx4; got {source.dtype} {source.shape}")
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return Image.fromarray(arr)
    data = source if isinstance(source, bytes) else None
    fp = io.BytesIO(data) if data is not None else str(source)
    if data is None and not Path(source).is_file():
        raise HuseError(f"image file {source} does not exist")
    # Pillow's own bomb guard warns, then errors at 2x its limit; ours refuses at the cap.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fp)
    return img


def decode_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image into an 8-bit RGB Pillow image, applying the normalisations above.

    Args:
        source: a path, encoded bytes, a Pillow image or a uint8 array.
        max_pixels: refuse images with more pixels than this before decoding them.
    Returns:
        An RGB `PIL.Image.Image` (fully loaded).
    Raises:
        HuseError: naming the item, when it cannot be used.
    """
    name = _describe(source)
    try:
        img = _open(source, max_pixels)
        w, h = img.size
        if w == 0 or h == 0:
            raise HuseError("it has zero size")
        if w * h > max_pixels:
            raise HuseError(f"it has {w}x{h} = {w * h} pixels, over the cap of {max_pixels}; "
                            "resize it first or raise max_pixels")
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except HuseError as e:
        raise HuseError(f"image {name}: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise HuseError(f"image {name} could not be decoded ({type(e).__name__}: {e}); "
                        "check that the file is a complete JPEG/PNG/WebP image") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@functools.lru_cache(maxsize=16)
def _lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: for each channel, `(v / 255 - mean) / std` of every 8-bit value v.

    The same float32 operations, in the same order, as normalising each pixel directly, so
    the result is bit-identical (tests/runtime/test_preprocess.py checks it); done once per
    value instead of once per pixel, and written straight into CHW order.
    """
    v = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    return np.stack([(v - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)])


def preprocess(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize and normalise one decoded RGB image.

    Each channel becomes `(pixel / 255 - mean) / std` in float32.

    Args:
        img: an RGB image from `decode_image`.
        spec: the bundle's preprocessing spec.
    Returns:
        float32 array (3, H, W), C-contiguous.
    """
    h, w = spec.size
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[spec.resize])
    pixels = np.asarray(img)  # (H, W, 3) uint8
    table = _lookup(tuple(spec.mean), tuple(spec.std))
    out = np.empty((3, h, w), np.float32)
    for c in range(3):
        table[c].take(pixels[:, :, c], out=out[c])
    return out


def load_image(source: ImageInput, spec: ImageSpec) -> np.ndarray:
    """`decode_image` then `preprocess`: the path every image takes, in training and serving."""
    return preprocess(decode_image(source, spec.max_pixels), spec)
