"""Several class paths per product (multi-label catalogs), parsed once for training and serving.

A catalog's `classes` cell holds one hierarchical path (`clothing<tops<t-shirts`) or several
separated by `|` (`kitchen<appliances|gifts<for the home`); JSONL and Parquet may also give a
list of paths. A product's paths are kept canonical, de-duplicated and sorted, joined with `|`
(`join_paths`), so one string still identifies a product's classes everywhere a single path
did (training's Dataset, the index's class codes, bulk output).

At inference a multi-label bundle scores every class independently (a sigmoid per class) and
predicts every class at or above its own threshold (tuned on validation by training, stored in
the bundle); a product with none above gets its best class, since every catalog product has at
least one (`predict_sets`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import SEPARATOR, canonical

__all__ = ["PATH_SEPARATOR", "parse_paths", "join_paths", "cell_text", "is_multi_label", "predict_sets",
           "sigmoid", "label_path", "matches_prefix", "needs_review"]

PATH_SEPARATOR = "|"


def cell_text(value: Any) -> Any:
    """A JSONL/Parquet `classes` list of paths as one `|`-joined cell; any other value unchanged.

    Non-text list entries are left for the catalog's cell check to name (the value stays a list)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return PATH_SEPARATOR.join(value)
    if hasattr(value, "tolist") and not isinstance(value, str):  # a numpy array from a Parquet list column
        return cell_text(value.tolist())
    return value


@functools.lru_cache(maxsize=65536)  # a catalog repeats a few hundred cells over millions of rows: 3 us -> 80 ns
def parse_paths(cell: str) -> tuple[str, ...]:
    """`"b<x | a<y|b<x"` -> ("a<y", "b<x"): the canonical paths of one `classes` cell, sorted, unique.

    Raises:
        HuseError: an empty cell, an empty path between separators, or a path with an empty level.
    """
    if cell is None or not str(cell).strip():
        raise HuseError("empty class")
    parts = str(cell).split(PATH_SEPARATOR)
    if any(not p.strip() for p in parts):
        raise HuseError(f"{cell!r} has an empty path between '{PATH_SEPARATOR}' separators; "
                        f"expected e.g. 'kitchen<appliances{PATH_SEPARATOR}gifts<for the home'")
    return tuple(sorted({canonical(p) for p in parts}))


def join_paths(paths: Sequence[str]) -> str:
    """The one string of a product's classes: canonical paths sorted and joined with `|`."""
    return PATH_SEPARATOR.join(sorted(set(paths)))


def is_multi_label(classes: Sequence[str]) -> bool:
    """Whether any product (a `join_paths` string) has more than one path."""
    return any(PATH_SEPARATOR in c for c in classes)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-class probabilities of a multi-label head, computed in float64 for stability."""
    return (1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60, 60)))).astype(np.float32)


def predict_sets(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Predicted label sets as a boolean (N, C) matrix.

    Args:
        probs: (N, C) per-class probabilities.
        thresholds: (C,) per-class thresholds.
    Returns:
        (N, C) bool: every class at or above its threshold; where none is, the best class alone
        (every catalog product has at least one class).
    """
    pred = probs >= np.asarray(thresholds, dtype=probs.dtype)[None, :]
    empty = ~pred.any(axis=1)
    if empty.any():
        pred[np.flatnonzero(empty), probs[empty].argmax(axis=1)] = True
    return pred


def needs_review(result: dict[str, Any], min_confidence: float) -> bool:
    """Whether a `Classifier.classify` result is below `--min-confidence`: its top-1 score, or with a
    multi-label bundle any label's, since a set is only as sure as its least confident label. The one
    rule of `huse classify`, `huse serve` (/v1, /v2, the page) and the Triton model.

    Args:
        result: one item's result (an item that failed, without `top_k`, never needs review).
        min_confidence: the score below which a person should look.
    """
    if "top_k" not in result:
        return False
    scores = [x["score"] for x in result.get("labels") or result["top_k"][:1]]
    return bool(min(scores) < min_confidence)


def label_path(label: str, probs: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """The top-down path of one predicted leaf: each prefix node with its score.

    A node's score is the highest score of the leaves under it (with independent sigmoid scores a
    sum means nothing): "the product is in this department" at least as surely as in its best leaf.
    """
    parts = label.split(SEPARATOR)
    out = []
    for k in range(1, len(parts) + 1):
        node = SEPARATOR.join(parts[:k])
        under = [j for j, l in enumerate(labels) if l == node or l.startswith(node + SEPARATOR)]
        out.append({"level": k, "label": node, "score": float(probs[under].max())})
    return out


def matches_prefix(classes: str | None, prefix: str) -> bool:
    """Whether any path of a `classes` string is `prefix` or lies under it (search filters)."""
    if not classes:
        return False
    return any(p == prefix or p.startswith(prefix + SEPARATOR) for p in classes.split(PATH_SEPARATOR))
