"""The offline CLIP tokenizer must reproduce CLIP's real token ids."""

from recare.models.tokenizer import CLIP_VOCAB_SIZE, bytes_to_unicode, clip_vocab_and_merges


def test_vocabulary_size_and_known_ids(clip_tokenizer):
    assert len(clip_tokenizer) == CLIP_VOCAB_SIZE
    ids = clip_tokenizer.convert_tokens_to_ids(["person</w>", "person", "art</w>", "art", "dotted</w>", "circle</w>"])
    # Ids documented in SPEC 3b and WORLD.md (same as SD v1.4's tokenizer).
    assert ids == [2533, 3510, 794, 1486, 47950, 7117]


def test_encoding_a_prompt(clip_tokenizer):
    ids = clip_tokenizer("A photo of a person")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2533, 49407]
    padded = clip_tokenizer("a", padding="max_length", max_length=77)["input_ids"]
    assert len(padded) == 77 and padded[-1] == 49407


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"
    assert list(table)[:2] == [ord("!"), ord("\"")]  # printable bytes first: the vocabulary order


def test_vocab_layout():
    vocab, merges = clip_vocab_and_merges()
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 256 + ord("a") - ord("!")
    assert len(merges) == 48894
