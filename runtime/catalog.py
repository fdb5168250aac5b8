"""Reading product catalogs (CSV, JSONL or Parquet with columns image, name, classes, ...).

Shared by training (`huse-train`) and serving (`huse classify`/`huse embed`), so both read a
catalog the same way and name a bad row the same way: file, row number, column, what is wrong.

`iter_catalog` streams Records in bounded memory: a malformed value (a list where text belongs,
an undecodable byte, a lone surrogate) becomes that row's `error`, never an aborted file;
only file-level problems (missing file, a duplicate column, a column that looks like one the file
lacks, a wrong encoding found in the first 64 KiB) raise. Columns huse does not read (price, brand,
a pandas index) are ignored: a catalog exported from a shop system is read as it is. `read_catalog`
is the list form training uses; it stops at the first bad row, as training always has. With
`confine=True` (for catalogs from third parties) an image path that is absolute, climbs out with `..`
or resolves through a link outside the images folder is that row's error (preprocess.confine_path); off
by default. A Parquet catalog may hold the photos themselves: an `image` column of binary values, or of
structs {bytes, path} as Hugging Face `datasets` writes its Image feature (the bytes are used; a null
`bytes` falls back to `path`). `plan_shards` finds where every block of N records starts (a byte offset
for CSV/JSONL), so a worker can read its block without parsing the file before it.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from huse.runtime._lazy import lazy_import
from huse.runtime.errors import HuseError
from huse.runtime.labels import cell_text, parse_paths
from huse.runtime.preprocess import confine_path, is_url

__all__ = ["COLUMNS", "SPLITS", "Record", "Shard", "iter_catalog", "read_catalog", "records_from_rows", "plan_shards",
           "count_rows", "check_catalog_file", "catalog_format"]

COLUMNS = ("image", "name", "classes", "product_id", "split")
SPLITS = ("train", "val", "test")
# csv's default field cap (128 KiB) rejects the whole file at the first long title; a field
# this large is only ever an unclosed quote swallowing the rest of the file.
MAX_FIELD = 64 * 1024 * 1024
SNIFF_BYTES = 64 * 1024


@dataclass
class Record:
    """One catalog row.

    `row` is the 1-based data row as every error about the file counts it: CSV records after
    the header, JSONL lines, Parquet rows; blank lines are counted, so the number points at the
    same place. `error` says what is wrong with the row ("row 7, column name: ..."); the other
    fields of such a row may be None.
    """

    row: int
    image: str | bytes | None  # resolved path, the encoded photo itself (Parquet), or None when the row has none
    name: str | None
    classes: str | None = None
    product_id: str | None = None
    split: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Shard:
    """Records [start, start + count) of a catalog (0-based record positions).

    offset: byte offset of the first record (CSV/JSONL); first_row: its row number.
    """

    index: int
    start: int
    count: int
    offset: int
    first_row: int


_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# What a catalog file is not, by its name: said at once (read as CSV, each made a misleading error).
_NOT_A_CATALOG = {**dict.fromkeys((".xlsx", ".xls", ".ods"), "a spreadsheet workbook: save it as CSV (UTF-8)"),
                  **dict.fromkeys((".gz", ".zip", ".bz2", ".xz", ".zst"),
                                  "compressed: decompress it first (catalogs are read in place, in shards by byte "
                                  "offset)")}


def catalog_format(path: str | Path) -> str:
    """How huse reads a catalog file, by its name: csv, jsonl or parquet (anything else is read as CSV), so
    that whoever writes a catalog for huse writes what it will read.

    Raises:
        HuseError: a name that is no catalog (a spreadsheet workbook, a compressed file).
    """
    suffix = Path(path).suffix.lower()
    if suffix in _NOT_A_CATALOG:
        raise HuseError(f"catalog {path} is {_NOT_A_CATALOG[suffix]}; huse reads CSV, JSON Lines and Parquet")
    return _FORMATS.get(suffix, "csv")


def _format(path: Path) -> str:
    """csv, jsonl or parquet by the file's name (`catalog_format`), refusing a JSON array named as JSON Lines."""
    fmt = catalog_format(path)
    if fmt == "jsonl" and path.is_file():
        with open(path, "rb") as f:
            if f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                raise HuseError(f"catalog {path} is one JSON array; huse reads JSON Lines, one object per line "
                                "(pandas: df.to_json(path, orient='records', lines=True))")
    return fmt


def check_catalog_file(path: str | Path) -> None:
    """Raise HuseError unless `path` is a file: a folder is named as one, with the command that makes a catalog
    of the photos in it."""
    path = Path(path)
    if path.is_dir():
        raise HuseError(f"catalog {path} is a folder; huse reads a catalog file (CSV, JSON Lines or Parquet). For a "
                        f"folder of photos, write one first: huse data catalog {path}")
    if not path.is_file():
        raise HuseError(f"catalog {path} does not exist")


# What other catalogs call the columns: a file that has one of these but not the column it means is refused,
# naming both (read silently as absent, a title column would classify by photo alone).
_OTHER_NAMES = {"title": "name", "product_name": "name", "category": "classes", "categories": "classes",
                "class": "classes", "label": "classes", "labels": "classes", "path": "image", "photo": "image",
                "image_path": "image", "filename": "image", "file": "image", "id": "product_id", "sku": "product_id"}
_MEANS = {**{c: c for c in COLUMNS}, **_OTHER_NAMES}  # a lower-case name -> the column it means
log = logging.getLogger("huse.runtime")


def _meant(col: str) -> str | None:
    """The column huse reads that `col` most likely means (a case or spelling variant, another catalog's name
    for it, or its first word: `Image URL` -> image), or None."""
    key = str(col).strip().lower().replace(" ", "_").replace("-", "_")
    for k in (key, key.split("_")[0]):
        if k in _MEANS:
            return _MEANS[k]
    close = difflib.get_close_matches(key, COLUMNS, n=1, cutoff=0.8)  # clases, imgae, splits
    return close[0] if close else None


@functools.lru_cache(maxsize=64)
def _header_check(header: tuple[str, ...]) -> str | None:
    """What is wrong with a header (None: nothing). Columns huse does not read are ignored, unless one looks
    like a column the file lacks (`title` without `name`): misspelt or named as another catalog names it, it
    would otherwise read as empty. A column huse reads may appear once."""
    seen = set()
    for col in header:
        if col in COLUMNS:
            if col in seen:
                return f"column {col!r} appears twice in the header; keep one"
            seen.add(col)
    for col in header:
        meant = None if col in COLUMNS else _meant(col)
        if meant is not None and meant not in header:
            return (f"column {col!r} is not one huse reads; did you mean {meant!r}? The file has no {meant!r} column: "
                    f"rename this one (in a CSV only the header line changes) or drop it. huse reads "
                    f"{list(COLUMNS)} and ignores other columns")
    return None


def _check_header(where: str, header: Sequence[str]) -> None:
    problem = _header_check(tuple(header))
    if problem:
        raise HuseError(f"{where}: {problem}")


@functools.lru_cache(maxsize=64)
def _note_ignored(path: Path, header: tuple[str, ...]) -> None:
    """Say once per file (with -v) which of a CSV's or Parquet file's columns are not read."""
    ignored = [c for c in header if c not in COLUMNS]
    if ignored:
        log.info("%s: columns huse does not read, ignored: %s", path, ", ".join(map(repr, ignored)))


def _check_columns(path: Path, present: set[str]) -> None:
    if present and not ({"image", "name"} & present):
        raise HuseError(f"{path}: needs an 'image' or a 'name' column (or both); found {sorted(present)}")


def _sniff_encoding(path: Path, encoding: str | None) -> str:
    """The codec to read `path` with; refuses a file whose start is clearly another encoding.

    Without `--encoding`, catalogs are UTF-8 (a byte-order mark is dropped). UTF-16 (BOM or NUL
    bytes) and Latin-1/Windows-1252 (bytes that are not UTF-8) would be garbled silently, so
    they are named here with the option that reads them.
    """
    if encoding is not None:
        try:
            return codecs.lookup(encoding).name
        except LookupError:
            raise HuseError(f"unknown encoding {encoding!r}; e.g. utf-8, latin-1, cp1252, utf-16") from None
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in head:
        raise HuseError(f"catalog {path} looks like UTF-16 (byte-order mark or NUL bytes), not UTF-8; "
                        "pass --encoding utf-16 (or convert it to UTF-8)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut by the sample's end
            line = head[: e.start].count(b"\n") + 1
            raise HuseError(f"catalog {path} is not UTF-8 (byte 0x{head[e.start]:02x} on line {line}); it looks like "
                            "Latin-1/Windows-1252: pass --encoding latin-1 (or cp1252), or convert it to UTF-8") from None
    return "utf-8-sig"


def _byte_lines(path: Path, encoding: str, offset: int) -> Iterator[tuple[int, int, str]]:
    """(start offset, end offset, decoded line) from byte `offset`. Undecodable bytes become
    lone surrogates (surrogateescape), which `_text` turns into that row's error."""
    decoder = "utf-8" if encoding == "utf-8-sig" else encoding
    if "\n".encode(decoder) != b"\n":  # UTF-16/32: newlines are not single bytes, no offsets
        if offset:
            raise HuseError(f"{encoding} catalogs cannot be read from an offset (needed by --engine ray); "
                            "convert the catalog to UTF-8")
        with open(path, encoding=encoding, errors="surrogateescape", newline="") as f:
            for line in f:
                yield 0, 0, line
        return
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        for raw in f:
            end = pos + len(raw)
            if pos == 0 and encoding == "utf-8-sig" and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # Excel's "CSV UTF-8" starts with a byte-order mark
            yield pos, end, raw.decode(decoder, errors="surrogateescape")
            pos = end


def _text(row: int, col: str, value: Any, *, allow_int: bool = False) -> tuple[str | None, str | None]:
    """(value, None) or (None, error) for one cell: text, or None when empty."""
    if value is None:
        return None, None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None, f"row {row}, column {col}: expected text, got {type(value).__name__} ({str(value)[:40]!r})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        what = (f"undecodable byte 0x{ord(bad) - 0xDC00:02x} (is the file UTF-8? see --encoding)"
                if 0xDC80 <= ord(bad) <= 0xDCFF else f"a lone surrogate U+{ord(bad):04X}")
        return None, f"row {row}, column {col}: invalid text, {what}"
    return value, None


def _record(row: int, values: dict[str, Any], base: str, confine: bool = False) -> Record:
    """One Record from raw cell values; the first bad cell (or, with `confine`, an image path that
    could leave `base`) becomes the row's error. A Parquet `image` cell may hold the photo itself."""
    image, photo = values.get("image"), None
    if isinstance(image, dict) and set(image) <= {"bytes", "path"}:  # Hugging Face's Image feature
        image = image["bytes"] if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray)):
        if not image:
            return Record(row=row, image=None, name=None, error=f"row {row}, column image: the photo's bytes are empty")
        image, photo = None, bytes(image)
    cells: dict[str, str | None] = {}
    for col in COLUMNS:
        value = image if col == "image" else values.get(col)
        if col == "classes":  # several paths may come as a list (runtime/labels.py)
            value = cell_text(value)
        v, err = _text(row, col, value, allow_int=col == "product_id")
        if err:
            return Record(row=row, image=None, name=None, error=err)
        cells[col] = v
    img = (cells["image"] or "").strip() or None
    if img is not None and confine:
        try:
            confine_path(base, img)
        except HuseError as e:  # the row's other cells are kept for the output; its image is never read
            return Record(row=row, image=None, name=cells["name"] or None, classes=(cells["classes"] or "").strip() or None,
                          product_id=(cells["product_id"] or "").strip() or None, error=f"row {row}, column image: {e}")
    if img is not None and not os.path.isabs(img) and not is_url(img):  # a URL is named as given in its error
        # os.path, not pathlib: Path interns every path part, a table that grows with the catalog.
        img = os.path.join(base, img)
    img = photo if photo is not None else img
    classes = (cells["classes"] or "").strip() or None
    if classes is not None:
        try:
            parse_paths(classes)  # one path, or several separated by '|' (runtime/labels.py)
        except HuseError as e:
            return Record(row=row, image=img, name=cells["name"] or None, classes=classes,
                          product_id=(cells["product_id"] or "").strip() or None, error=f"row {row}, column classes: {e}")
    split = (cells["split"] or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        return Record(row=row, image=img, name=cells["name"] or None,
                      error=f"row {row}: split {split!r} is not one of {list(SPLITS)}")
    return Record(row=row, image=img, name=cells["name"] or None, classes=classes,
                  product_id=(cells["product_id"] or "").strip() or None, split=split)


# -- CSV ---------------------------------------------------------------------------------
def _csv_header(path: Path, encoding: str) -> tuple[list[str], int, str]:
    """(header, byte offset of the first data record, delimiter)."""
    for _, end, line in _byte_lines(path, encoding, 0):
        delimiter = _delimiter(line)
        header = [h.strip() for h in next(csv.reader([line], delimiter=delimiter), [])]
        _check_header(path, header)
        _check_columns(path, set(header))
        _note_ignored(path, tuple(header))
        return header, end, delimiter
    return [], 0, ","


def _delimiter(header_line: str) -> str:
    """',' unless the header has no comma and holds ';' or a tab: what spreadsheets export in many
    locales (';'), and .tsv files."""
    if "," not in header_line:
        for d in (";", "\t"):
            if d in header_line:
                return d
    return ","


# -- public ------------------------------------------------------------------------------
def iter_catalog(path: str | Path, images: str | Path | None = None, *, encoding: str | None = None,
                 shard: Shard | None = None, confine: bool = False) -> Iterator[Record]:
    """Stream a catalog's rows in file order, in bounded memory.

    Args:
        path: a .csv, .jsonl or .parquet file.
        images: folder that relative image paths resolve against (default: the file's folder).
        encoding: the text encoding of a CSV/JSONL (default UTF-8; UTF-16 and Latin-1 are detected
            and named in the error).
        shard: read only this block (from `plan_shards`), starting at its byte offset.
        confine: refuse image paths that could leave the images folder (absolute, `..`, a link
            out): such a row gets an `error` naming it and its image is never read. Off by default.
    Yields:
        One Record per data row; a row with a malformed value has `error` set.
    Raises:
        HuseError: a missing file, a duplicate column or one that looks like a column the file lacks
            (`title` without `name`), a wrong encoding.
    """
    path = Path(path)
    check_catalog_file(path)
    base = str(images) if images is not None else str(path.parent)
    fmt = _format(path)
    if fmt == "parquet":
        yield from _iter_parquet(path, base, shard, confine)
        return
    enc = _sniff_encoding(path, encoding)
    offset, first_row = (shard.offset, shard.first_row) if shard else (None, 1)
    rows = _jsonl_rows(path, enc, offset, first_row) if fmt == "jsonl" else _csv_records(path, enc, offset, first_row)
    n = 0
    for row, _, values, err in rows:
        if shard is not None and n >= shard.count:
            return
        n += 1
        yield Record(row=row, image=None, name=None, error=err) if err else _record(row, values, base, confine)


def records_from_rows(rows: Sequence[Any], images: str | Path | None = None, confine: bool = False) -> list[Record]:
    """Records of products given in Python: dicts with a catalog's columns (image, name, classes, product_id,
    split), read by the rules a catalog file's rows are (a bad value is that row's `error`; rows count from
    1), or Records as they are. Relative image paths resolve against `images` (default: the working folder).

    Raises:
        HuseError: an entry that is neither, or a key that looks like a column the dict lacks (`title`
            without `name`), naming the one it likely means. Other keys are ignored.
    """
    base, out = str(images) if images is not None else ".", []
    for i, values in enumerate(rows):
        if isinstance(values, Record):
            out.append(values)
            continue
        if not isinstance(values, dict):
            raise HuseError(f"product {i} is a {type(values).__name__}; give a dict with columns {list(COLUMNS)} "
                            "(image, name, classes, ...) per product, or a catalog file")
        _check_header(f"product {i}", list(values))
        out.append(_record(i + 1, values, base, confine))
    return out


def _csv_records(path: Path, encoding: str, offset: int | None, first_row: int):
    """(row, byte offset where the record starts, values, error) per CSV record."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    header, data_start, delimiter = _csv_header(path, encoding)
    if not header:
        return
    consumed = [data_start if offset is None else offset]

    def feed():
        lines = _byte_lines(path, encoding, offset or 0)
        if offset is None:
            next(lines)  # the header (read from the start: UTF-16 has no byte offsets)
        for _, end, line in lines:
            consumed[0] = end
            yield line

    reader = csv.reader(feed(), delimiter=delimiter)
    row, start = first_row, consumed[0]
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # an unclosed quote past MAX_FIELD: nothing after it can be trusted
            raise HuseError(f"{path}, row {row}: not valid CSV ({e}); is a quote left open?") from None
        if values:
            err = None if len(values) == len(header) else (
                f"row {row}: has {len(values)} fields, the header has {len(header)}; quote titles that contain "
                f"{'commas' if delimiter == ',' else repr(delimiter)}")
            yield row, start, (dict(zip(header, values)) if err is None else None), err
        row += 1
        start = consumed[0]  # csv.reader reads no further than the record it returns


def _jsonl_rows(path: Path, encoding: str, offset: int | None, first_row: int):
    header_checked: set[str] = set()
    row = first_row
    for pos, _, line in _byte_lines(path, encoding, offset or 0):
        if line.strip():
            err, values = None, None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                err = f"row {row}: not valid JSON ({e.msg})"
            else:
                if not isinstance(obj, dict):
                    err = f"row {row}: expected a JSON object"
                else:
                    # Same rule as a CSV header: a misspelt column must not silently read as empty.
                    problem = _header_check(tuple(obj))
                    if problem:
                        raise HuseError(f"{path}, row {row}: {problem}")
                    if set(obj) - header_checked:
                        header_checked |= set(obj)
                        _check_columns(path, header_checked)
                    values = obj
            yield row, pos, values, err
        row += 1


def _iter_parquet(path: Path, base: str, shard: Shard | None, confine: bool) -> Iterator[Record]:
    pq = lazy_import("pyarrow.parquet", "scale")
    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        raise HuseError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    names = list(f.schema_arrow.names)
    _check_header(path, names)
    _check_columns(path, set(names))
    _note_ignored(path, tuple(names))
    start, count = (shard.start, shard.count) if shard else (0, f.metadata.num_rows)
    # Skip whole row groups before the shard's start without reading them.
    groups, first, seen = [], 0, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if seen + n > start:
            if not groups:
                first = seen
            groups.append(g)
        seen += n
    if not groups:
        return
    row = first
    read = [c for c in names if c in COLUMNS]  # a wide table's other columns are never decoded
    for batch in f.iter_batches(batch_size=4096, row_groups=groups, columns=read):
        for values in batch.to_pylist():
            row += 1
            if row - 1 < start:
                continue
            if row - 1 >= start + count:
                return
            yield _record(row, values, base, confine)


def read_catalog(path: str | Path, images: str | Path | None = None, *, require: tuple[str, ...] = (),
                 encoding: str | None = None, confine: bool = False, keep_bad_rows: bool = False,
                 why: str = "") -> list[Record]:
    """Read a whole catalog file (for training: it stops at the first bad row).

    Args:
        path: a .csv, .jsonl or .parquet file.
        images: folder that relative image paths resolve against (default: the file's folder).
        require: columns that must be present (e.g. ("classes",) for training).
        encoding, confine: see `iter_catalog`.
        keep_bad_rows: return a bad row's Record with its `error` (the caller skips or stops) instead of raising.
        why: what the caller needs the required columns for, added to the error naming the missing ones.
    Returns:
        One Record per data row, in file order.
    Raises:
        HuseError: duplicate, misnamed or missing columns, an unreadable file or a bad row, naming them.
    """
    path = Path(path)
    records = []
    for r in iter_catalog(path, images, encoding=encoding, confine=confine):  # first: it names misnamed columns
        if r.error and not keep_bad_rows:
            raise HuseError(f"{path}, {r.error}")
        records.append(r)
    if require:
        present = _present_columns(path, encoding)
        missing = [c for c in require if c not in present]
        if missing:
            raise HuseError(f"{path}: column(s) {missing} are required; the file has {sorted(present)}"
                            + (f". {why}" if why else ""))
    return records


def _present_columns(path: Path, encoding: str | None) -> set[str]:
    fmt = _format(path)
    if fmt == "csv":
        return set(_csv_header(path, _sniff_encoding(path, encoding))[0])
    if fmt == "parquet":
        return set(lazy_import("pyarrow.parquet", "scale").ParquetFile(path).schema_arrow.names)
    present: set[str] = set()
    for _, _, values, _ in _jsonl_rows(path, _sniff_encoding(path, encoding), None, 1):
        present |= set(values or {})
    return present


def count_rows(path: str | Path) -> int:
    """About how many rows a catalog has, cheaply (for a progress bar's total): Parquet's row
    count, else the number of newlines (a CSV's header and quoted line breaks make it approximate)."""
    path = Path(path)
    if _format(path) == "parquet":
        return lazy_import("pyarrow.parquet", "scale").ParquetFile(path).metadata.num_rows
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    n += last != b"\n"
    return max(0, n - (_format(path) == "csv"))


def plan_shards(path: str | Path, shard_rows: int, *, encoding: str | None = None) -> list[Shard]:
    """Split a catalog into blocks of `shard_rows` records, with where each block starts.

    One pass over the file (CSV is parsed, so quoted line breaks are handled; nothing is
    decoded or kept), so any worker can then read its block by seeking to its offset.
    """
    path = Path(path)
    check_catalog_file(path)
    if _format(path) == "parquet":
        n = lazy_import("pyarrow.parquet", "scale").ParquetFile(path).metadata.num_rows
        return [Shard(k, s, min(shard_rows, n - s), 0, s + 1) for k, s in enumerate(range(0, n, shard_rows))]
    enc = _sniff_encoding(path, encoding)
    rows = _jsonl_rows_offsets(path, enc) if _format(path) == "jsonl" else _csv_records(path, enc, None, 1)
    shards: list[Shard] = []
    n = 0
    for row, pos, _, _ in rows:
        if n % shard_rows == 0:
            shards.append(Shard(len(shards), n, 0, pos, row))
        n += 1
    return [Shard(s.index, s.start, min(shard_rows, n - s.start), s.offset, s.first_row) for s in shards]


def _jsonl_rows_offsets(path: Path, encoding: str):
    """(row, offset) of each non-blank JSONL line, without parsing it."""
    row = 1
    for pos, _, line in _byte_lines(path, encoding, 0):
        if line.strip():
            yield row, pos, None, None
        row += 1
