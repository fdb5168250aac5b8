"""Writing and hashing files: the one copy that bundles, indexes, signatures, bulk output and training use."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from huse.runtime.errors import HuseError

# Every artifact (bundle, index, bulk output) describes itself in this file.
MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that a reader never sees half of it (write next to it, fsync, rename).

    Args:
        path: the target file.
        data: bytes, or text (written as UTF-8).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (`write_atomic`)."""
    write_atomic(path, json_bytes(obj))


def check_replaceable(folder: str | Path, fmt: str, what: str, flag: str) -> None:
    """Refuse to let `flag` (--force, --overwrite) replace an existing folder that is not a `what` (its
    manifest's format is not `fmt`): the flag deletes the old folder, so a mistyped path (`--out runs`
    for `--out runs/x`) must not cost the user another folder's contents. An empty folder is fine."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    try:
        found = json.loads((folder / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != fmt:
        raise HuseError(f"{folder} is not a {what}, so {flag} will not delete it; choose another folder")


def is_own_jsonl(path: str | Path, key: str, any_of: tuple[str, ...]) -> bool:
    """Whether a JSON Lines output may be replaced by the command that writes it: it is missing or empty, or
    its first row is an object with `key` and one of `any_of` (what that command writes in every row)."""
    if not Path(path).is_file():
        return True
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return True
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and key in row and any(k in row for k in any_of)


# huse's CSV outputs (classify's predictions, search's hits): UTF-8 with a byte-order mark, without which Excel
# reads non-ASCII titles as Windows-1252 (Python reads them with this codec too).
CSV_ENCODING = "utf-8-sig"
# A cell a spreadsheet would run as a formula (OWASP's "CSV injection"): a title from a marketplace feed such as
# '=HYPERLINK("http://...")'. The CSV outputs write such a cell behind a "'" (a spreadsheet shows it as text), and
# huse reads it back without: one "'" goes before any run of "'" that ends in a formula start, so every cell reads
# back exactly as it was.
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


def sheet_cell(value: str) -> str:
    """`value` as a CSV output writes it (behind a "'" where a spreadsheet would take it for a formula)."""
    return "'" + value if _FORMULA_START.match(value) else value


def from_sheet_cell(value: str) -> str:
    """The value `sheet_cell` wrote."""
    return value[1:] if value.startswith("'") and _FORMULA_START.match(value, 1) else value


def is_own_csv(path: str | Path, header: tuple[str, ...]) -> bool:
    """`is_own_jsonl` for a CSV output: missing or empty, or its first line starts with the `header` its command
    writes (after the byte-order mark of CSV_ENCODING)."""
    if not Path(path).is_file():
        return True
    with open(path, encoding=CSV_ENCODING, errors="replace") as f:
        first = f.readline(1 << 16)
    return not first.strip() or first.startswith(",".join(header))


@contextlib.contextmanager
def one_writer(lock: str | Path, busy: str, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created if missing) for the block; while another process
    holds it, HuseError(`busy`) at once, never a wait. The kernel drops the lock when its holder dies, so
    a killed run never blocks the next. `remove`: delete the lock file when done (it lies beside the
    user's files), still holding it, so no one else takes a lock on the deleted file meanwhile."""
    import fcntl

    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HuseError(busy) from None
        try:
            yield
        finally:
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(lock)
