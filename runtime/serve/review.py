"""The review queue: people confirm or correct the predictions `huse classify` marked `needs_review`.

`huse serve BUNDLE --review PREDS --catalog CATALOG` lists the needs_review rows of PREDS, least
confident first, with each row's photo and title taken from CATALOG (the source of truth: the
photo is served only from the catalog's images folder). Every decision (accept, correct, skip)
is appended to a JSONL journal, flushed and fsynced before the reviewer is told it is saved.

The journal is the only state. Reopening it continues where the review stopped; two reviewers
at once each append their own lines, so nothing is overwritten: the last decision per row wins,
and every decision stays in the file. Its first line is a header naming the catalog (and its
sha256, so a journal is never continued against a catalog that changed under it).

A multi-label bundle's row (a `labels` set in PREDS) is decided as a set: accepting keeps the predicted
set, correcting gives another ("a<b|c"), and the journal and the export hold it as a `classes` cell, so a
product keeps all its labels.

`export_corrections(JOURNAL, OUT)` (`huse review export`) writes the accepted and corrected rows
as a catalog `huse-train` reads: image,name,classes,product_id, with the image paths as the
catalog names them (train with `--images` set to the catalog's images folder).

No HTTP here (the routes are in page.py), so the queue and the export need the core only.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from huse.runtime._lazy import lazy_import
from huse.runtime.catalog import catalog_format, iter_catalog
from huse.runtime.errors import HuseError
from huse.runtime.files import sha256_file, write_atomic
from huse.runtime.hierarchy import canonical
from huse.runtime.labels import PATH_SEPARATOR, join_paths, parse_paths

__all__ = ["ACTIONS", "ReviewItem", "Journal", "ReviewQueue", "export_corrections", "default_journal"]

log = logging.getLogger(__name__)

ACTIONS = ("accept", "correct", "skip")
JOURNAL_FORMAT = "huse-review-journal/1"
TOP = 3  # the choices a reviewer sees (and picks with the keys 1-3)
PAGE_LIMIT = 100  # items per /items request: a page never asks for the whole queue


@dataclass
class ReviewItem:
    """One row to review. `pos` is its place in the queue (0: the least confident)."""

    pos: int
    row: int
    name: str | None
    product_id: str | None
    image: str | None  # the catalog's image path, relative to the images folder (None: no usable photo)
    classes: str | None  # the class the catalog gives the row, if any
    label: str  # the model's top-1
    score: float
    mode: str | None
    top_k: list[dict[str, Any]]  # the choices: up to TOP {label, score} (a label set: its labels too)
    problem: str | None = None  # why the photo cannot be shown (a refused or missing path)
    held: bool = False  # the catalog holds the photo itself (Parquet bytes): shown from its copy
    # A multi-label bundle's predicted label set, best first (None: single-label). Its `top_k` then holds
    # these and the top TOP, and a decision is a set: accept keeps this one, correct gives another.
    labels: list[str] | None = None

    @property
    def predicted(self) -> str:
        """What accepting decides: the top-1, or the label set as a catalog's `classes` cell."""
        return self.label if self.labels is None else join_paths(self.labels)  # the bundle's labels: canonical

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        held = d.pop("held")
        d["has_image"] = d.pop("image") is not None or held
        return d


def default_journal(predictions: str | Path) -> Path:
    """PREDS.review.jsonl beside the predictions, never inside them: `huse classify` replaces its
    output folder when it runs again, and the journal must outlive that."""
    p = Path(predictions)
    return p.with_suffix(".review.jsonl") if p.suffix == ".jsonl" else p.with_name(p.name + ".review.jsonl")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Journal:
    """An append-only JSONL file of decisions, each one on disk (fsync) before `append` returns.

    Args:
        path: the journal file; created with `header` when missing.
        header: what the journal belongs to (catalog, its sha256, images folder). An existing
            journal whose header names another catalog or another catalog sha256 is refused.
    """

    def __init__(self, path: str | Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = header
        self._lock = threading.Lock()
        if self.path.exists():
            found, self.entries = read_journal(self.path, repair=True)
            if found.get("catalog_sha256") != header["catalog_sha256"]:
                raise HuseError(f"journal {self.path} belongs to catalog {found.get('catalog')} (sha256 "
                                f"{str(found.get('catalog_sha256'))[:12]}); {header['catalog']} has sha256 "
                                f"{header['catalog_sha256'][:12]}: its rows may not be the rows reviewed. "
                                f"Give another --journal, or the catalog the review was started with")
            self.header = found
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.entries = []
            self._write_line(header, create=True)

    def _write_line(self, obj: dict[str, Any], create: bool = False) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            # One write on an O_APPEND descriptor: two processes appending to one journal never
            # interleave inside a line.
            if os.write(fd, data) != len(data):
                raise HuseError(f"journal {self.path}: short write (is the disk full?); the decision was not saved")
            os.fsync(fd)
        finally:
            os.close(fd)
        if create:  # the new file's name must survive a crash too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def append(self, entry: dict[str, Any]) -> None:
        """Append one decision and fsync it; only then is it in `entries`."""
        with self._lock:
            try:
                self._write_line(entry)
            except OSError as e:
                raise HuseError(f"journal {self.path}: could not save the decision ({e}); nothing was recorded") from e
            self.entries.append(entry)


def read_journal(path: str | Path, repair: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, decisions) of a journal.

    A last line without its newline is a write that a crash cut short: it was never acknowledged,
    so it is dropped (and, with `repair`, cut from the file so the next append starts a line).
    A malformed complete line is an error naming it.

    Args:
        path: the journal.
        repair: truncate an unfinished last line.
    Returns:
        The header and the decision entries in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"journal {path} does not exist")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    if not lines:
        raise HuseError(f"journal {path} is empty; delete it to start a new review")
    try:
        objs = [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        bad = next(i for i, line in enumerate(lines, 1) if not _parses(line))
        raise HuseError(f"journal {path}, line {bad}: not JSON ({e.msg}); was the file edited?") from None
    header = objs[0] if isinstance(objs[0], dict) else {}
    if header.get("format") != JOURNAL_FORMAT:
        raise HuseError(f"{path} is not a huse review journal (its first line has format "
                        f"{header.get('format')!r}, expected {JOURNAL_FORMAT!r})")
    if end < len(data):  # only now: a file that is not a journal (a catalog given as --journal) is never cut
        log.warning("journal %s: dropping an unfinished last line (%d bytes, never acknowledged)", path,
                    len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
    return header, objs[1:]


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def last_decisions(entries: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Row -> its last decision (the journal's order is the order decisions were saved)."""
    last: dict[int, dict[str, Any]] = {}
    for e in entries:
        last[int(e["row"])] = e
    return last


def _prediction_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a `huse classify` output: one JSONL or CSV file, or a shard folder (streamed)."""
    if not path.exists():
        raise HuseError(f"predictions {path} do not exist; make them with "
                        f"`huse classify BUNDLE --data CATALOG --out PREDS --min-confidence P`")
    from huse.runtime.bulk import iter_predictions

    yield from iter_predictions(path)  # streamed: only the needs_review rows are kept


class ReviewQueue:
    """The needs_review rows of a `huse classify` output, least confident first, and their decisions.

    Args:
        predictions: PREDS: a JSONL file or a Parquet/JSONL shard folder from `huse classify`.
        catalog: the catalog PREDS was made from (CSV, JSONL, Parquet).
        labels: the bundle's leaf classes: a correction must be one of them.
        journal: the decision journal (default: `default_journal(predictions)`).
        images: the folder the catalog's image paths resolve against (default: its folder); photos
            are read only from under it.
    Raises:
        HuseError: no row needs review, PREDS and CATALOG disagree, or the journal is another catalog's.
    """

    def __init__(self, predictions: str | Path, catalog: str | Path, labels: list[str],
                 journal: str | Path | None = None, images: str | Path | None = None):
        self.predictions, self.catalog = Path(predictions), Path(catalog)
        self.images = Path(images) if images is not None else self.catalog.parent
        self.labels = list(labels)
        self._known = set(self.labels)
        self._lock = threading.Lock()
        journal = Path(journal or default_journal(self.predictions))
        # Photos the catalog holds as bytes (Parquet) are copied here once, for the page to show.
        self.photos = journal.with_name(journal.stem + ".photos")
        self.items, self._paths = self._load()
        self._by_row = {it.row: it for it in self.items}
        self.journal = Journal(journal, {
            "format": JOURNAL_FORMAT, "catalog": str(self.catalog.resolve()),
            "catalog_sha256": sha256_file(self.catalog), "images": str(self.images.resolve()),
            "predictions": str(self.predictions.resolve()), "created": _now()})
        self._last = last_decisions(self.journal.entries)
        self._cursor = 0  # every item before it is decided: the next undecided item is found from here

    def _load(self) -> tuple[list[ReviewItem], dict[int, str]]:
        preds: dict[int, dict[str, Any]] = {}
        for p in _prediction_rows(self.predictions):
            if p.get("needs_review") and not p.get("error") and p.get("top_k"):
                # only what a reviewer sees: the queue of a million-row output stays small
                top_k, labels, order = p["top_k"][:TOP], None, float(p["score"])
                if p.get("labels"):  # a label set: its labels and the top TOP are the choices, by score
                    labels = [x["label"] for x in p["labels"]]
                    scores = {t["label"]: t["score"] for t in p["top_k"]} | {x["label"]: x["score"] for x in p["labels"]}
                    top_k = [{"label": c, "score": scores[c]} for c in sorted(
                        set(labels) | {t["label"] for t in top_k}, key=lambda c: (-float(scores[c]), c))]
                    order = min(float(x["score"]) for x in p["labels"])  # its least confident label first
                preds[int(p["row"])] = {"name": p.get("name"), "label": p["label"], "score": p["score"],
                                        "mode": p.get("mode"), "top_k": top_k, "labels": labels, "order": order}
        if not preds:
            raise HuseError(f"no row of {self.predictions} is marked needs_review; classify with "
                            f"`huse classify BUNDLE --data CATALOG --out PREDS --min-confidence P` (rows whose "
                            f"top-1 score is below P need review)")
        order = sorted(preds, key=lambda r: (preds[r]["order"], r))
        base = os.path.abspath(self.images)
        found: dict[int, Any] = {}
        for rec in iter_catalog(self.catalog, self.images, confine=True):
            if rec.row in preds:
                found[rec.row] = rec
        items, paths = [], {}
        for pos, row in enumerate(order):
            p, rec = preds[row], found.get(row)
            if rec is None:
                raise HuseError(f"predictions {self.predictions} have row {row}, which catalog {self.catalog} does "
                                f"not have: were the predictions made from this catalog?")
            if rec.name and p.get("name") and rec.name != p["name"]:
                raise HuseError(f"row {row} is {p['name']!r} in {self.predictions} but {rec.name!r} in "
                                f"{self.catalog}: were the predictions made from this catalog?")
            file = rec.image if isinstance(rec.image, str) else None
            rel = os.path.relpath(os.path.abspath(file), base) if file else None
            if isinstance(rec.image, bytes):
                paths[row] = self._held_photo(row, rec.image)
            elif file:
                paths[row] = os.path.abspath(file)  # from any working directory
            items.append(ReviewItem(pos=pos, row=row, name=rec.name if rec.name is not None else p.get("name"),
                                    product_id=rec.product_id, image=rel, classes=rec.classes, label=p["label"],
                                    score=float(p["score"]), mode=p.get("mode"),
                                    top_k=[{"label": t["label"], "score": float(t["score"])} for t in p["top_k"]],
                                    problem=rec.error, held=isinstance(rec.image, bytes), labels=p["labels"]))
        return items, paths

    # -- reading -----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """{total, done, left, accept, correct, skip}: done counts rows with any decision."""
        with self._lock:
            counts = {a: 0 for a in ACTIONS}
            for row, e in self._last.items():
                if row in self._by_row:
                    counts[e["action"]] += 1
            done = sum(counts.values())
            return {"total": len(self.items), "done": done, "left": len(self.items) - done, **counts}

    def page(self, after: int = -1, limit: int = 20) -> list[ReviewItem]:
        """The next undecided items, in queue order, at positions after `after`.

        Args:
            after: the last position the caller holds (-1: from the start).
            limit: at most this many (1..PAGE_LIMIT).
        """
        limit = max(1, min(int(limit), PAGE_LIMIT))
        with self._lock:
            while self._cursor < len(self.items) and self.items[self._cursor].row in self._last:
                self._cursor += 1
            out = []
            for pos in range(max(after + 1, self._cursor), len(self.items)):  # no copy of the queue per request
                it = self.items[pos]
                if it.row not in self._last:
                    out.append(it)
                    if len(out) == limit:
                        break
            return out

    def item(self, row: int) -> ReviewItem:
        it = self._by_row.get(row)
        if it is None:
            raise HuseError(f"row {row} is not in this review (it does not need review, or is not in {self.catalog})")
        return it

    def _held_photo(self, row: int, data: bytes) -> str:
        """The file under `photos` holding a row's photo that the catalog holds as bytes (written once)."""
        path = self.photos / str(row)
        if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
            self.photos.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        return os.path.abspath(path)  # not resolve(): the page tells these from the catalog's by their folder

    def image_path(self, row: int) -> str | None:
        """The photo of a row, as the catalog resolves it, made absolute (confined to the images folder when
        read), or its copy under `photos` for one the catalog holds as bytes."""
        self.item(row)
        return self._paths.get(row)

    def decision(self, row: int) -> dict[str, Any] | None:
        with self._lock:
            return self._last.get(row)

    # -- deciding ----------------------------------------------------------------------------
    def decide(self, row: int, action: str, label: str | None = None, reviewer: str | None = None) -> dict[str, Any]:
        """Record a decision, on disk before this returns.

        Args:
            row: the catalog row.
            action: "accept" (the top-1 is right; for a multi-label row, its label set), "correct" (with
                `label`) or "skip".
            label: the right class, for "correct": one of the bundle's classes (a multi-label row: one or
                several, separated by "|"). Correcting to the prediction is recorded as accept.
            reviewer: who decided (free text, kept in the journal).
        Returns:
            {"saved": True, "entry": the journal line, "previous": the row's earlier decision or
            None (another reviewer's, or this one's), "progress": `progress()`}.
        """
        it = self.item(row)
        if action not in ACTIONS:
            raise HuseError(f"action {action!r} is not one of {list(ACTIONS)}")
        if action == "correct":
            if not label:
                raise HuseError(f"row {row}: correct needs a label, one of the bundle's {len(self.labels)} classes"
                                + (f" (several separated by '{PATH_SEPARATOR}')" if it.labels is not None else ""))
            try:  # a label set: its paths, canonical, sorted and unique, as a catalog's classes cell
                label = canonical(label) if it.labels is None else join_paths(parse_paths(label))
            except HuseError as e:
                raise HuseError(f"row {row}: {e}") from None
            for one in ([label] if it.labels is None else label.split(PATH_SEPARATOR)):
                if one not in self._known:
                    raise HuseError(f"row {row}: {one!r} is not one of the bundle's classes; pick one of them "
                                    f"(e.g. {self.labels[0]!r})")
            if label == it.predicted:
                action = "accept"
        final = it.predicted if action == "accept" else (label if action == "correct" else None)
        entry = {"row": row, "action": action, "label": final, "predicted": it.predicted, "score": it.score,
                 "image": it.image, "name": it.name, "product_id": it.product_id,
                 "reviewer": (reviewer or "").strip()[:100] or None, "time": _now()}
        with self._lock:
            previous = self._last.get(row)
            self.journal.append(entry)  # on disk (fsync) before it counts or is acknowledged
            self._last[row] = entry
        return {"saved": True, "entry": entry, "previous": previous, "progress": self.progress()}


# ------------------------------------------------------------------------------------------
# Export


def _held_photos(header: dict[str, Any], rows: set[int]) -> dict[int, bytes]:
    """Row -> photo bytes, for those of `rows` whose photo the reviewed catalog holds itself (Parquet)."""
    catalog = header.get("catalog")
    if not rows or not catalog or Path(catalog).suffix.lower() != ".parquet":  # only Parquet holds photos
        return {}
    return {r.row: r.image for r in iter_catalog(catalog, header.get("images"))
            if r.row in rows and isinstance(r.image, bytes)}


def export_corrections(journal: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the reviewed rows of a journal as a catalog `huse-train` reads.

    The last decision per row counts; accepted and corrected rows are written (both carry a
    label a person confirmed), skipped rows are not. Image paths are as the catalog names them,
    relative to its images folder (`images` in the result). A photo the reviewed catalog holds as
    bytes (Parquet) is copied into a Parquet `out` ({bytes, path} structs, as the catalog reader
    takes them); a CSV or JSON Lines file cannot hold one, so such rows need `out` to end in .parquet.

    Args:
        journal: the review journal.
        out: the CSV, JSON Lines (.jsonl) or Parquet file to write (image,name,classes,product_id), chosen by
            its name as a catalog's format is read, replaced atomically. Never the journal, the reviewed catalog
            or its predictions; another existing file only with `force`.
    Returns:
        {"out", "written", "accept", "correct", "skip", "images": the folder image paths resolve against}.
    """
    header, entries = read_journal(journal)
    last = last_decisions(entries)
    counts = {a: 0 for a in ACTIONS}
    for e in last.values():
        counts[e["action"]] += 1
    kept = [last[row] for row in sorted(last) if last[row]["action"] != "skip"]
    out = Path(out)
    for what, path in (("the journal itself", journal), ("the reviewed catalog", header.get("catalog")),
                       ("the predictions reviewed", header.get("predictions"))):
        if path and out.resolve() == Path(path).resolve():  # holds only the reviewed rows: never in their place
            raise HuseError(f"--out {out} is {what}; choose another file")
    if out.exists() and not force:
        raise HuseError(f"--out {out} exists; choose another file, or pass --force to replace it")
    fmt = catalog_format(out)  # written as huse-train will read it: a CSV named .jsonl read as no column at all
    held = _held_photos(header, {e["row"] for e in kept if not e.get("image")})
    columns = {"image": [e.get("image") or "" for e in kept], "name": [e.get("name") or "" for e in kept],
               "classes": [e["label"] for e in kept], "product_id": [e.get("product_id") or "" for e in kept]}
    if fmt == "parquet":
        pa = lazy_import("pyarrow", "scale")
        pq = lazy_import("pyarrow.parquet", "scale")
        columns["image"] = [{"bytes": held.get(e["row"]), "path": e.get("image")} for e in kept]
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), buf)
        write_atomic(out, buf.getvalue().to_pybytes())
    elif held:
        raise HuseError(f"{len(held)} of the {len(kept)} rows to export have their photo inside the reviewed "
                        f"catalog {header.get('catalog')} (Parquet bytes), which a {fmt.upper()} file cannot hold; "
                        f"export to a Parquet file instead: --out {out.with_suffix('.parquet')}")
    elif fmt == "jsonl":
        write_atomic(out, "".join(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n"
                                  for row in zip(*columns.values())))
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(columns))
        w.writerows(zip(*columns.values()))
        write_atomic(out, buf.getvalue())
    return {"out": str(out), "written": counts["accept"] + counts["correct"], **counts, "images": header.get("images")}
