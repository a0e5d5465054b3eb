"""Vocabulary text embeddings for CARE-set construction (method §2.1), with a disk cache.

Two vocabulary modes:

- ``"word"`` (the DEFAULT): only whole-word entries of the CLIP BPE vocabulary, i.e. entries
  that end in the end-of-word marker ``"</w>"``, with the marker stripped, kept when the rest is
  an ASCII alphabetic word of at least two letters (``[a-z]{2,}``; the CLIP vocabulary is
  lower-case), de-duplicated (first id wins), in id order. The clean word is what is encoded
  ("person" is the single token ``person</w>``). 32,849 of the 49,408 entries.
- ``"raw"`` (the reference code's): all 49,408 entries in id order, encoded as the RAW strings,
  ``"</w>"`` included (so ``"person</w>"`` is tokenised as ``person`` ``</`` ``w`` ``>``),
  word fragments and byte symbols kept; the display word is the entry with ``"</w>"`` stripped
  and is not de-duplicated (8,420 display words collide, e.g. ids 2533 and 3510 are both
  "person").

Why "word" is the default: raw mode searches the 14,925 word-initial/inner fragments too
(e.g. the non-final piece "person", id 3510), punctuation and byte symbols, which
make poor anchor prompts, lists the same display word twice, and encodes every entry with the
"</w>" characters as three extra tokens, so a candidate's embedding is not that of the word
that ends up in the prompt. "raw" stays available for parity with the reference. Limitation
of "word": CLIP's vocabulary cannot tell a word-final suffix piece from a word, so entries
such as "ing", "er" or "pers" (from "ing</w>", ...) remain; they rarely reach the top-N.

A vocabulary can be restricted to a word list (`restrict_vocabulary`, CareSetConfig.vocab_words):
a domain vocabulary, or the words a small model was actually trained on (the synthetic world's
CLIP saw about 30 words; its other 32,800 token rows are untrained and their text features are
noise that crowds the top-K, see recare.world.demo).

Encoding sorts the texts by token length before batching, so that short padding (CLIP pads a
batch only to its longest sequence, see recare.models.ImageTextModel) is effective, and then
restores the original order.

Cache: one safetensors file plus a small JSON metadata file per (model fingerprint, source,
revision, model dtype, vocabulary mode, cache dtype, vocabulary texts), never keyed by a file
path. Default folder: ``$RECARE_CACHE`` or ``~/.cache/recare`` (under ``vocab/``).
``cache_dtype="float16"`` stores the features rounded to float16 as the reference does (its
image top-K then sees float16 values; recare still accumulates the similarities in float32);
the default ``"float32"`` keeps full precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from recare.errors import RecareError
from recare.io import atomic_path, read_json, write_json_atomic
from recare.models.loading import ImageTextModel

logger = logging.getLogger(__name__)

VOCAB_MODES = ("word", "raw")
DEFAULT_VOCAB_MODE = "word"
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
END_OF_WORD = "</w>"
CACHE_FORMAT_VERSION = 1
_WORD = re.compile(r"[a-z]{2,}")


@dataclass(frozen=True)
class Vocabulary:
    """Encoded vocabulary: row i of `features` is the embedding of `texts[i]`, shown as `words[i]`."""

    mode: str  # "word" or "raw"
    words: list[str]  # display words ("person"), "</w>" stripped
    tokens: list[str]  # the tokenizer's vocabulary entries ("person</w>")
    texts: list[str]  # the strings fed to the text encoder (clean words, or raw entries in "raw" mode)
    features: torch.Tensor  # (n, d) float32, L2-normalised (values rounded to float16 if cached so)
    cache_dtype: str = "float32"  # precision the features were stored in

    def __len__(self) -> int:
        return len(self.words)


def default_cache_dir() -> Path:
    """$RECARE_CACHE, else ~/.cache/recare."""
    return Path(os.environ.get("RECARE_CACHE") or Path.home() / ".cache" / "recare").expanduser()


def vocabulary_entries(tokenizer, mode: str = DEFAULT_VOCAB_MODE) -> tuple[list[str], list[str], list[str]]:
    """(words, tokens, texts) of the tokenizer vocabulary in id order, for `mode` (see module doc)."""
    check_vocab_mode(mode)
    entries = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    if mode == "raw":
        words = [token.removesuffix(END_OF_WORD) for token in entries]
        return words, entries, list(entries)
    words, tokens, seen = [], [], set()
    for token in entries:
        word = token.removesuffix(END_OF_WORD)
        if token.endswith(END_OF_WORD) and _WORD.fullmatch(word) and word not in seen:
            seen.add(word)
            words.append(word)
            tokens.append(token)
    if not words:
        raise RecareError(f"vocabulary mode 'word' found no whole-word entries ending in {END_OF_WORD!r} "
                          "in this tokenizer (not a CLIP BPE tokenizer?); use vocabulary mode 'raw'")
    return words, tokens, list(words)


def check_vocab_mode(mode: str) -> None:
    """Raise RecareError for an unknown vocabulary mode."""
    if mode not in VOCAB_MODES:
        raise RecareError(f"unknown vocabulary mode {mode!r}; choose one of {list(VOCAB_MODES)}")


def check_cache_dtype(cache_dtype: str) -> None:
    """Raise RecareError for an unknown cache dtype."""
    if cache_dtype not in CACHE_DTYPES:
        raise RecareError(f"unknown cache dtype {cache_dtype!r}; choose one of {list(CACHE_DTYPES)}")


def token_lengths(clip: ImageTextModel, texts: Sequence[str]) -> list[int]:
    """Number of tokens of each text, special tokens included, truncated at the model's maximum."""
    ids = clip.tokenizer(list(texts), truncation=True, max_length=clip.max_length)["input_ids"]
    return [len(row) for row in ids]


def encode_texts_by_length(clip: ImageTextModel, texts: Sequence[str], batch_size: int = 1024,
                           padding: str = "auto", progress: bool = False,
                           desc: str = "Encoding vocabulary") -> torch.Tensor:
    """clip.encode_text over texts batched in token-length order; rows come back in input order.

    Sorting puts texts of equal length together, so that padding each batch to its longest
    sequence (``padding="auto"`` for CLIP) adds almost no padding.

    Returns:
        (n, d) float32 L2-normalised features, row i for texts[i].
    """
    if batch_size < 1:
        raise RecareError(f"text batch size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        raise RecareError("no texts to encode")
    lengths = token_lengths(clip, texts)
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    chunks = []
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        batch = [texts[i] for i in order[start:start + batch_size]]
        chunks.append(clip.encode_text(batch, batch_size=len(batch), padding=padding))
    sorted_features = torch.cat(chunks)  # (n, d) in length order
    features = torch.empty_like(sorted_features)
    features[torch.tensor(order)] = sorted_features
    return features


def vocabulary_cache_key(clip: ImageTextModel, mode: str, cache_dtype: str, texts: Sequence[str]) -> dict:
    """Everything the cached features depend on (never a file path)."""
    return {
        "cache_format_version": CACHE_FORMAT_VERSION,
        "fingerprint": clip.fingerprint(),
        "source": clip.source,
        "revision": clip.revision,
        "model_dtype": str(clip.dtype).removeprefix("torch."),
        "mode": mode,
        "cache_dtype": cache_dtype,
        "n_entries": len(texts),
        "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
    }


def _cache_paths(cache_dir: Path, key: dict) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    stem = cache_dir / "vocab" / f"vocab-{key['mode']}-{key['cache_dtype']}-{digest}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _read_cache(tensor_path: Path, meta_path: Path, key: dict) -> torch.Tensor | None:
    """The cached (n, d) features, or None when absent, stale or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (tensor_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = read_json(meta_path, "vocabulary cache metadata")
        features = load_file(str(tensor_path))["features"]
    except (RecareError, SafetensorError, OSError, KeyError) as err:
        logger.warning("ignoring unreadable vocabulary cache %s: %s", tensor_path, err)
        return None
    expected_dtype = CACHE_DTYPES[key["cache_dtype"]]
    if meta.get("key") != key or features.ndim != 2 or features.shape[0] != key["n_entries"] \
            or features.dtype != expected_dtype:
        logger.warning("ignoring stale vocabulary cache %s (metadata or shape does not match)", tensor_path)
        return None
    return features


def _write_cache(tensor_path: Path, meta_path: Path, key: dict, features: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(tensor_path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp))
    write_json_atomic(meta_path, {"key": key, "shape": list(features.shape), "file": tensor_path.name})


def encode_vocabulary(clip: ImageTextModel, mode: str = DEFAULT_VOCAB_MODE, batch_size: int = 1024,
                      cache_dir: str | os.PathLike | None = None, cache_dtype: str = "float32",
                      use_cache: bool = True, progress: bool = True) -> Vocabulary:
    """Encode the tokenizer vocabulary with clip's text tower (method §2.1), cached on disk.

    Args:
        clip: the image-text model (CLIP ViT-B/32 in the reference).
        mode: "word" (default) or "raw" (the reference's); see the module docstring.
        batch_size: texts per text-encoder call.
        cache_dir: cache folder; None uses $RECARE_CACHE or ~/.cache/recare.
        cache_dtype: "float32" (default) or "float16" (the reference's rounding).
        use_cache: read and write the cache (False: always encode, write nothing).
        progress: show a tqdm bar while encoding.

    Returns:
        Vocabulary whose float32 `features` hold the (optionally float16-rounded) embeddings.
    """
    check_cache_dtype(cache_dtype)
    words, tokens, texts = vocabulary_entries(clip.tokenizer, mode)
    key = vocabulary_cache_key(clip, mode, cache_dtype, texts)
    tensor_path, meta_path = _cache_paths(Path(cache_dir) if cache_dir else default_cache_dir(), key)
    stored = _read_cache(tensor_path, meta_path, key) if use_cache else None
    if stored is not None:
        logger.info("vocabulary features from cache %s", tensor_path)
    else:
        logger.info("encoding %d vocabulary entries (mode %r)", len(texts), mode)
        stored = encode_texts_by_length(clip, texts, batch_size, progress=progress).to(CACHE_DTYPES[cache_dtype])
        if use_cache:
            _write_cache(tensor_path, meta_path, key, stored)
            logger.info("vocabulary features cached in %s", tensor_path)
    return Vocabulary(mode=mode, words=words, tokens=tokens, texts=texts, features=stored.float(),
                      cache_dtype=cache_dtype)


def restrict_vocabulary(vocab: Vocabulary, words: Sequence[str]) -> Vocabulary:
    """The rows of `vocab` whose display word is in `words`, in vocabulary order (first row of a word).

    RecareError lists the words that are not entries of the vocabulary (e.g. multi-token words).
    """
    wanted = list(dict.fromkeys(w.strip().lower() for w in words if w.strip()))
    if not wanted:
        raise RecareError("the vocabulary restriction lists no words")
    first: dict[str, int] = {}
    for i, word in enumerate(vocab.words):
        first.setdefault(word, i)
    missing = [w for w in wanted if w not in first]
    if missing:
        raise RecareError(f"{len(missing)} word(s) of the vocabulary restriction are not single whole-word entries "
                          f"of the {vocab.mode!r} vocabulary: {missing[:20]}")
    rows = sorted(first[w] for w in wanted)
    return Vocabulary(mode=vocab.mode, words=[vocab.words[i] for i in rows], tokens=[vocab.tokens[i] for i in rows],
                      texts=[vocab.texts[i] for i in rows], features=vocab.features[rows],
                      cache_dtype=vocab.cache_dtype)


def read_word_list(path: str | os.PathLike) -> list[str]:
    """Words of a text file, one per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise RecareError(f"word list not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise RecareError(f"word list {path} is not UTF-8 text: {err}") from err
    words = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not words:
        raise RecareError(f"word list {path} has no words")
    return words
