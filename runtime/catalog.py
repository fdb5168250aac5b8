"""Reading product catalogs (CSV or JSONL with columns image, name, classes, ...).

Shared by training (`huse-train`) and serving (`huse classify`), so both read a catalog the
same way and report a bad row the same way: file, row number, what is wrong.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from huse.runtime.errors import HuseError

COLUMNS = ("image", "name", "classes", "product_id", "split")
SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One catalog row.

    `row` is the 1-based data row as every error about the file counts it: CSV records after
    the header, JSONL lines; blank lines are counted, so the number points at the same place.
    """

    row: int
    image: str | None  # resolved path, or None when the row has no image
    name: str | None
    classes: str | None = None
    product_id: str | None = None
    split: str | None = None


def read_catalog(path: str | Path, images: str | Path | None = None, *, require: tuple[str, ...] = ()) -> list[Record]:
    """Read a catalog file.

    Args:
        path: a .csv or .jsonl file.
        images: folder that relative image paths resolve against (default: the file's folder).
        require: columns that must be present (e.g. ("classes",) for training).
    Returns:
        One Record per data row, in file order.
    Raises:
        HuseError: unknown, duplicate or missing columns, or an unreadable file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"catalog {path} does not exist")
    base = Path(images) if images is not None else path.parent
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path)
    else:
        rows = _read_csv(path)
    present = set().union(*(r.keys() for _, r in rows)) if rows else set()
    missing = [c for c in require if c not in present]
    if missing:
        raise HuseError(f"{path}: column(s) {missing} are required; the file has {sorted(present)}")
    if not ({"image", "name"} & present) and rows:
        raise HuseError(f"{path}: needs an 'image' or a 'name' column (or both); found {sorted(present)}")
    out = []
    for i, r in rows:
        img = (r.get("image") or "").strip() or None
        if img is not None and not Path(img).is_absolute():
            img = str(base / img)
        split = (r.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise HuseError(f"{path}, row {i}: split {split!r} is not one of {list(SPLITS)}")
        out.append(Record(row=i, image=img, name=r.get("name") or None, classes=(r.get("classes") or "").strip() or None,
                          product_id=(r.get("product_id") or "").strip() or None, split=split))
    return out


def _check_header(path: Path, header: list[str]) -> None:
    seen = set()
    for col in header:
        if col in seen:
            raise HuseError(f"{path}: column {col!r} appears twice in the header; keep one")
        if col not in COLUMNS:
            raise HuseError(f"{path}: unknown column {col!r}; known columns are {list(COLUMNS)}")
        seen.add(col)


# Row numbers travel with the rows, so a value error found later (bad split, bad class) names
# the same row as a structural one found while reading. utf-8-sig drops the byte-order mark
# that Excel's "CSV UTF-8" writes, which would otherwise glue itself to the first column name.
def _read_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            _check_header(path, header)
            rows = []
            for i, values in enumerate(reader, start=1):
                if not values:
                    continue
                if len(values) != len(header):
                    raise HuseError(f"{path}, row {i}: has {len(values)} fields, the header has {len(header)}; "
                                    "quote titles that contain commas")
                rows.append((i, dict(zip(header, values))))
            return rows
    except csv.Error as e:
        raise HuseError(f"{path}: not a valid CSV ({e})") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, str]]]:
    rows = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise HuseError(f"{path}, row {i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise HuseError(f"{path}, row {i}: expected a JSON object")
            _check_header(path, list(obj))
            rows.append((i, {k: (None if v is None else str(v)) for k, v in obj.items()}))
    return rows
