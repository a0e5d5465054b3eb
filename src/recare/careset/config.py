"""Settings of CARE-set construction (method §2): CareSetConfig and prompt templates."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from recare.careset.vocab import (
    DEFAULT_VOCAB_MODE,
    check_cache_dtype,
    check_vocab_mode,
)
from recare.config import check_fields, from_dict
from recare.errors import RecareError

logger = logging.getLogger(__name__)

CONCEPT_TYPES = ("object", "nudity", "style")
ANCHOR_TEMPLATE = "A {}"
RETAIN_TEMPLATES = {"object": "A photo of {}", "nudity": "A photo of {}", "style": "A painting of {}"}
# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CareSetConfig:
    """Settings of CARE-set construction; defaults are the reference code's (method §2)."""

    top_k: int = 50  # K: tokens taken per image by cosine similarity (method §2.2)
    top_n: int = 100  # N: most frequent tokens kept over all images (method §2.2)
    n_clusters: int = 7  # k-means clusters on the t-SNE map (reference 7; the paper uses 6) (method §2.4)
    drop_k: int = 1  # clusters dropped at EACH end of the mean-residual order, clamped to n_clusters // 2 (method §2.4)
    perplexity: float = 30.0  # t-SNE perplexity; lowered to n_candidates - 1 with a warning if too large (method §2.4)
    alpha: float = 0.01  # refinement margin: remove i when d_i > (1 + alpha) * mean_{j != i} d_j (method §2.5)
    min_cluster_size: int = 2  # smallest kept cluster that is refined (>= 2) (method §2.5)
    seed: int = 42  # random_state of t-SNE and k-means
    vocab_mode: str = DEFAULT_VOCAB_MODE  # "word" (whole words, default) or "raw" (reference); see recare.vocab
    vocab_words: list[str] | None = None  # search only these words of the vocabulary (a domain list); None: all
    cache_dtype: str = "float32"  # vocabulary features stored as "float32" or "float16" (reference) (method §2.1)
    concept_type: str = "object"  # "object", "nudity" (retain "A photo of {}") or "style" ("A painting of {}")
    anchor_template: str = ANCHOR_TEMPLATE  # anchor prompt per CARE word, used in the erase loss (method §2.6)
    retain_template: str | None = None  # retain prompt per word; None: chosen by concept_type (method §2.6)
    image_batch_size: int = 32  # images per image-encoder call (no effect on the result)
    text_batch_size: int = 1024  # texts per text-encoder call (no effect on the result)

    def __post_init__(self) -> None:
        check_fields(self, "CARE-set config")
        for name in ("top_k", "top_n", "n_clusters", "image_batch_size", "text_batch_size"):
            if getattr(self, name) < 1:
                raise RecareError(f"CARE-set config: {name} must be >= 1, got {getattr(self, name)}")
        if self.drop_k < 0:
            raise RecareError(f"CARE-set config: drop_k must be >= 0, got {self.drop_k}")
        if not self.perplexity > 0:
            raise RecareError(f"CARE-set config: perplexity must be > 0, got {self.perplexity}")
        if self.alpha < 0:
            raise RecareError(f"CARE-set config: alpha must be >= 0, got {self.alpha}")
        if self.min_cluster_size < 2:
            raise RecareError(f"CARE-set config: min_cluster_size must be >= 2, got {self.min_cluster_size}")
        check_vocab_mode(self.vocab_mode)
        if self.vocab_words is not None and not self.vocab_words:
            raise RecareError("CARE-set config: vocab_words is empty (None searches the whole vocabulary)")
        check_cache_dtype(self.cache_dtype)
        check_concept_type(self.concept_type)
        check_template(self.anchor_template, "anchor_template")
        if self.retain_template is not None:
            check_template(self.retain_template, "retain_template")

    @property
    def retain_prompt_template(self) -> str:
        """retain_template, or the concept type's default ("A photo of {}" / "A painting of {}")."""
        return self.retain_template if self.retain_template is not None else RETAIN_TEMPLATES[self.concept_type]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "CareSetConfig":
        """Build from a dict, raising RecareError for unknown, missing-typed or invalid fields."""
        return from_dict(cls, data, "CARE-set config")


def check_concept_type(concept_type: str) -> None:
    if concept_type not in CONCEPT_TYPES:
        raise RecareError(f"unknown concept type {concept_type!r}; choose one of {list(CONCEPT_TYPES)}")


def check_template(template: str, name: str = "template") -> None:
    """A prompt template holds exactly one "{}" where the word goes."""
    if template.count("{}") != 1:
        raise RecareError(f"{name} {template!r} must contain exactly one '{{}}' placeholder for the word")


def fill_template(template: str, word: str) -> str:
    """The template with its "{}" replaced by `word` (no other brace is interpreted)."""
    return template.replace("{}", word, 1)

