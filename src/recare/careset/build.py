"""Building a CARE-set from a model and images (method §2): encode, run the algorithm, record diagnostics.

Image features are cached by model fingerprint and file-content hashes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from recare.careset.algorithm import (
    Candidates,
    Clustering,
    Refinement,
    global_clustering,
    intra_cluster_refinement,
    orthogonal_residual,
    top_k_candidates,
)
from recare.careset.artifact import (
    DROPPED_HIGH,
    DROPPED_LOW,
    DROPPED_REFINEMENT,
    KEPT,
    CandidateInfo,
    CareSet,
    ClipInfo,
    ClusterInfo,
    Diagnostics,
)
from recare.careset.config import CareSetConfig
from recare.careset.vocab import (
    Vocabulary,
    default_cache_dir,
    encode_vocabulary,
    restrict_vocabulary,
)
from recare.errors import RecareError
from recare.io import atomic_path, list_images, load_image_rgb
from recare.models.loading import ImageTextModel

logger = logging.getLogger(__name__)

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
    """Build the CARE-set of the target images (method §2).

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
    """build_careset over the folder's .jpg/.jpeg/.png files in sorted file-name order (method §2.2)."""
    return build_careset(clip, list_images(folder), reference_word, config, cache_dir, progress)


def careset_from_features(clip: ImageTextModel, image_features: torch.Tensor, vocab: Vocabulary,
                          reference_word: str, config: CareSetConfig) -> CareSet:
    """method §2.2-2.6 given encoded images and vocabulary; clip re-encodes candidates and the reference."""
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


