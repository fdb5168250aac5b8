"""What runs a batch of each served model: the `huse` (classify) and `huse_embed` (embed) models.

Triton's Python backend splits a model into initialize / execute(requests) / finalize; here each
model gives the batcher three stages over `Classifier`'s own: `prepare_many` (decode, tokenise: a
thread pool, for every request waiting at once), `run` (the graphs, on one model instance's thread,
for the requests of a batch merged into one) and `finish` (top-k, paths: right after run, on the same
thread), one result per request. Nothing here knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from huse.runtime.bundle import require_visual
from huse.runtime.classifier import Classifier, Decoded, Prepared
from huse.runtime.serve.protocol import Items, classify_parameters, embed_parameters


@dataclass
class EmbedPrepared:
    """One embed request after decoding: its photos, and the titles of the items that have no usable photo."""

    decoded: Decoded
    titles: dict[int, bytes]  # item -> title, embedded by the text graph (universal space only)
    errors: dict[int, str]    # items with nothing usable
    space: str

    def __len__(self) -> int:
        return self.decoded.n


def _decode_together(clf: Classifier, images: dict[int, list]) -> dict[int, Decoded]:
    """The photos of several requests (request -> its photos) decoded as one batch, then split per request."""
    if not images:
        return {}
    batch = clf.decode([im for ims in images.values() for im in ims])
    return dict(zip(images, batch.split([len(ims) for ims in images.values()])))


class ClassifyModel:
    """The `huse` model: `Classifier.classify` over the merged requests of a batch.

    Args:
        classifier: the instance whose thread-safe `prepare`/`describe` serve every instance.
        min_confidence: top-1 below it (a multi-label item: any of its labels) sets `needs_review`, for
            whoever encodes the answers (the Triton repository's model.py; `huse serve`'s front has it from
            its own options).
    """

    def __init__(self, classifier: Classifier, min_confidence: float = 0.0):
        self.clf = classifier
        self.min_confidence = min_confidence

    def prepare_many(self, requests: Sequence[Items]) -> list[tuple[Prepared, int] | Exception]:
        """Decode and tokenise several requests' items at once (thread-safe): their photos decoded as
        one batch (small PNGs of one size in a few Pillow calls, not a few per photo), then each
        request's items grouped and tokenised. Returns per request (prepared, its top_k), or the
        exception that request alone raised (bad parameters, unequal inputs)."""
        out: list[Any] = [None] * len(requests)
        params: dict[int, tuple[int, str]] = {}
        for j, items in enumerate(requests):
            try:
                params[j] = classify_parameters(items.parameters)
            except Exception as e:
                out[j] = e
        decoded = _decode_together(self.clf, {j: requests[j].images for j, (_, mode) in params.items()
                                              if requests[j].images is not None and mode != "text"})
        for j, (top_k, mode) in params.items():
            items = requests[j]
            try:
                out[j] = (self.clf.prepare(decoded.get(j, items.images), items.titles, mode), top_k)
            except Exception as e:
                out[j] = e
        return out

    def run(self, clf: Classifier, parts: Sequence[tuple[Prepared, int]]) -> tuple[Prepared, dict[str, np.ndarray]]:
        """The graphs, once for all the batch's requests (on `clf`'s instance thread)."""
        merged = Prepared.merge([p for p, _ in parts])
        return merged, clf.infer(merged)

    def finish(self, parts: Sequence[tuple[Prepared, int]], out: tuple[Prepared, dict[str, np.ndarray]]
               ) -> list[list[dict[str, Any]]]:
        """Top-k and paths of the whole batch at once, then each request's results (its own top_k)."""
        merged, probs = out
        results = self.clf.describe(merged, probs, max(k for _, k in parts))
        answers, start = [], 0
        for prepared, k in parts:
            mine = results[start:start + len(prepared)]
            start += len(prepared)
            for r in mine:
                if "top_k" in r:
                    r["top_k"] = r["top_k"][:k]
            answers.append(mine)
        return answers


class EmbedModel:
    """The `huse_embed` model: an item's photo embedding, else its title's (universal space), as
    `huse embed` does; space "visual" takes photos only (`Classifier.embed_visual`)."""

    def __init__(self, classifier: Classifier):
        self.clf = classifier

    def prepare_many(self, requests: Sequence[Items]) -> list[EmbedPrepared | Exception]:
        """Per request its decoded photos and the titles of its items without a usable photo (all the
        requests' photos decoded as one batch), or the exception that request alone raised."""
        out: list[Any] = [None] * len(requests)
        spaces: dict[int, str] = {}
        for j, items in enumerate(requests):
            try:
                space = embed_parameters(items.parameters)
                if space == "visual":  # refused for this request alone, not for the batch it would join
                    require_visual(self.clf.manifest, self.clf.bundle)
                spaces[j] = space
            except Exception as e:
                out[j] = e
        decoded = _decode_together(self.clf, {j: requests[j].images if requests[j].images is not None
                                              else [None] * len(requests[j]) for j in spaces})
        for j, space in spaces.items():
            n, titles, photos = len(requests[j]), requests[j].titles, decoded[j]
            text, errors = {}, {}
            for i in range(n):
                if i in photos.rows:
                    continue
                if space == "universal" and titles is not None and titles[i] is not None:
                    text[i] = titles[i]
                else:
                    errors[i] = photos.errors.get(i) or (f"item {i} has no photo; space 'visual' embeds photos only"
                                                         if space == "visual" else f"item {i} has no photo or title")
            out[j] = EmbedPrepared(photos, text, errors, space)
        return out

    def run(self, clf: Classifier, parts: Sequence[EmbedPrepared]) -> list[tuple[np.ndarray, dict[int, str]]]:
        """Each space's graph once for the batch; returns (vectors, errors) per request."""
        answers = []
        for space in ("universal", "visual"):
            mine = [(j, p) for j, p in enumerate(parts) if p.space == space]
            if not mine:
                continue
            offsets = np.cumsum([0] + [len(p) for _, p in mine]).tolist()
            errors = {off + i: e for off, (_, p) in zip(offsets, mine) for i, e in p.errors.items()}
            decoded = Decoded.concat([p.decoded for _, p in mine])
            emb = clf.embed_visual(decoded) if space == "visual" else clf.embed_image(decoded)
            vectors = emb.vectors
            text = [(off + i, t) for off, (_, p) in zip(offsets, mine) for i, t in p.titles.items()]
            if text:
                t_emb = clf.embed_text([t for _, t in text])
                rows = [i for i, _ in text]
                vectors[rows] = t_emb.vectors
                errors.update({rows[j]: e for j, e in t_emb.errors.items()})
            for (j, p), off in zip(mine, offsets):
                answers.append((j, (vectors[off:off + len(p)],
                                    {i - off: e for i, e in errors.items() if off <= i < off + len(p)})))
        return [a for _, a in sorted(answers, key=lambda a: a[0])]

    def finish(self, parts: Sequence[EmbedPrepared], out: list) -> list:
        return out
