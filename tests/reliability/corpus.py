"""A generated bad-input corpus (no downloads): every kind of image a catalog can throw at huse.

`make_image_corpus(folder)` writes the files and returns one `Case` per item: its file name, what
it is, and whether huse must classify it ("ok"), classify it with a warning naming it ("warn"),
or refuse it with an error naming it ("error"). Small files only: the bombs are headers or
highly compressible.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.models.make_data import make_image


@dataclass(frozen=True)
class Case:
    name: str  # file name under the corpus folder
    kind: str
    expect: str  # "ok", "warn" or "error"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG signature + IHDR claiming width x height, then an empty IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _corrupt_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Acme camera maker"
    good = exif.tobytes()
    order = "little" if good[6:8] == b"II" else "big"
    bad = bytearray(good)
    at = bad.find((0x010F).to_bytes(2, order))
    bad[at + 4:at + 8] = (100000).to_bytes(4, order)  # the Make tag claims 100 kB it does not have
    return bytes(bad)


def make_image_corpus(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(make_image(2, rng, size=48))
    png, jpeg = _save(photo, "PNG"), _save(photo, "JPEG", quality=90)
    files: dict[str, tuple[bytes, str, str]] = {
        "good.png": (png, "a clean photo", "ok"),
        "good.jpg": (jpeg, "a clean JPEG", "ok"),
        "truncated.png": (png[: len(png) // 2], "truncated PNG", "error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated JPEG", "error"),
        "corrupt.png": (png[:60] + b"\x00" * 40 + png[100:], "zeros inside the compressed data", "error"),
        "random.jpg": (rng.integers(0, 256, 700, dtype=np.uint8).tobytes(), "random bytes", "error"),
        "empty.png": (b"", "zero-byte file", "error"),
        "text.jpg": (b"this is not an image\n", "text with an image name", "error"),
        "zero-width.png": (_png_header_only(0, 10), "zero-width header", "error"),
        "bomb-header.png": (_png_header_only(100_000, 100_000), "100000x100000 header, no data", "error"),
        "bomb-long.png": (_png_header_only(60_000_000, 1), "60 MP in one row", "error"),
        "deep-7000.png": (_save(Image.fromarray(np.zeros((7000, 7000), np.uint16)), "PNG"),
                          "16-bit 7000x7000 (110 kB file, ~340 MB to decode)", "error"),
        "rgba.png": (_save(photo.convert("RGBA"), "PNG"), "RGBA", "ok"),
        "la.png": (_save(photo.convert("LA"), "PNG"), "greyscale + alpha", "ok"),
        "palette.png": (_save(photo.convert("P"), "PNG", transparency=0), "palette with transparency", "ok"),
        "bilevel.png": (_save(photo.convert("1"), "PNG"), "1-bit", "ok"),
        "grey.jpg": (_save(photo.convert("L"), "JPEG"), "greyscale JPEG", "ok"),
        "cmyk.jpg": (_save(photo.convert("CMYK"), "JPEG"), "CMYK JPEG", "ok"),
        "deep16.png": (_save(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG"),
                       "16-bit greyscale", "ok"),
        "float.tif": (_save(Image.fromarray(np.asarray(photo.convert("L"), np.float32) / 255), "TIFF"),
                      "32-bit float TIFF", "ok"),
        "int32.tif": (_save(Image.fromarray(np.asarray(photo.convert("L"), np.int32) - 100), "TIFF"),
                      "32-bit int TIFF", "ok"),
        "anim.gif": (_save(photo.convert("P"), "GIF", save_all=True, append_images=[photo.convert("P")]),
                     "animated GIF", "ok"),
        "photo.webp": (_save(photo, "WEBP"), "WebP", "ok"),
        "photo.bmp": (_save(photo, "BMP"), "BMP", "ok"),
        "tiny.png": (_save(photo.resize((1, 1)), "PNG"), "1x1 pixel", "ok"),
        "wide.png": (_save(photo.resize((4000, 2)), "PNG"), "4000x2 strip", "ok"),
        "big.jpg": (_save(photo.resize((3000, 2000)), "JPEG", quality=50), "6 MP JPEG (draft-decoded)", "ok"),
        "rotated.jpg": (_save(photo, "JPEG", exif=_rotated_exif()), "EXIF orientation 6", "ok"),
        "bad-exif.jpg": (_save(photo, "JPEG", exif=_corrupt_exif()), "corrupt EXIF", "warn"),
        "png-as.jpg": (png, "PNG bytes under a .jpg name", "ok"),
    }
    cases = []
    for name, (data, kind, expect) in files.items():
        (folder / name).write_bytes(data)
        cases.append(Case(name, kind, expect))
    (folder / "a-folder.png").mkdir(exist_ok=True)
    cases.append(Case("a-folder.png", "a directory with an image name", "error"))
    cases.append(Case("missing.png", "a file that does not exist", "error"))
    return cases


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif
