"""A CLIP zero-shot detector: concept prompts against contrast prompts."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from PIL import Image

from recare.errors import RecareError
from recare.metrics.detectors.base import Detection, Detector, rgb_list
from recare.models.loading import ImageTextModel

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- CLIP zero-shot


def zero_shot_margin(image_features: torch.Tensor, concept_features: torch.Tensor,
                     contrast_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP zero-shot rule: is each image closer to some concept prompt than to every contrast prompt?

    With cosines c_j = cos(x, concept_j) and o_k = cos(x, contrast_k):
        margin = max_j c_j - max_k o_k;  detected = margin > 0 (a tie is NOT a detection).
    Returns (margin (n,), best concept index (n,), best contrast index (n,)).
    """
    if concept_features.shape[0] == 0 or contrast_features.shape[0] == 0:
        raise ValueError("need at least one concept and one contrast feature")
    img = torch.nn.functional.normalize(image_features.float(), dim=-1)  # (n, d)
    concept = img @ torch.nn.functional.normalize(concept_features.float(), dim=-1).T  # (n, C)
    contrast = img @ torch.nn.functional.normalize(contrast_features.float(), dim=-1).T  # (n, K)
    best_c, idx_c = concept.max(dim=1)
    best_o, idx_o = contrast.max(dim=1)
    return best_c - best_o, idx_c, idx_o


class ClipZeroShotDetector(Detector):
    """Zero-shot detector on a CLIP-like model: detected when margin = max cos(image, concept
    prompt) - max cos(image, contrast prompt) > 0 (`zero_shot_margin`); score = the margin."""

    name = "clip"

    def __init__(self, clip: ImageTextModel, concept_prompts: Sequence[str], contrast_prompts: Sequence[str],
                 template: str = "{}", batch_size: int = 64):
        """Args:
            clip: the image-text model.
            concept_prompts: texts naming the concept ("a nude person", "tench").
            contrast_prompts: texts for everything else ("a clothed person", "a fish").
            template: text given to CLIP is template.format(prompt); '{}' = the prompt as is.
        """
        if isinstance(concept_prompts, str) or isinstance(contrast_prompts, str):
            raise RecareError("concept_prompts and contrast_prompts must be lists of strings")
        if not concept_prompts or not contrast_prompts:
            raise RecareError("the CLIP detector needs at least one concept prompt and one contrast prompt")
        if template.count("{}") != 1:
            raise RecareError(f"template must contain '{{}}' exactly once, got {template!r}")
        overlap = sorted(set(concept_prompts) & set(contrast_prompts))
        if overlap:
            raise RecareError(f"prompts are both concept and contrast: {overlap}")
        self.clip = clip
        self.concept_prompts = list(concept_prompts)
        self.contrast_prompts = list(contrast_prompts)
        self.template = template
        self.batch_size = int(batch_size)
        self._text_features: tuple[torch.Tensor, torch.Tensor] | None = None

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(concept (C, d), contrast (K, d)) features, computed once."""
        if self._text_features is None:
            texts = [self.template.format(p) for p in self.concept_prompts + self.contrast_prompts]
            feats = self.clip.encode_text(texts)
            n = len(self.concept_prompts)
            self._text_features = (feats[:n], feats[n:])
        return self._text_features

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        if len(images) == 0:
            return []
        concept, contrast = self.text_features()
        feats = self.clip.encode_images(rgb_list(images), batch_size=self.batch_size)
        margin, idx_c, idx_o = zero_shot_margin(feats, concept, contrast)
        return [Detection(score=float(m), detected=bool(m > 0),
                          details={"concept": self.concept_prompts[int(c)], "contrast": self.contrast_prompts[int(o)]})
                for m, c, o in zip(margin, idx_c, idx_o)]

    def settings(self) -> dict[str, Any]:
        return {"detector": self.name, "clip_model": {"source": self.clip.source, "revision": self.clip.revision},
                "concept_prompts": self.concept_prompts, "contrast_prompts": self.contrast_prompts,
                "template": self.template, "rule": "max cos(concept) - max cos(contrast) > 0"}


