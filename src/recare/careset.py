"""CARE-set construction (SPEC 2): candidates, orthogonal residual, clustering, refinement.

The pipeline, each stage a pure function of tensors/arrays:

1. ``top_k_candidates``: the top-K vocabulary tokens of every image, counted; top-N kept (2.2).
2. ``orthogonal_residual``: r(e) = || e (I - e_c e_c^T) ||_2 against the reference word (2.3).
3. ``global_clustering``: t-SNE to 2-D, k-means, drop the extreme mean-residual clusters (2.4).
4. ``intra_cluster_refinement``: leave-one-out removal of over-aligned tokens (2.5).

``build_careset`` runs them with a model and images and returns a typed ``CareSet`` (2.6),
which saves to a versioned JSON file and also reads/writes the reference code's careset.json.
The formulas follow the paper (ICLR 2026, "Co-occurring Associated REtained concepts in
Diffusion Unlearning") and the defaults follow the reference code (damilab/CARE).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from recare.errors import RecareError
from recare.io import atomic_path, list_images, load_image_rgb, read_json, write_text_atomic
from recare.models import ImageTextModel
from recare.vocab import (DEFAULT_VOCAB_MODE, Vocabulary, check_cache_dtype, check_vocab_mode, default_cache_dir,
                          encode_vocabulary, restrict_vocabulary)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONCEPT_TYPES = ("object", "nudity", "style")
ANCHOR_TEMPLATE = "A {}"
RETAIN_TEMPLATES = {"object": "A photo of {}", "nudity": "A photo of {}", "style": "A painting of {}"}
KEPT = "kept"
DROPPED_LOW = "dropped: low-residual cluster"
DROPPED_HIGH = "dropped: high-residual cluster"
DROPPED_REFINEMENT = "dropped: refinement"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CareSetConfig:
    """Settings of CARE-set construction; defaults are the reference code's (SPEC 2)."""

    top_k: int = 50  # K: tokens taken per image by cosine similarity (2.2)
    top_n: int = 100  # N: most frequent tokens kept over all images (2.2)
    n_clusters: int = 7  # k-means clusters on the t-SNE map (reference 7; the paper uses 6) (2.4)
    drop_k: int = 1  # clusters dropped at EACH end of the mean-residual order, clamped to n_clusters // 2 (2.4)
    perplexity: float = 30.0  # t-SNE perplexity; lowered to n_candidates - 1 with a warning when too large (2.4)
    alpha: float = 0.01  # refinement margin: remove i when d_i > (1 + alpha) * mean_{j != i} d_j (2.5)
    min_cluster_size: int = 2  # smallest kept cluster that is refined (>= 2) (2.5)
    seed: int = 42  # random_state of t-SNE and k-means
    vocab_mode: str = DEFAULT_VOCAB_MODE  # "word" (whole words, default) or "raw" (reference); see recare.vocab
    vocab_words: list[str] | None = None  # search only these words of the vocabulary (a domain list); None: all
    cache_dtype: str = "float32"  # vocabulary features stored as "float32" or "float16" (reference) (2.1)
    concept_type: str = "object"  # "object", "nudity" (retain "A photo of {}") or "style" ("A painting of {}")
    anchor_template: str = ANCHOR_TEMPLATE  # anchor prompt per CARE word, used in the erase loss (2.6)
    retain_template: str | None = None  # retain prompt per word; None: chosen by concept_type (2.6)
    image_batch_size: int = 32  # images per image-encoder call (no effect on the result)
    text_batch_size: int = 1024  # texts per text-encoder call (no effect on the result)

    def __post_init__(self) -> None:
        _check_field_types(self, "CARE-set config")
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
        return cls(**_kwargs_from_dict(cls, data, "CARE-set config", all_required=False))


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


# ----------------------------------------------------------------------------- 2.2 candidates


@dataclass(frozen=True)
class Candidates:
    """The top-N candidate tokens, most frequent first (SPEC 2.2)."""

    indices: torch.Tensor  # (n,) long: vocabulary rows
    counts: torch.Tensor  # (n,) long: number of images whose top-K holds the token
    mean_similarity: torch.Tensor  # (n,) float32: mean cosine similarity over those images
    first_seen: torch.Tensor  # (n,) long: image_index * k + rank of the token's first appearance
    n_distinct: int  # distinct tokens over all images' top-K


def ranked_top_k(similarities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest values and their columns, ranked by value, ties to the lower column.

    Args:
        similarities: (m, V).
    Returns:
        values (m, k), columns (m, k) long.
    """
    values, columns = similarities.topk(k, dim=1)
    tied_rows = ((similarities >= values[:, -1:]).sum(dim=1) > k).nonzero().flatten().tolist()
    for row in tied_rows:  # ties straddle the k-th place: a stable full sort decides (rare)
        columns[row] = torch.sort(similarities[row], descending=True, stable=True).indices[:k]
        values[row] = similarities[row, columns[row]]
    columns, order = columns.sort(dim=1)  # equal values: lower column first
    values = values.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, columns.gather(1, order)


def top_k_candidates(image_features: torch.Tensor, vocab_features: torch.Tensor, k: int = 50, n: int = 100,
                     chunk_size: int = 256) -> Candidates:
    """Count each vocabulary token over the images' top-K lists and keep the N most frequent (SPEC 2.2).

    Cosine similarity is the dot product of the L2-normalised features, accumulated in float32.
    Ties in count go to the token seen first: the earliest position in the sequence of all top-K
    lists, image by image in input order and by rank within an image (rank: similarity
    descending, equal similarities by lower vocabulary index).

    Args:
        image_features: (m, d) normalised image embeddings, in image order.
        vocab_features: (V, d) normalised vocabulary embeddings.
        k: tokens per image. n: candidates kept. chunk_size: images per similarity block.
    """
    _check_feature_shapes(image_features, vocab_features)
    n_images, vocab_size = image_features.shape[0], vocab_features.shape[0]
    if not 1 <= k <= vocab_size:
        raise RecareError(f"top-K must be between 1 and the vocabulary size {vocab_size}, got {k}")
    if n < 1:
        raise RecareError(f"top-N must be >= 1, got {n}")
    values, columns = [], []
    vocab_t = vocab_features.float().T  # (d, V)
    for start in range(0, n_images, chunk_size):
        sims = image_features[start:start + chunk_size].float() @ vocab_t  # (b, V)
        chunk_values, chunk_columns = ranked_top_k(sims, k)
        values.append(chunk_values)
        columns.append(chunk_columns)
    flat_columns = torch.cat(columns).flatten()  # (m * k,) image-major, rank order within an image
    flat_values = torch.cat(values).flatten().double()
    counts = torch.bincount(flat_columns, minlength=vocab_size)
    sums = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, flat_columns, flat_values)
    positions = torch.arange(flat_columns.numel())
    first = torch.full((vocab_size,), flat_columns.numel(), dtype=torch.long)
    first.scatter_reduce_(0, flat_columns, positions, reduce="amin")
    distinct = (counts > 0).nonzero().flatten()
    if n > distinct.numel():
        raise RecareError(f"top-N = {n} is larger than the {distinct.numel()} distinct candidate tokens "
                          f"(top-K = {k} over {n_images} images); lower top-N or raise top-K")
    sort_key = first[distinct] - counts[distinct] * flat_columns.numel()  # count desc, then first seen
    chosen = distinct[sort_key.argsort()[:n]]
    return Candidates(indices=chosen, counts=counts[chosen], mean_similarity=(sums[chosen] / counts[chosen]).float(),
                      first_seen=first[chosen], n_distinct=int(distinct.numel()))


def _check_feature_shapes(image_features: torch.Tensor, vocab_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape[0] == 0:
        raise RecareError(f"image features must be a non-empty (m, d) matrix, got shape {tuple(image_features.shape)}")
    if vocab_features.ndim != 2 or vocab_features.shape[0] == 0:
        raise RecareError(f"vocabulary features must be a non-empty (V, d) matrix, got {tuple(vocab_features.shape)}")
    if image_features.shape[1] != vocab_features.shape[1]:
        raise RecareError(f"image features have dimension {image_features.shape[1]} but vocabulary features "
                          f"{vocab_features.shape[1]}: were they made by the same model?")


# ----------------------------------------------------------------------------- 2.3 residual


def orthogonal_residual(embeddings: torch.Tensor, reference_embedding: torch.Tensor) -> torch.Tensor:
    """r(e) = || e (I - e_c e_c^T) ||_2 with e_c the normalised reference embedding (SPEC 2.3).

    Args:
        embeddings: (n, d) or (d,); used as given (not normalised).
        reference_embedding: (d,) or (1, d).
    Returns:
        (n,) or () residual norms.
    """
    e_c = reference_embedding.reshape(-1).to(embeddings.dtype)
    norm = e_c.norm()
    if norm == 0:
        raise RecareError("the reference embedding is zero; cannot project it out")
    e_c = e_c / norm
    parallel = (embeddings @ e_c).unsqueeze(-1) * e_c  # (n, d): component along e_c
    return (embeddings - parallel).norm(dim=-1)


# ----------------------------------------------------------------------------- 2.4 clustering


@dataclass(frozen=True)
class Clustering:
    """Global clustering of the candidates and the clusters dropped at both ends (SPEC 2.4)."""

    labels: np.ndarray  # (n,) int: k-means cluster of each candidate
    coords: np.ndarray  # (n, 2): t-SNE coordinates
    order: list[int]  # clusters present, by ascending mean residual (ties: lower id)
    mean_residuals: dict[int, float]  # cluster -> mean residual of its tokens
    dropped_low: list[int]  # the effective_drop_k clusters with the lowest mean residual
    dropped_high: list[int]  # the effective_drop_k clusters with the highest mean residual
    kept: list[int]  # the other clusters, ascending id
    effective_perplexity: float  # t-SNE perplexity actually used
    effective_drop_k: int  # drop_k after clamping to half the number of clusters


def tsne_embedding(embeddings: np.ndarray, perplexity: float = 30.0, seed: int = 42) -> tuple[np.ndarray, float]:
    """2-D t-SNE (scikit-learn, init "pca", learning_rate "auto"); perplexity lowered to n - 1 if needed.

    Runs on one OpenMP thread: for ~100 points that is faster than a thread pool (much faster on a
    busy machine), and the result does not depend on the number of cores.

    Returns:
        coords (n, 2) and the perplexity used.
    """
    from sklearn.manifold import TSNE

    n_samples = embeddings.shape[0]
    if n_samples < 2:
        raise RecareError(f"t-SNE needs at least 2 candidate tokens, got {n_samples}")
    used = float(perplexity)
    if used >= n_samples:
        used = float(n_samples - 1)
        logger.warning("t-SNE perplexity %g needs more than %d candidates; using perplexity %g instead",
                       perplexity, n_samples, used)
    tsne = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=used, random_state=seed)
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(np.asarray(embeddings, dtype=np.float32)), used


def kmeans_labels(coords: np.ndarray, n_clusters: int = 7, seed: int = 42) -> np.ndarray:
    """KMeans(n_clusters, random_state=seed, n_init="auto") labels of the 2-D points (one OpenMP thread)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="openmp"):
        warnings.simplefilter("always", ConvergenceWarning)
        labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit_predict(coords)
    for warning in caught:
        logger.warning("k-means: %s", warning.message)
    return labels


def select_clusters(labels: np.ndarray, residuals: np.ndarray, drop_k: int = 1
                    ) -> tuple[list[int], dict[int, float], list[int], list[int], list[int], int]:
    """Order clusters by mean residual and drop drop_k at each end, clamped to half (SPEC 2.4).

    Returns:
        (order, mean_residuals, dropped_low, dropped_high, kept, effective_drop_k).
    """
    clusters = sorted({int(label) for label in labels})
    means = {c: float(np.mean(residuals[labels == c])) for c in clusters}
    order = sorted(clusters, key=lambda c: (means[c], c))
    k = min(drop_k, len(order) // 2)
    low, high = order[:k], order[len(order) - k:]
    kept = sorted(set(order) - set(low) - set(high))
    return order, means, low, high, kept, k


def global_clustering(embeddings: np.ndarray, residuals: np.ndarray, n_clusters: int = 7, drop_k: int = 1,
                      perplexity: float = 30.0, seed: int = 42) -> Clustering:
    """t-SNE -> k-means -> drop the lowest and highest mean-residual clusters (SPEC 2.4).

    Args:
        embeddings: (n, d) candidate embeddings. residuals: (n,) orthogonal residuals.
    """
    embeddings, residuals = np.asarray(embeddings), np.asarray(residuals, dtype=np.float64)
    n_tokens = embeddings.shape[0]
    if n_tokens < n_clusters:
        raise RecareError(f"{n_tokens} candidate tokens cannot form {n_clusters} clusters; "
                          "lower the number of clusters or raise top-N")
    coords, used_perplexity = tsne_embedding(embeddings, perplexity, seed)
    labels = kmeans_labels(coords, n_clusters, seed)
    order, means, low, high, kept, k = select_clusters(labels, residuals, drop_k)
    return Clustering(labels=labels, coords=coords, order=order, mean_residuals=means, dropped_low=low,
                      dropped_high=high, kept=kept, effective_perplexity=used_perplexity, effective_drop_k=k)


# ----------------------------------------------------------------------------- 2.5 refinement


@dataclass(frozen=True)
class Refinement:
    """Intra-cluster refinement results, one entry per candidate (SPEC 2.5)."""

    removed: np.ndarray  # (n,) bool: removed by the refinement
    scores: np.ndarray  # (n,) d_i = r(e_-i)^2; NaN where not evaluated
    thresholds: np.ndarray  # (n,) (1 + alpha) * mean_{j != i} d_j; NaN where not evaluated


def leave_one_out_scores(embeddings: torch.Tensor, reference_embedding: torch.Tensor) -> torch.Tensor:
    """d_i = r(e_-i)^2, e_-i the mean of the other rows (SPEC 2.5). embeddings: (m, d), m >= 2."""
    m = embeddings.shape[0]
    others_mean = (embeddings.sum(dim=0, keepdim=True) - embeddings) / (m - 1)  # (m, d): e_-i
    return orthogonal_residual(others_mean, reference_embedding) ** 2


def intra_cluster_refinement(embeddings: torch.Tensor, reference_embedding: torch.Tensor, labels: np.ndarray,
                             kept_clusters: Sequence[int], alpha: float = 0.01, min_size: int = 2) -> Refinement:
    """In each kept cluster of >= min_size tokens, remove i when d_i > (1 + alpha) mean_{j != i} d_j (SPEC 2.5).

    Removing an over-aligned token raises the cluster's orthogonal component, so a large d_i
    marks token i as aligned with the reference. Decisions are made for all tokens at once.
    """
    if min_size < 2:
        raise RecareError(f"refinement needs min_size >= 2 (a mean over the others), got {min_size}")
    labels = np.asarray(labels)
    removed = np.zeros(len(labels), dtype=bool)
    scores = np.full(len(labels), np.nan)
    thresholds = np.full(len(labels), np.nan)
    for cluster in kept_clusters:
        members = np.flatnonzero(labels == cluster)
        if len(members) < min_size:
            continue
        d = leave_one_out_scores(embeddings[torch.as_tensor(members)], reference_embedding).double()  # (m,)
        mean_others = (d.sum() - d) / (len(members) - 1)
        threshold = (1.0 + alpha) * mean_others
        removed[members] = (d > threshold).numpy()
        scores[members], thresholds[members] = d.numpy(), threshold.numpy()
    return Refinement(removed=removed, scores=scores, thresholds=thresholds)


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
    """The CARE-set D (SPEC 2.6): CARE words with their anchor and retain prompts."""

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
    kwargs = _kwargs_from_dict(CareSet, data, "CARE-set", all_required=False,
                               required=("format_version", "reference_word", "concept_type", "words", "anchors",
                                         "retain_prompts"))
    if not kwargs["reference_word"].strip():
        raise RecareError("'reference_word' is empty")
    check_concept_type(kwargs["concept_type"])
    for name in ("words", "anchors", "retain_prompts"):
        _string_list(kwargs[name], name)
    _check_same_length(kwargs["anchors"], kwargs["retain_prompts"], "anchors", "retain_prompts")
    _check_same_length(kwargs["anchors"], kwargs["words"], "anchors", "words")
    if kwargs.get("clip_model") is not None:
        kwargs["clip_model"] = ClipInfo(**_kwargs_from_dict(ClipInfo, kwargs["clip_model"], "clip_model"))
    if kwargs.get("config") is not None:
        kwargs["config"] = CareSetConfig.from_dict(kwargs["config"])
    if kwargs.get("diagnostics") is not None:
        kwargs["diagnostics"] = _diagnostics_from_dict(kwargs["diagnostics"])
    return CareSet(**kwargs)


def _diagnostics_from_dict(data: Any) -> Diagnostics:
    kwargs = _kwargs_from_dict(Diagnostics, data, "diagnostics", nested=("clusters", "candidates"))
    kwargs["clusters"] = [ClusterInfo(**_kwargs_from_dict(ClusterInfo, item, f"diagnostics.clusters[{i}]"))
                          for i, item in enumerate(_list(kwargs["clusters"], "diagnostics.clusters"))]
    kwargs["candidates"] = [CandidateInfo(**_kwargs_from_dict(CandidateInfo, item, f"diagnostics.candidates[{i}]",
                                                              all_required=False))
                            for i, item in enumerate(_list(kwargs["candidates"], "diagnostics.candidates"))]
    return Diagnostics(**kwargs)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise RecareError(f"'{where}' must be a list, got {type(value).__name__}")
    return value


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


def _matches_type(value: Any, hint: Any) -> bool:
    """isinstance for the simple hints used here: int, float, str, bool, None, X | None, list[X]."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_matches_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _check_field_types(obj: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches_type(value, hints[f.name]):
            raise RecareError(f"{where}: '{f.name}' must be {_type_name(hints[f.name])}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _kwargs_from_dict(cls: type, data: Any, where: str, all_required: bool = True,
                      required: Sequence[str] = (), nested: Sequence[str] = ()) -> dict[str, Any]:
    """Check a dict against dataclass `cls`: no unknown keys, required keys present, simple types right."""
    if not isinstance(data, dict):
        raise RecareError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecareError(f"{where} has unknown key(s) {unknown}")
    must = names if all_required else [f.name for f in dataclasses.fields(cls) if f.name in required or (
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)]
    missing = [name for name in must if name not in data]
    if missing:
        raise RecareError(f"{where} is missing key(s) {missing}")
    for name, value in data.items():
        if name in nested or dataclasses.is_dataclass(_strip_optional(hints[name])):
            continue
        if not _matches_type(value, hints[name]):
            raise RecareError(f"{where}: '{name}' must be {_type_name(hints[name])}, got {value!r}")
    return dict(data)


def _strip_optional(hint: Any) -> Any:
    args = [h for h in typing.get_args(hint) if h is not type(None)]
    return args[0] if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 1 else hint


# ----------------------------------------------------------------------------- building


def check_reference_word(clip: ImageTextModel, word: str) -> str:
    """The stripped reference word; RecareError when empty or made only of unknown tokens."""
    if not isinstance(word, str) or not word.strip():
        raise RecareError(f"empty reference word {word!r}; give the concept's word, e.g. 'nudity'")
    word = word.strip()
    ids = clip.tokenizer(word, add_special_tokens=False)["input_ids"]
    unknown = clip.tokenizer.unk_token_id
    if not ids or all(i == unknown for i in ids):
        raise RecareError(f"reference word {word!r} maps only to unknown tokens of the CLIP tokenizer")
    return word


def encode_image_inputs(clip: ImageTextModel, images: Sequence[Image.Image | str | os.PathLike],
                        batch_size: int = 32, progress: bool = True,
                        cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """(m, d) normalised features of PIL images or image files (loaded one batch at a time).

    With `cache_dir` and image FILES, the features are cached under `cache_dir/images/`, keyed
    by the model fingerprint and the SHA-256 of every file's bytes (so an edited or replaced
    image misses): rebuilding a CARE-set from the same images with other parameters (the
    paper's ablations) skips the image tower. In-memory PIL images are never cached.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise RecareError("images must be a list of PIL images or image paths, not a single one")
    images = list(images)
    if not images:
        raise RecareError("no images given to build the CARE-set from")
    cache_path = None
    if cache_dir is not None and all(isinstance(item, (str, os.PathLike)) for item in images):
        cache_path = _image_cache_path(clip, images, Path(cache_dir))
        cached = _read_image_cache(cache_path, len(images))
        if cached is not None:
            logger.info("image features read from cache %s", cache_path)
            return cached
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="Encoding images", unit="batch", disable=not progress):
        batch = [_as_rgb(item) for item in images[start:start + batch_size]]
        chunks.append(clip.encode_images(batch, batch_size=len(batch)))
    features = torch.cat(chunks)
    if cache_path is not None:
        from safetensors.torch import save_file

        with atomic_path(cache_path) as tmp:
            save_file({"features": features.contiguous()}, str(tmp))
    return features


def _image_cache_path(clip: ImageTextModel, paths: Sequence[str | os.PathLike], cache_dir: Path) -> Path:
    """cache_dir/images/<sha256 of model fingerprint, dtype and every file's bytes>.safetensors."""
    digest = hashlib.sha256(f"{clip.fingerprint()}\n{clip.dtype}\n".encode())
    for path in paths:
        try:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        except OSError as err:
            raise RecareError(f"cannot read image {path}: {err}") from err
    return cache_dir / "images" / f"images-{digest.hexdigest()[:32]}.safetensors"


def _read_image_cache(path: Path, n_images: int) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        features = load_file(str(path))["features"]
    except (SafetensorError, OSError, KeyError) as err:
        logger.warning("ignoring unreadable image-feature cache %s: %s", path, err)
        return None
    return features if features.ndim == 2 and features.shape[0] == n_images else None


def _as_rgb(item: Image.Image | str | os.PathLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        return load_image_rgb(item)
    raise RecareError(f"expected a PIL image or an image path, got {type(item).__name__}")


def build_careset(clip: ImageTextModel, images: Sequence[Image.Image | str | os.PathLike], reference_word: str,
                  config: CareSetConfig | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> CareSet:
    """Build the CARE-set of the target images (SPEC 2).

    Args:
        clip: image-text model (CLIP ViT-B/32 in the reference), loaded by the caller.
        images: target images, PIL or paths, in the order used for tie-breaking.
        reference_word: the target's word ("nudity", "Van Gogh").
        config: CareSetConfig (reference defaults when None).
        cache_dir: vocabulary and image-feature cache folder (None: $RECARE_CACHE or ~/.cache/recare).
        progress: tqdm progress bars.
    """
    config = config or CareSetConfig()
    reference_word = check_reference_word(clip, reference_word)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    image_features = encode_image_inputs(clip, images, config.image_batch_size, progress, cache_dir)
    vocab = encode_vocabulary(clip, config.vocab_mode, config.text_batch_size, cache_dir, config.cache_dtype,
                              progress=progress)
    if config.vocab_words is not None:
        vocab = restrict_vocabulary(vocab, config.vocab_words)
    return careset_from_features(clip, image_features, vocab, reference_word, config)


def build_careset_from_folder(clip: ImageTextModel, folder: str | os.PathLike, reference_word: str,
                              config: CareSetConfig | None = None, cache_dir: str | os.PathLike | None = None,
                              progress: bool = True) -> CareSet:
    """build_careset over the folder's .jpg/.jpeg/.png files in sorted file-name order (SPEC 2.2)."""
    return build_careset(clip, list_images(folder), reference_word, config, cache_dir, progress)


def careset_from_features(clip: ImageTextModel, image_features: torch.Tensor, vocab: Vocabulary,
                          reference_word: str, config: CareSetConfig) -> CareSet:
    """SPEC 2.2-2.6 given encoded images and vocabulary; clip re-encodes candidates and the reference."""
    candidates = top_k_candidates(image_features, vocab.features, config.top_k, config.top_n)
    rows = candidates.indices.tolist()
    embeddings = clip.encode_text([vocab.texts[i] for i in rows], batch_size=config.text_batch_size)  # (n, d)
    reference = clip.encode_text([reference_word])[0]  # (d,)
    residuals = orthogonal_residual(embeddings, reference)
    clustering = global_clustering(embeddings.numpy(), residuals.numpy(), config.n_clusters, config.drop_k,
                                   config.perplexity, config.seed)
    refinement = intra_cluster_refinement(embeddings, reference, clustering.labels, clustering.kept,
                                          config.alpha, config.min_cluster_size)
    diagnostics = _diagnostics(image_features.shape[0], vocab, candidates, residuals, clustering, refinement)
    words = [c.word for c in diagnostics.candidates if c.status == KEPT]
    if not words:
        raise RecareError(f"all {len(rows)} candidates were dropped (n_clusters={config.n_clusters}, "
                          f"drop_k={config.drop_k} -> {clustering.effective_drop_k} per side, "
                          f"{len(clustering.order)} clusters found); lower drop_k or raise n_clusters")
    clip_info = ClipInfo(source=clip.source, revision=clip.revision, fingerprint=clip.fingerprint())
    logger.info("CARE-set for %r: %d of %d candidates kept", reference_word, len(words), len(rows))
    return CareSet.from_words(reference_word, words, config.concept_type, config.anchor_template,
                              config.retain_prompt_template, clip_model=clip_info, config=config,
                              diagnostics=diagnostics)


def _status(cluster: int, removed: bool, clustering: Clustering) -> str:
    if cluster in clustering.dropped_low:
        return DROPPED_LOW
    if cluster in clustering.dropped_high:
        return DROPPED_HIGH
    return DROPPED_REFINEMENT if removed else KEPT


def _diagnostics(n_images: int, vocab: Vocabulary, candidates: Candidates, residuals: torch.Tensor,
                 clustering: Clustering, refinement: Refinement) -> Diagnostics:
    infos = []
    for pos, row in enumerate(candidates.indices.tolist()):
        cluster = int(clustering.labels[pos])
        score, threshold = refinement.scores[pos], refinement.thresholds[pos]
        infos.append(CandidateInfo(
            word=vocab.words[row], token=vocab.tokens[row], vocab_index=row, count=int(candidates.counts[pos]),
            mean_similarity=float(candidates.mean_similarity[pos]), residual=float(residuals[pos]),
            cluster=cluster, status=_status(cluster, bool(refinement.removed[pos]), clustering),
            refinement_score=None if np.isnan(score) else float(score),
            refinement_threshold=None if np.isnan(threshold) else float(threshold)))
    clusters = [ClusterInfo(cluster=c, size=int(np.sum(clustering.labels == c)),
                            mean_residual=clustering.mean_residuals[c], status=_status(c, False, clustering))
                for c in clustering.order]
    return Diagnostics(n_images=n_images, vocab_mode=vocab.mode, vocab_size=len(vocab),
                       n_distinct_candidates=candidates.n_distinct,
                       effective_perplexity=clustering.effective_perplexity,
                       effective_drop_k=clustering.effective_drop_k, clusters=clusters, candidates=infos)


# ----------------------------------------------------------------------------- report


def format_report(careset: CareSet, width: int = 100) -> str:
    """A readable report: clusters with their words and residuals, what was dropped and why, the kept words."""
    lines = [f"CARE-set for {careset.reference_word!r} (concept type {careset.concept_type})"]
    diag = careset.diagnostics
    if diag is not None:
        cfg = careset.config
        lines.append(f"{len(diag.candidates)} candidates (top-K {cfg.top_k if cfg else '?'} per image over "
                     f"{diag.n_images} images, {diag.n_distinct_candidates} distinct), vocabulary {diag.vocab_mode!r} "
                     f"of {diag.vocab_size} entries")
        lines.append(f"t-SNE perplexity {diag.effective_perplexity:g}; {len(diag.clusters)} clusters; "
                     f"{diag.effective_drop_k} dropped at each end of the mean-residual order")
        lines.append("Clusters by ascending mean residual (word (count, residual); x = dropped by refinement):")
        for cluster in diag.clusters:
            lines.extend(_cluster_lines(cluster, diag.candidates, width))
        refined = [c for c in diag.candidates if c.status == DROPPED_REFINEMENT]
        alpha = f"{cfg.alpha:g}" if cfg else "alpha"
        lines.append(f"Dropped by refinement (d_i > (1 + {alpha}) * mean of the others' d_j): "
                     + (", ".join(f"{c.word} (d={c.refinement_score:.4f} > {c.refinement_threshold:.4f})"
                                  for c in refined) or "none"))
    lines.append(f"Kept CARE words ({len(careset.words)}):")
    lines.extend(_pack(list(careset.words), width, indent="  "))
    return "\n".join(lines)


def _cluster_lines(cluster: ClusterInfo, candidates: list[CandidateInfo], width: int) -> list[str]:
    members = sorted((c for c in candidates if c.cluster == cluster.cluster), key=lambda c: -c.count)
    head = (f"  cluster {cluster.cluster}: {cluster.size} tokens, mean residual {cluster.mean_residual:.4f}, "
            f"{cluster.status}")
    items = [f"{'x ' if c.status == DROPPED_REFINEMENT else ''}{c.word} ({c.count}, {c.residual:.3f})" for c in members]
    return [head] + _pack(items, width, indent="    ")


def _pack(items: list[str], width: int, indent: str) -> list[str]:
    """Comma-separated items on lines of at most `width` characters, never splitting an item."""
    lines, line = [], ""
    for item in items:
        if line and len(indent) + len(line) + len(item) + 2 > width:
            lines.append(indent + line + ",")
            line = ""
        line = f"{line}, {item}" if line else item
    return lines + [indent + line] if line else lines
