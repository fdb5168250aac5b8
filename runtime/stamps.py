"""Hash each file once: verification stamps in a user cache, so a fresh process need not re-hash.

Why: `huse search` checks every index file it opens against the sha256 in the index manifest.
At 200,000 products one modality's HNSW index is ~0.5 GB; SHA-256 runs at ~1.4 GB/s on this
project's 2-core machines (page-cached, measured roughly with others working), so a fresh
search spent ~0.35 s hashing one target and ~0.7 s for `--target product` (both indexes),
most of the 1 s a fresh search may take. Hashing once per file version keeps the check and
drops the cost: the second and later searches only stat the file. Bundles (`load_manifest`)
use the same check, so a fresh `huse classify` does not re-hash every precision's graphs either.
`huse index info` (`Index.verify_all`) hashes everything regardless.

A stamp says "the file at (device, inode) with this size, mtime_ns and ctime_ns was hashed and
its sha256 was DIGEST". A stamp is used only when all of these still hold, so:
- a file replaced (os.replace, copy, restore from a backup) has another inode or ctime: re-hashed;
- a file changed in place has a new mtime and ctime. mtime can be set back (touch -d, utime),
  ctime cannot from user space (setting times sets ctime to now): re-hashed;
- a manifest that expects other bytes (another digest) never matches an old stamp.
- Filesystems with coarse timestamps could hide a same-size rewrite within one tick, so a file
  whose ctime is less than RACY_SECONDS old is hashed but not stamped (git's "racy clean" rule).
What stamps do not defend against is someone who can write the disk beneath the filesystem or
set the clock (root), or who can write the stamp folder (the same user, who could as well edit
the files and the manifest: signatures are the defence against artifacts changed elsewhere).

The folder is $HUSE_CACHE_DIR, else $XDG_CACHE_HOME/huse/verified, else ~/.cache/huse/verified.
It is used only when it belongs to the current user and no one else may write it; otherwise,
or with HUSE_VERIFY_CACHE=0, every file is hashed every time (the behaviour before stamps).
A stamp is an empty file named by the sha256 of what it vouches for: one stat to look up,
created atomically, safe with many processes, never parsed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

from huse.runtime.files import sha256_file

__all__ = ["sha256_matches", "stamp_dir", "RACY_SECONDS"]

RACY_SECONDS = 2.0  # FAT's mtime is 2 s; ext3/HFS+ 1 s: younger files are not stamped


def stamp_dir() -> Path | None:
    """The stamp folder (created if missing), or None when stamps are off or the folder is unsafe."""
    if os.environ.get("HUSE_VERIFY_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    root = os.environ.get("HUSE_CACHE_DIR")
    if root:
        folder = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = Path(base) / "huse" / "verified"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = folder.stat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        return None  # someone else could plant stamps: hash every time instead
    return folder


def _key(path: Path, digest: str, st: os.stat_result) -> str:
    ident = "\0".join(map(str, (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                st.st_ctime_ns, digest)))
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()


def sha256_matches(path: str | Path, digest: str, use_stamps: bool = True) -> bool:
    """True when the file's sha256 is `digest`: from a stamp if this file version was verified
    before, else by hashing it (and stamping it when it matches).

    Args:
        path: the file.
        digest: the expected sha256 (hex), e.g. from a manifest.
        use_stamps: False hashes regardless (an explicit `verify everything now`).
    Raises:
        OSError: the file cannot be read (missing, permissions).
    """
    path = Path(path)
    folder = stamp_dir() if use_stamps else None
    if folder is None:
        return sha256_file(path) == digest
    before = os.stat(path)
    stamp = folder / _key(path, digest, before)
    if stamp.exists():
        return True
    if sha256_file(path) != digest:
        return False
    after = os.stat(path)
    same = (before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns) == \
           (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns)
    if same and time.time() - after.st_ctime_ns / 1e9 >= RACY_SECONDS:  # changed while hashed, or too young: no stamp
        try:
            stamp.touch(exist_ok=True)
        except OSError:
            pass  # a read-only cache only costs speed
    return True
