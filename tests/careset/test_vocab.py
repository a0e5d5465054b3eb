"""Vocabulary entries, length-sorted short-padding encoding, and the vocabulary cache (SPEC 2.1)."""

from __future__ import annotations

import re

import pytest
import torch

import recare.careset.vocab as vocab_module
from recare.careset.vocab import (
    default_cache_dir,
    encode_texts_by_length,
    encode_vocabulary,
    token_lengths,
    vocabulary_entries,
)
from recare.errors import RecareError

TEXTS = ["a", "person</w>", "a photo of a cat sitting on a red mat in the sun", "nudity", "!",
         "Van Gogh starry night over the river", "woman", "the quick brown fox jumps"]


@pytest.fixture(scope="module")
def word_entries(clip_tokenizer):
    return vocabulary_entries(clip_tokenizer, "word")


@pytest.fixture(scope="module")
def raw_entries(clip_tokenizer):
    return vocabulary_entries(clip_tokenizer, "raw")


def test_word_mode_keeps_whole_alphabetic_words(word_entries):
    words, tokens, texts = word_entries
    assert len(words) == 32849
    assert texts == words
    assert len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]{2,}", w) for w in words)
    assert all(t == w + "</w>" for w, t in zip(words, tokens))
    assert tokens[words.index("person")] == "person</w>"
    assert "a" not in words and "1" not in words and "!" not in words and "µ" not in words


def test_raw_mode_is_the_whole_vocabulary_in_id_order(raw_entries, clip_tokenizer):
    words, tokens, texts = raw_entries
    assert len(words) == 49408
    assert texts == tokens
    assert tokens[2533] == "person</w>" and tokens[3510] == "person"
    assert words[2533] == words[3510] == "person"
    assert len(words) - len(set(words)) == 8420  # display words that collide (SPEC 2.1)
    assert clip_tokenizer.get_vocab()[tokens[40000]] == 40000


def test_unknown_vocab_mode_is_refused(clip_tokenizer):
    with pytest.raises(RecareError, match="unknown vocabulary mode 'words'"):
        vocabulary_entries(clip_tokenizer, "words")


def test_token_lengths_count_special_tokens(tiny_clip):
    assert token_lengths(tiny_clip, ["person", "person</w>", "a photo of"]) == [3, 6, 5]


def test_short_padding_matches_77_token_padding(tiny_clip, monkeypatch):
    widths = []
    tokenize = tiny_clip.tokenize

    def recording_tokenize(texts, padding="auto"):
        batch = tokenize(texts, padding=padding)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(tiny_clip, "tokenize", recording_tokenize)
    short = encode_texts_by_length(tiny_clip, TEXTS, batch_size=3)
    assert max(widths) < 77 and min(widths) == 3  # batches were padded only to their longest text
    widths.clear()
    full = tiny_clip.encode_text(TEXTS, batch_size=3, padding="max_length")
    assert set(widths) == {77}
    assert short.shape == full.shape == (len(TEXTS), 16)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)
    assert not torch.allclose(short[0], short[1], atol=1e-3)  # rows differ: order is checked above


def test_encode_texts_by_length_restores_input_order(tiny_clip):
    features = encode_texts_by_length(tiny_clip, TEXTS, batch_size=2)
    one_by_one = torch.cat([tiny_clip.encode_text([t], padding="max_length") for t in TEXTS])
    torch.testing.assert_close(features, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_encode_texts_by_length_refuses_empty_input(tiny_clip):
    with pytest.raises(RecareError, match="no texts"):
        encode_texts_by_length(tiny_clip, [])


@pytest.fixture
def small_vocabulary(monkeypatch):
    """Make encode_vocabulary see a 12-word vocabulary, so that cache tests run in a blink."""
    words = ["person", "woman", "man", "tree", "sky", "river", "cat", "dog", "night", "star", "red", "sun"]
    full = vocabulary_entries

    def entries(tokenizer, mode="word"):
        if mode == "raw":
            return words, [w + "</w>" for w in words], [w + "</w>" for w in words]
        full(tokenizer, mode)  # still validates the mode
        return list(words), [w + "</w>" for w in words], list(words)

    monkeypatch.setattr(vocab_module, "vocabulary_entries", entries)
    return words


def _refuse_encoding(*args, **kwargs):
    raise AssertionError("encode_text called although the cache should have answered")


def test_cache_hit_does_not_reencode(tiny_clip, small_vocabulary, tmp_path, monkeypatch):
    first = encode_vocabulary(tiny_clip, "word", batch_size=5, cache_dir=tmp_path, progress=False)
    assert first.words == small_vocabulary and first.features.shape == (12, 16)
    assert first.features.dtype == torch.float32
    assert len(list((tmp_path / "vocab").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "vocab").glob("*.json"))) == 1
    monkeypatch.setattr(tiny_clip, "encode_text", _refuse_encoding)
    second = encode_vocabulary(tiny_clip, "word", batch_size=5, cache_dir=tmp_path, progress=False)
    assert torch.equal(first.features, second.features)
    assert second.words == first.words and second.texts == first.texts


def test_other_fingerprint_mode_or_dtype_misses_the_cache(tiny_clip, small_vocabulary, tmp_path):
    from recare.models.tiny import build_tiny_clip

    base = encode_vocabulary(tiny_clip, "word", cache_dir=tmp_path, progress=False)
    other_model = build_tiny_clip(seed=1)
    assert other_model.fingerprint() != tiny_clip.fingerprint()
    other = encode_vocabulary(other_model, "word", cache_dir=tmp_path, progress=False)
    assert not torch.allclose(base.features, other.features, atol=1e-3)
    raw = encode_vocabulary(tiny_clip, "raw", cache_dir=tmp_path, progress=False)
    assert raw.texts[0] == "person</w>"
    half = encode_vocabulary(tiny_clip, "word", cache_dir=tmp_path, cache_dtype="float16", progress=False)
    assert half.features.dtype == torch.float32
    assert torch.equal(half.features, base.features.half().float())  # reference rounding (SPEC 2.1)
    assert len(list((tmp_path / "vocab").glob("*.safetensors"))) == 4


def test_corrupt_cache_is_rebuilt(tiny_clip, small_vocabulary, tmp_path, caplog):
    first = encode_vocabulary(tiny_clip, "word", cache_dir=tmp_path, progress=False)
    (cached,) = (tmp_path / "vocab").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    second = encode_vocabulary(tiny_clip, "word", cache_dir=tmp_path, progress=False)
    assert torch.equal(first.features, second.features)
    assert "ignoring unreadable vocabulary cache" in caplog.text


def test_use_cache_false_writes_nothing(tiny_clip, small_vocabulary, tmp_path):
    encode_vocabulary(tiny_clip, "word", cache_dir=tmp_path, use_cache=False, progress=False)
    assert not (tmp_path / "vocab").exists()


def test_default_cache_dir_follows_recare_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RECARE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RECARE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "recare")


def test_unknown_cache_dtype_is_refused(tiny_clip, tmp_path):
    with pytest.raises(RecareError, match="unknown cache dtype 'int8'"):
        encode_vocabulary(tiny_clip, "word", cache_dir=tmp_path, cache_dtype="int8")


# ----------------------------------------------------------------------------- restriction to a word list


def _five_word_vocabulary():
    from recare.careset.vocab import Vocabulary

    words = ["person", "woman", "man", "tree", "sky"]
    features = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    return Vocabulary("word", words, [w + "</w>" for w in words], list(words), features)


def test_restrict_vocabulary_keeps_listed_rows_in_vocabulary_order():
    from recare.careset.vocab import restrict_vocabulary

    small = restrict_vocabulary(_five_word_vocabulary(), ["sky", " Woman ", "sky", "", "person"])
    assert small.words == ["person", "woman", "sky"]
    assert small.tokens == ["person</w>", "woman</w>", "sky</w>"]
    assert small.features.tolist() == [[0.0, 1.0], [2.0, 3.0], [8.0, 9.0]]


def test_restrict_vocabulary_names_unknown_words():
    from recare.careset.vocab import restrict_vocabulary

    with pytest.raises(RecareError, match=r"not single whole-word entries.*\['circle', 'dotted'\]"):
        restrict_vocabulary(_five_word_vocabulary(), ["person", "circle", "dotted"])
    with pytest.raises(RecareError, match="lists no words"):
        restrict_vocabulary(_five_word_vocabulary(), ["  "])


def test_read_word_list(tmp_path):
    from recare.careset.vocab import read_word_list

    path = tmp_path / "words.txt"
    path.write_text("# world words\ncircle\n\n  dotted \n")
    assert read_word_list(path) == ["circle", "dotted"]
    with pytest.raises(RecareError, match="word list not found"):
        read_word_list(tmp_path / "missing.txt")
    path.write_text("# only a comment\n")
    with pytest.raises(RecareError, match="has no words"):
        read_word_list(path)
