"""CLIP score (method §5): mean cosine between each image and its own prompt.

The reference (metrics/fid_eval.py) L2-normalises ViT-B/32 image and text features and takes
the diagonal of image @ text.T: a raw cosine, NOT multiplied by 100 and NOT clipped at 0
(torchmetrics' CLIPScore does both). SD v1.4 scores about 0.31 on COCO prompts (method §6).
Texts longer than CLIP's 77 tokens are truncated (ImageTextModel.tokenize).
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch
from PIL import Image

from recare.errors import RecareError
from recare.models.loading import ImageTextModel

logger = logging.getLogger(__name__)


class ClipScore(NamedTuple):
    """Mean CLIP score and the per-image cosines (unpacks as `(mean, per_image)`)."""

    mean: float
    per_image: torch.Tensor  # (n,) float32 cosines, in input order


def paired_cosines(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(n,) cosine between row i of image_features and row i of text_features (both (n, d))."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"expected two (n, d) tensors of one shape, got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    a = torch.nn.functional.normalize(image_features.float(), dim=-1)
    b = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return (a * b).sum(dim=-1)


def clip_score(clip: ImageTextModel, images: Sequence[Image.Image], prompts: Sequence[str],
               batch_size: int = 64) -> ClipScore:
    """CLIP score of images against their prompts (image i with prompt i).

    Args:
        clip: the image-text model (ViT-B/32 in the paper).
        images: generated images.
        prompts: one prompt per image.
        batch_size: images / texts per forward pass.
    """
    if isinstance(prompts, str):
        raise RecareError("prompts must be a list with one prompt per image, not a string")
    if len(images) != len(prompts):
        raise RecareError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
    if len(images) == 0:
        raise RecareError("CLIP score of zero images")
    image_features = clip.encode_images(list(images), batch_size=batch_size)
    text_features = clip.encode_text(list(prompts), batch_size=batch_size)
    per_image = paired_cosines(image_features, text_features)
    return ClipScore(float(per_image.mean()), per_image)
