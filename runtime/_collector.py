"""The garbage collector's settings for work that makes many short-lived objects: serving and bulk classify.

A batch's results are dicts and lists that die by reference counting, yet each allocation counts
towards the next collection. With the default thresholds (700, 10, 10) a young collection ran every
two batches of 64 titles and a full one re-scanned every row of the shard being filled, 13 times in
100,000 titles: 0.75-0.93 of 4.3-4.6 s (the local engine, titles only, int8-cpu, 2 cores). A young
generation of 50,000 objects lets most collections find those results already freed: 1.28x there, photos
with titles within noise (benchmarks/experiments/bulk_titles.py, README "Catalog scale"). Collections still
run; only cyclic garbage waits longer.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["THRESHOLDS", "fewer_collections"]

THRESHOLDS = (50_000, 20, 100)  # gc.set_threshold's: young generation, then each older one's count


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """THRESHOLDS while the block runs, then the caller's own again (they are the whole process's)."""
    old = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*old)
