"""Product photos for the page: thumbnails made on the fly from one images folder (or from the photos
an index keeps as bytes), and cached.

The paths come from the server's own tables (the review's catalog, the index's items), never
from a client; even so, every path is checked against the images folder with the catalog rule
(`preprocess.confine_path`: no absolute path outside it, no `..`, no link out), because catalogs
are third-party input. Decoding goes through `decode_image`, so the pixel and memory caps of
classification apply to thumbnails too.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from huse.runtime.errors import HuseError
from huse.runtime.preprocess import confine_path, decode_image

__all__ = ["SIZES", "Thumbnails", "media_type"]

# The sizes the page asks for (a card, the review photo); a fixed set keeps the cache bounded.
SIZES = (96, 192, 384)


def media_type(data: bytes) -> str:
    """The media type of an encoded photo, once it decodes within the caps of classification (else HuseError)."""
    decode_image(data)  # a usable image within the pixel and memory caps, or HuseError
    kind = Image.open(io.BytesIO(data)).format
    return f"image/{kind.lower()}" if kind else "application/octet-stream"


class Thumbnails:
    """JPEG thumbnails of the photos under one folder, or of photos given as bytes, in an LRU cache bounded in bytes.

    Args:
        root: the images folder; nothing outside it is ever read. None: photos given as bytes only.
        cache_bytes: the cache's budget (64 MiB: ~10,000 review-size thumbnails).
    """

    def __init__(self, root: str | Path | None = None, cache_bytes: int = 64 * 2**20):
        self.root = Path(os.path.abspath(root)) if root is not None else None  # absolute: confines to itself
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def confine(self, path: str | Path) -> Path:
        """`path` (absolute, or relative to the root) if it is a file under the root, else HuseError."""
        if self.root is None:
            raise HuseError(f"image {path}: no images folder was given, so no photo file is read")
        text = os.fspath(path)
        if os.path.isabs(text):
            # An absolute path from our own tables (catalog readers resolve against the folder):
            # made relative, so confine_path's rule decides, links included.
            rel = os.path.relpath(os.path.abspath(text), os.path.abspath(self.root))
            text = text if rel == ".." or rel.startswith(".." + os.sep) else rel
        return confine_path(self.root, text)

    def get(self, path: str | Path, size: int) -> bytes:
        """A JPEG of the photo at `path`, at most `size` pixels on its longer side (never enlarged).

        Args:
            path: the photo, under the root.
            size: one of SIZES.
        Returns:
            The JPEG bytes.
        Raises:
            HuseError: the path is outside the root, missing, or not a usable image.
        """
        file = self.confine(path)
        try:
            st = os.stat(file)
        except OSError:
            raise HuseError(f"image {path} does not exist under {self.root}") from None
        return self._thumbnail((os.path.realpath(file), st.st_mtime_ns, st.st_size), str(file), size)

    def of_bytes(self, key: Any, data: bytes, size: int) -> bytes:
        """A JPEG of the encoded photo `data`, as `get` makes one; `key` names the photo in the cache (one key,
        one photo: an index's item position)."""
        return self._thumbnail(("bytes", key, len(data)), data, size)

    def _thumbnail(self, key: tuple, source: str | bytes, size: int) -> bytes:
        if size not in SIZES:
            raise HuseError(f"thumbnail size {size} is not one of {list(SIZES)}")
        key = (*key, size)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        img = decode_image(source, draft_size=(size, size))
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
        data = out.getvalue()
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._used += len(data)
            while self._used > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._used -= len(old)
        return data


    def original(self, path: str | Path, max_bytes: int = 32 * 2**20) -> tuple[bytes, str]:
        """The photo's file as stored, once it decodes within the caps (the page searches from it).

        Args:
            path: the photo, under the root.
            max_bytes: refuse larger files.
        Returns:
            (bytes, media type).
        """
        file = self.confine(path)
        if not os.path.isfile(file):
            raise HuseError(f"image {path} does not exist under {self.root}")
        if os.path.getsize(file) > max_bytes:
            raise HuseError(f"image {path} is over {max_bytes // 2**20} MiB")
        with open(file, "rb") as f:
            data = f.read(max_bytes + 1)
        return data, media_type(data)
