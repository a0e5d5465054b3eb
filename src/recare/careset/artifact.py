"""The CARE-set artifact (method §2.6): a typed, versioned JSON file with per-candidate diagnostics.

Also reads and writes the reference code's two-key careset.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from recare.careset.config import ANCHOR_TEMPLATE, RETAIN_TEMPLATES, CareSetConfig, check_concept_type, fill_template
from recare.config import from_dict
from recare.errors import RecareError
from recare.io import read_json, write_text_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEPT = "kept"
DROPPED_LOW = "dropped: low-residual cluster"
DROPPED_HIGH = "dropped: high-residual cluster"
DROPPED_REFINEMENT = "dropped: refinement"

# ----------------------------------------------------------------------------- artifact


@dataclass
class ClipInfo:
    """Which image-text model built the CARE-set."""

    source: str  # Hub id or folder
    revision: str | None  # Hub revision, if any
    fingerprint: str | None  # ImageTextModel.fingerprint(): hash of weights and tokenizer


@dataclass
class CandidateInfo:
    """One of the top-N candidates and what happened to it."""

    word: str  # display word
    token: str  # vocabulary entry ("person</w>")
    vocab_index: int  # row in the vocabulary of its mode
    count: int  # images whose top-K held it
    mean_similarity: float  # mean image-token cosine similarity over those images
    residual: float  # r(e), orthogonal residual against the reference word
    cluster: int  # k-means cluster
    status: str  # KEPT, DROPPED_LOW, DROPPED_HIGH or DROPPED_REFINEMENT
    refinement_score: float | None = None  # d_i, when refined
    refinement_threshold: float | None = None  # (1 + alpha) * mean_{j != i} d_j, when refined


@dataclass
class ClusterInfo:
    """One k-means cluster of the candidates."""

    cluster: int  # k-means label
    size: int  # candidates in it
    mean_residual: float  # mean r(e) of its candidates
    status: str  # KEPT, DROPPED_LOW or DROPPED_HIGH


@dataclass
class Diagnostics:
    """How a CARE-set was built: every candidate and cluster with its fate."""

    n_images: int  # images the candidates were counted over
    vocab_mode: str  # "word" or "raw"
    vocab_size: int  # vocabulary entries searched
    n_distinct_candidates: int  # distinct tokens over all top-K lists
    effective_perplexity: float  # t-SNE perplexity used
    effective_drop_k: int  # clusters dropped at each end after clamping
    clusters: list[ClusterInfo]  # by ascending mean residual
    candidates: list[CandidateInfo]  # most frequent first


@dataclass
class CareSet:
    """The CARE-set D (method §2.6): CARE words with their anchor and retain prompts."""

    reference_word: str  # the target's reference word ("nudity")
    concept_type: str  # "object", "nudity" or "style"
    words: list[str]  # the CARE words
    anchors: list[str]  # anchor prompts ("A person"), used in the erase loss
    retain_prompts: list[str]  # retain prompts ("A photo of person")
    clip_model: ClipInfo | None = None  # None for a file in the reference layout
    config: CareSetConfig | None = None  # None for a file in the reference layout
    diagnostics: Diagnostics | None = None  # None for a file in the reference layout
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_words(cls, reference_word: str, words: Sequence[str], concept_type: str = "object",
                   anchor_template: str = ANCHOR_TEMPLATE, retain_template: str | None = None,
                   **extra: Any) -> "CareSet":
        """A CareSet whose prompts are the templates filled with `words` (non-empty).

        extra: clip_model, config and diagnostics, when known.
        """
        if not reference_word.strip():
            raise RecareError("empty reference word")
        _string_list(list(words), "words")
        check_concept_type(concept_type)
        retain_template = retain_template if retain_template is not None else RETAIN_TEMPLATES[concept_type]
        return cls(reference_word=reference_word, concept_type=concept_type, words=list(words),
                   anchors=[fill_template(anchor_template, w) for w in words],
                   retain_prompts=[fill_template(retain_template, w) for w in words], **extra)

    @property
    def reference_key(self) -> str:
        """{ref} of the reference layout: lower-cased, only [a-z0-9_-] kept ("Van Gogh" -> "vangogh")."""
        return reference_key(self.reference_word)

    @property
    def retain_kind(self) -> str:
        """"painting" for style targets, else "photo" (the reference layout's key suffix)."""
        return "painting" if self.concept_type == "style" else "photo"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format_version": data.pop("format_version"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_reference_dict(self) -> dict[str, list[str]]:
        """The reference code's careset.json: {ref}_care_word and {ref}_care_word_photo|painting."""
        key = self.reference_key
        if not key:
            raise RecareError(f"reference word {self.reference_word!r} has no [a-z0-9_-] characters "
                              "to name the reference layout's keys")
        return {f"{key}_care_word": list(self.anchors),
                f"{key}_care_word_{self.retain_kind}": list(self.retain_prompts)}

    def to_reference_json(self) -> str:
        return json.dumps(self.to_reference_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike, layout: str = "recare") -> Path:
        """Write atomically as recare's versioned JSON ("recare") or the reference layout ("reference")."""
        if layout not in ("recare", "reference"):
            raise RecareError(f"unknown CARE-set layout {layout!r}; choose 'recare' or 'reference'")
        write_text_atomic(path, self.to_json() if layout == "recare" else self.to_reference_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, reference_word: str | None = None) -> "CareSet":
        """Read recare's JSON or the reference layout; RecareError names what is wrong.

        From the reference layout: reference_word is the key prefix ("vangogh"), concept_type is
        "style" for a "_painting" key and "object" for "_photo", words are the anchors without
        their leading "A ", and clip_model, config and diagnostics are None.
        reference_word, when given, must match the file's (compared by reference key).
        """
        data = read_json(path, "CARE-set file")
        try:
            careset = cls.from_dict(data)
        except RecareError as err:
            raise RecareError(f"invalid CARE-set file {path}: {err}") from err
        if reference_word is not None and reference_key(reference_word) != careset.reference_key:
            raise RecareError(f"CARE-set file {path} is for reference word {careset.reference_word!r}, "
                              f"not {reference_word!r}")
        return careset

    @classmethod
    def from_dict(cls, data: Any) -> "CareSet":
        """Validate and convert a recare-format or reference-layout dict."""
        if not isinstance(data, dict):
            raise RecareError(f"expected a JSON object, got {type(data).__name__}")
        if "format_version" in data:
            return _careset_from_recare_dict(data)
        if _is_reference_layout(data):
            return _careset_from_reference_dict(data)
        raise RecareError(f"neither a recare CARE-set (no 'format_version' key) nor the reference layout "
                          f"(exactly the keys '{{ref}}_care_word' and '{{ref}}_care_word_photo' or "
                          f"'{{ref}}_care_word_painting'); found keys {sorted(data)}")


def reference_key(word: str) -> str:
    """The reference's key for a word: lower-cased, spaces and all but [a-z0-9_-] removed."""
    return re.sub(r"[^a-z0-9_-]", "", word.strip().lower())


_REFERENCE_KEY = re.compile(r"^(?P<ref>.*)_care_word(?:_(?P<kind>photo|painting))?$")


def _is_reference_layout(data: dict) -> bool:
    return len(data) == 2 and all(_REFERENCE_KEY.match(str(key)) for key in data)


def _careset_from_reference_dict(data: dict) -> CareSet:
    matches = {key: _REFERENCE_KEY.match(key) for key in data}
    anchor_keys = [k for k, m in matches.items() if m["kind"] is None]
    retain_keys = [k for k, m in matches.items() if m["kind"] is not None]
    if len(anchor_keys) != 1 or len(retain_keys) != 1:
        raise RecareError(f"reference layout needs one '{{ref}}_care_word' key and one "
                          f"'{{ref}}_care_word_photo'/'_painting' key, got {sorted(data)}")
    ref, kind = matches[anchor_keys[0]]["ref"], matches[retain_keys[0]]["kind"]
    if matches[retain_keys[0]]["ref"] != ref or not ref:
        raise RecareError(f"reference layout keys name different or empty reference words: {sorted(data)}")
    anchors = _string_list(data[anchor_keys[0]], anchor_keys[0])
    retain = _string_list(data[retain_keys[0]], retain_keys[0])
    _check_same_length(anchors, retain, anchor_keys[0], retain_keys[0])
    words = [a[2:] if a.startswith("A ") else a for a in anchors]
    return CareSet(reference_word=ref, concept_type="style" if kind == "painting" else "object", words=words,
                   anchors=anchors, retain_prompts=retain)


def _careset_from_recare_dict(data: dict) -> CareSet:
    version = data["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise RecareError(f"unknown CARE-set format_version {version!r} (this recare reads {FORMAT_VERSION})")
    data = dict(data)
    nested = {"clip_model": lambda v: from_dict(ClipInfo, v, "clip_model"), "config": CareSetConfig.from_dict,
              "diagnostics": lambda v: from_dict(Diagnostics, v, "diagnostics")}
    for name, build in nested.items():
        if data.get(name) is not None:
            data[name] = build(data[name])
    careset = from_dict(CareSet, data, "CARE-set", required=("format_version", "reference_word", "concept_type",
                                                            "words", "anchors", "retain_prompts"))
    if not careset.reference_word.strip():
        raise RecareError("'reference_word' is empty")
    check_concept_type(careset.concept_type)
    for name in ("words", "anchors", "retain_prompts"):
        _string_list(getattr(careset, name), name)
    _check_same_length(careset.anchors, careset.retain_prompts, "anchors", "retain_prompts")
    _check_same_length(careset.anchors, careset.words, "anchors", "words")
    return careset


def _string_list(value: Any, where: str) -> list[str]:
    """A non-empty list of non-empty strings."""
    if not isinstance(value, list):
        raise RecareError(f"'{where}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise RecareError(f"'{where}' is an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RecareError(f"'{where}'[{i}] must be a non-empty string, got {item!r}")
    return value


def _check_same_length(a: list, b: list, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise RecareError(f"'{name_a}' has {len(a)} entries but '{name_b}' has {len(b)}")


