"""Title normalisation and tokenisation: the one implementation used by training and serving.

Two tokenizers, chosen by the bundle's "tokenizer" spec:
- "word": the original HUSE word-index vocabulary (a JSON list of words; id 0 = padding,
  id 1 = out-of-vocabulary). Pure Python + numpy.
- "wordpiece": MiniLM's tokenizer.json, run by the `tokenizers` library (extra `minilm`).

Documented normalisations: bytes are decoded as UTF-8 with invalid sequences replaced
(U+FFFD); text is NFKC-normalised; only the first `max_chars` characters are read (a
10,000-character title costs the same as a 500-character one); tokens past `max_len` are
dropped. An empty or whitespace-only title is treated as missing.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from huse.runtime._lazy import lazy_import
from huse.runtime.errors import HuseError

PAD_ID, OOV_ID = 0, 1  # the word vocabulary's; MiniLM's [PAD] is id 0 too
# How a wordpiece bundle pads a batch (its tokenizer spec's "pad"; bundles without one: "fixed").
PAD_RULES = ("fixed", "longest")
TOKEN_INPUTS = ("input_ids", "attention_mask")  # the text graphs' (N, length) inputs
MAX_CHARS = 512
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# For ASCII text the same words as _WORD (letters and digits) without the regex engine: lower-case
# letters and digits kept, everything else a space, then split (about 1.7x faster on titles).
_ASCII_WORDS = str.maketrans({chr(c): chr(c).lower() if chr(c).isalnum() else " " for c in range(128)})
# `WordTokenizer.encode` encodes up to SMALL_BATCH titles a title at a time (batch 1: 1.7 vs 10.2 us for the
# batch path below; the two meet near 12 titles).
SMALL_BATCH = 8
# `WordTokenizer.encode` splits a larger all-ASCII batch as one byte string: the same rule as _ASCII_WORDS in a
# 256-byte table (bytes.translate runs in C, about 6x faster than str.translate's per-character lookups),
# with a break byte between titles that no ASCII title holds and that the table keeps as a word of its own.
_TITLE_BREAK = b"\x80"
_TITLE_JOIN = " \x80 "
_ASCII_WORD_BYTES = bytes(ord(chr(c).lower()) if chr(c).isalnum() else 0x20 for c in range(128)) + bytes(
    0x80 if c == 0x80 else 0x20 for c in range(128, 256))


def normalise_title(title: str | bytes | None) -> str | None:
    """Return the normalised title, or None when there is no usable text.

    Args:
        title: the raw title (str, UTF-8 bytes, or None).
    Returns:
        NFKC-normalised, whitespace-collapsed text capped at MAX_CHARS, or None if empty.
    """
    if title is None:
        return None
    if type(title) is str and title.isascii() and len(title) <= MAX_CHARS:
        # NFKC leaves ASCII as it is and the cap cannot bite: the same text, a third less work per title.
        return " ".join(title.split()) or None
    if isinstance(title, bytes):
        title = title.decode("utf-8", errors="replace")
    if not isinstance(title, str):
        raise HuseError(f"title must be text; got {type(title).__name__}")
    text = " ".join(unicodedata.normalize("NFKC", title[: MAX_CHARS * 2]).split())[:MAX_CHARS]
    return text or None


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits in any script)."""
    if text.isascii():
        return text.translate(_ASCII_WORDS).split()
    return _WORD.findall(text.lower())


class WordTokenizer:
    """The original HUSE text encoder's tokenizer: word -> index, padded to `max_len`.

    Args:
        vocab: words in id order, starting at id 2 (0 = padding, 1 = out-of-vocabulary).
        max_len: sequence length of the text graph.
    """

    kind = "word"

    def __init__(self, vocab: list[str], max_len: int = 24):
        self.vocab = list(vocab)
        self.max_len = int(max_len)
        self.index = {w: i + 2 for i, w in enumerate(self.vocab)}
        # encode's tables (str words, and ASCII words as bytes); the break between titles is -1.
        self._lookup = {**self.index, _TITLE_BREAK: -1}
        self._ascii_lookup = {w.encode("ascii"): i for w, i in self.index.items() if w.isascii()}
        self._ascii_lookup[_TITLE_BREAK] = -1

    @classmethod
    def build(cls, titles: list[str], max_len: int = 24, min_count: int = 1, max_words: int = 20000) -> "WordTokenizer":
        """Build a vocabulary from training titles (most frequent first, ties alphabetical)."""
        counts: dict[str, int] = {}
        for t in titles:
            for w in words(normalise_title(t) or ""):
                counts[w] = counts.get(w, 0) + 1
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[:max_words], max_len)

    def encode(self, titles: list[str]) -> np.ndarray:
        """Encode normalised titles into int32 ids (N, max_len).

        Up to SMALL_BATCH titles are encoded a title at a time. A larger batch is tokenised as one: an
        all-ASCII batch is split as one byte string with a break word between titles, every word is looked
        up in one pass, and the ids are scattered into rows with numpy (at batch 64, about half the CPU time
        of a loop per title; the same ids).
        """
        n = len(titles)
        ids = np.zeros((n, self.max_len), dtype=np.int32)
        if n <= SMALL_BATCH:
            get = self.index.get
            for r, title in enumerate(titles):
                row = [get(w, OOV_ID) for w in words(title)[:self.max_len]]
                ids[r, :len(row)] = row
            return ids
        if all(map(str.isascii, titles)):
            joined = _TITLE_JOIN.join(titles).encode("latin-1")
            tokens, lookup = joined.translate(_ASCII_WORD_BYTES).split(), self._ascii_lookup
        else:
            tokens = list(itertools.chain.from_iterable(words(t) + [_TITLE_BREAK] for t in titles))
            lookup = self._lookup
        flat = np.fromiter(map(lookup.get, tokens, itertools.repeat(OOV_ID)), dtype=np.int32, count=len(tokens))
        breaks = flat < 0
        row = np.cumsum(breaks)  # the title each word belongs to
        start = np.concatenate(([0], np.flatnonzero(breaks) + 1))  # where each title's words begin
        col = np.arange(len(flat)) - start[row]
        keep = ~breaks & (col < self.max_len)  # tokens past max_len are dropped
        ids[row[keep], col[keep]] = flat[keep]
        return ids

    def inputs(self, titles: list[str]) -> dict[str, np.ndarray]:
        return {"input_ids": self.encode(titles)}

    def spec(self, vocab_file: str = "vocab.json") -> dict[str, Any]:
        return {"type": self.kind, "vocab_file": vocab_file, "max_len": self.max_len,
                "pad_id": PAD_ID, "oov_id": OOV_ID, "lowercase": True, "max_chars": MAX_CHARS}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.vocab, ensure_ascii=False))


class WordPieceTokenizer:
    """MiniLM's WordPiece tokenizer via the `tokenizers` library (no torch).

    Args:
        tokenizer_file: path of a Hugging Face tokenizer.json.
        max_len: the most tokens a title keeps (titles are short; 32 covers them).
        pad: "fixed" pads every title to max_len (graphs exported with a fixed length, and runs);
            "longest" pads a batch to its longest title rounded up to `pad_multiple`, at most max_len:
            graphs exported with a dynamic length axis, where the attention mask makes padding exact, so
            a batch of 4-token titles costs a quarter of one padded to 32 (docs/performance.md, title-only).
        pad_multiple: with "longest", widths are multiples of this (few distinct shapes for the graph).
    """

    kind = "wordpiece"

    def __init__(self, tokenizer_file: str | Path, max_len: int = 32, pad: str = "fixed", pad_multiple: int = 8):
        tokenizers = lazy_import("tokenizers", "minilm")
        if pad not in PAD_RULES:
            raise HuseError(f"tokenizer padding {pad!r} is not one of {list(PAD_RULES)}; re-export the bundle")
        self.tokenizer_file = Path(tokenizer_file)
        self.max_len, self.pad, self.pad_multiple = int(max_len), pad, int(pad_multiple)
        self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self._tok.enable_truncation(max_length=self.max_len)
        if pad == "longest":
            self._tok.enable_padding(pad_id=PAD_ID, pad_to_multiple_of=self.pad_multiple)
        else:
            self._tok.enable_padding(pad_id=PAD_ID, length=self.max_len)

    def inputs(self, titles: list[str]) -> dict[str, np.ndarray]:
        enc = self._tok.encode_batch(list(titles))
        if not enc:
            width = self.max_len if self.pad == "fixed" else 0
            return {k: np.zeros((0, width), np.int32) for k in TOKEN_INPUTS}
        # Rounding up to the multiple may pass a max_len that is not one: what it adds there is padding.
        return {"input_ids": np.asarray([e.ids for e in enc], dtype=np.int32)[:, :self.max_len],
                "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int32)[:, :self.max_len]}

    def spec(self, vocab_file: str = "tokenizer.json") -> dict[str, Any]:
        spec = {"type": self.kind, "vocab_file": vocab_file, "max_len": self.max_len, "max_chars": MAX_CHARS}
        if self.pad == "longest":  # fixed specs stay as bundles and runs have always written them
            spec.update(pad="longest", pad_multiple=self.pad_multiple)
        return spec

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.tokenizer_file.read_bytes())


def concat_inputs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate feeds of the same graph batch-wise, token inputs padded first to the widest.

    Batches tokenised separately (requests merged by a server, ...) differ in width when padded to their
    longest title; padding with PAD_ID under a zero attention mask changes no result. Other inputs
    (images) and same-width token inputs are concatenated as they are.
    """
    out = {}
    for k in parts[0]:
        arrays = [p[k] for p in parts]
        if k in TOKEN_INPUTS:
            width = max(a.shape[1] for a in arrays)
            arrays = [a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=PAD_ID)
                      for a in arrays]
        out[k] = np.concatenate(arrays)
    return out


def load_tokenizer(spec: dict[str, Any], folder: str | Path) -> WordTokenizer | WordPieceTokenizer:
    """Build the tokenizer a bundle's manifest describes.

    Args:
        spec: the manifest's "tokenizer" entry.
        folder: the bundle directory holding spec["vocab_file"].
    """
    path = Path(folder) / spec["vocab_file"]
    if spec["type"] == "word":
        return WordTokenizer(json.loads(path.read_text(encoding="utf-8")), spec["max_len"])
    if spec["type"] == "wordpiece":
        return WordPieceTokenizer(path, spec["max_len"], spec.get("pad", "fixed"), spec.get("pad_multiple", 8))
    raise HuseError(f"Unknown tokenizer type {spec['type']!r} in the bundle; known: ['word', 'wordpiece']")
