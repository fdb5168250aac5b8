"""A catalog from a folder of photos: what a user has before they have a catalog file.

`huse data catalog FOLDER` writes FOLDER/catalog.csv with one row per photo under FOLDER (every
subfolder, sorted; hidden files and folders skipped), so that `classify`, `embed`, `index` and, with
titles and classes, `huse-train` read it like any catalog:

- image: the photo's path relative to the catalog's folder (absolute when the photo is not under it);
- name: the text of a `.txt` file beside the photo with the same stem (`boot.jpg` + `boot.txt`, as
  image-caption folders keep titles), else, with `names_from_file_names`, the file name's words
  (`black-leather_boot.jpg` -> "black leather boot"), else empty;
- classes, with `classes_from_folders`: the photo's folders below FOLDER as a path, one level per folder,
  as torchvision's ImageFolder and Keras' `image_dataset_from_directory` lay classes out
  (`shoes/boots/x.jpg` -> `shoes<boots`); photos at the top have none.

Files that are not photos by their suffix are counted, not listed; HEIC/HEIF phone photos, which Pillow
does not read, are counted apart so that the summary can say to convert them.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import SEPARATOR
from huse.runtime.labels import parse_paths

__all__ = ["PHOTO_SUFFIXES", "FolderCatalog", "write_folder_catalog", "summary"]

# What Pillow decodes (AVIF where its wheel is built with it, as PyPI's are).
PHOTO_SUFFIXES = frozenset((".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"))
_HEIF_SUFFIXES = frozenset((".heic", ".heif"))
MAX_TITLE_CHARS = 2048  # a sidecar longer than this is a description; the catalog reader reads 512 characters


@dataclass
class FolderCatalog:
    """What `write_folder_catalog` wrote."""

    path: Path
    photos: int = 0
    titled: int = 0  # rows with a name (from a .txt beside the photo or the file name)
    classes: set[str] = field(default_factory=set)
    unclassed: int = 0  # with classes_from_folders: photos at the top, with no folder to name a class
    heif: int = 0  # HEIC/HEIF photos skipped
    other: dict[str, int] = field(default_factory=dict)  # skipped files by suffix


def _title_of_file_name(stem: str) -> str:
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


def _sidecar_title(photo: Path) -> str | None:
    txt = photo.with_suffix(".txt")
    try:
        text = txt.read_text(encoding="utf-8")[:MAX_TITLE_CHARS]
    except (OSError, UnicodeDecodeError) as e:
        raise HuseError(f"{txt}: could not read the title beside {photo.name} ({type(e).__name__}: {e}); "
                        "save it as UTF-8 text") from None
    return " ".join(text.split()) or None


def write_folder_catalog(folder: str | Path, out: str | Path | None = None, *, classes_from_folders: bool = False,
                         names_from_file_names: bool = False) -> FolderCatalog:
    """Write a catalog CSV of every photo under `folder` (module docstring); returns what it wrote.

    Args:
        folder: the folder of photos (searched with every subfolder).
        out: the CSV to write (default FOLDER/catalog.csv); never an existing file.
        classes_from_folders: each photo's folders below `folder` are its class path.
        names_from_file_names: a photo without a `.txt` title beside it is named by its file name's words.
    Raises:
        HuseError: `folder` is not a folder, `out` exists, a folder name cannot be a class level, no photos.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HuseError(f"{folder} is not a folder of photos")
    out = Path(out) if out is not None else folder / "catalog.csv"
    if out.exists():
        raise HuseError(f"{out} exists; choose another --out, or remove it to write it again")
    base, root = out.resolve().parent, folder.resolve()
    done = FolderCatalog(out)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "name", "classes"] if classes_from_folders else ["image", "name"])
            for here, dirs, files in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = Path(here).relative_to(folder)
                # paths are made per folder, not per photo (a million photos: a stat less each)
                place = root / rel
                prefix = f"{place.relative_to(base).as_posix()}/" if place.is_relative_to(base) else f"{place}{os.sep}"
                prefix = "" if prefix == "./" else prefix
                texts = {name[:-4] for name in files if name.endswith(".txt")}
                cls = None
                if classes_from_folders and rel.parts:
                    cls = SEPARATOR.join(rel.parts)
                    try:  # a folder name with '<', '>' or '|' would read as other levels or paths
                        level_per_folder = parse_paths(cls) == (cls,)
                    except HuseError:
                        level_per_folder = False
                    if not level_per_folder:
                        raise HuseError(f"folder {Path(here)}: its name cannot be a class level as it is (it holds "
                                        f"'<', '>' or '|', or spaces at an end); rename it")
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    suffix = Path(name).suffix.lower()
                    if suffix not in PHOTO_SUFFIXES:
                        if suffix in _HEIF_SUFFIXES:
                            done.heif += 1
                        elif suffix != ".txt":
                            done.other[suffix or "(none)"] = done.other.get(suffix or "(none)", 0) + 1
                        continue
                    stem = name[: len(name) - len(suffix)]
                    title = _sidecar_title(Path(here) / name) if stem in texts else None
                    if title is None and names_from_file_names:
                        title = _title_of_file_name(stem) or None
                    image = prefix + name
                    w.writerow([image, title or "", cls or ""] if classes_from_folders else [image, title or ""])
                    done.photos += 1
                    done.titled += title is not None
                    if classes_from_folders:
                        if cls:
                            done.classes.add(cls)
                        else:
                            done.unclassed += 1
        if not done.photos:
            raise HuseError(f"no photos under {folder} (looked for {', '.join(sorted(PHOTO_SUFFIXES))})"
                            + (f"; {_n(done.heif, 'HEIC/HEIF photo')}: convert them to JPEG" if done.heif else ""))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return done


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """'1 photo', '2 photos': a count with its noun."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def summary(done: FolderCatalog) -> str:
    """The lines the CLI prints: what was written, and what was left out and why."""
    lines = [f"wrote {done.path}: {_n(done.photos, 'photo')}, {done.titled} with a title"]
    if done.classes or done.unclassed:
        lines[0] += f", {_n(len(done.classes), 'class', 'classes')} from their folders"
        if done.unclassed:
            lines.append(f"note: {_n(done.unclassed, 'photo')} at the top of the folder "
                         f"{'has' if done.unclassed == 1 else 'have'} no class (training skips them only with --skip-bad-rows)")
    if done.titled < done.photos:
        untitled = done.photos - done.titled
        lines.append(f"note: {_n(untitled, 'photo')} {'has' if untitled == 1 else 'have'} no title: classified by photo "
                     "alone, and huse-train needs titles (a .txt beside each photo, or --names-from-file-names)")
    if done.heif:
        lines.append(f"skipped {_n(done.heif, 'HEIC/HEIF photo')}: Pillow does not read HEIC; convert them to JPEG "
                     "(e.g. heif-convert, from Debian's libheif-examples) and run this again")
    if done.other:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(done.other.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"skipped {_n(sum(done.other.values()), 'file')} without a photo's suffix ({kinds})")
    return "\n".join(lines)
