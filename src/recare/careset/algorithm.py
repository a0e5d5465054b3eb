"""The CARE-set algorithm as pure functions of tensors/arrays (method §2.2-2.5).

1. ``top_k_candidates``: the top-K vocabulary tokens of every image, counted; top-N kept (2.2).
2. ``orthogonal_residual``: r(e) = || e (I - e_c e_c^T) ||_2 against the reference word (2.3).
3. ``global_clustering``: t-SNE to 2-D, k-means, drop the extreme mean-residual clusters (2.4).
4. ``intra_cluster_refinement``: leave-one-out removal of over-aligned tokens (2.5).

The formulas follow the paper (ICLR 2026, "Co-occurring Associated REtained concepts in
Diffusion Unlearning") and the defaults follow the reference code (damilab/CARE).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from recare.errors import RecareError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- 2.2 candidates


@dataclass(frozen=True)
class Candidates:
    """The top-N candidate tokens, most frequent first (method §2.2)."""

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
    """Count each vocabulary token over the images' top-K lists and keep the N most frequent (method §2.2).

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
    """r(e) = || e (I - e_c e_c^T) ||_2 with e_c the normalised reference embedding (method §2.3).

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
    """Global clustering of the candidates and the clusters dropped at both ends (method §2.4)."""

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
    """Order clusters by mean residual and drop drop_k at each end, clamped to half (method §2.4).

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
    """t-SNE -> k-means -> drop the lowest and highest mean-residual clusters (method §2.4).

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
    """Intra-cluster refinement results, one entry per candidate (method §2.5)."""

    removed: np.ndarray  # (n,) bool: removed by the refinement
    scores: np.ndarray  # (n,) d_i = r(e_-i)^2; NaN where not evaluated
    thresholds: np.ndarray  # (n,) (1 + alpha) * mean_{j != i} d_j; NaN where not evaluated


def leave_one_out_scores(embeddings: torch.Tensor, reference_embedding: torch.Tensor) -> torch.Tensor:
    """d_i = r(e_-i)^2, e_-i the mean of the other rows (method §2.5). embeddings: (m, d), m >= 2."""
    m = embeddings.shape[0]
    others_mean = (embeddings.sum(dim=0, keepdim=True) - embeddings) / (m - 1)  # (m, d): e_-i
    return orthogonal_residual(others_mean, reference_embedding) ** 2


def intra_cluster_refinement(embeddings: torch.Tensor, reference_embedding: torch.Tensor, labels: np.ndarray,
                             kept_clusters: Sequence[int], alpha: float = 0.01, min_size: int = 2) -> Refinement:
    """In each kept cluster of >= min_size tokens, remove i when d_i > (1 + alpha) mean_{j != i} d_j (method §2.5).

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


