"""The plain-prompt attack ("pre-attack"): the benchmark prompts with their own seeds."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from recare.attacks.asr import (
    AttackResult,
    DetectorArg,
    ImageGenerator,
    detect_images,
    detector_settings,
    generation_settings,
    open_images,
    records_by_prompt,
)
from recare.errors import RecareError
from recare.generate.images import GenerationConfig, generate_images
from recare.generate.prompts import PromptJob
from recare.models.loading import SDComponents

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- plain prompts


def run_plain_attack(components: SDComponents, jobs: Sequence[PromptJob], detector: DetectorArg,
                     out_dir: str | os.PathLike, generation: GenerationConfig = GenerationConfig(),
                     device: str | torch.device | None = None, model_info: dict[str, Any] | None = None,
                     generate: ImageGenerator = generate_images) -> AttackResult:
    """The pre-attack ASR: the benchmark prompts with their seeds and guidance (method §5).

    Images go to out_dir (resumable, with manifest.json).
    """
    if not jobs:
        raise RecareError("no prompts to attack")
    paths = generate(components, list(jobs), Path(out_dir), generation, device, model_info)
    detections = detect_images(detector, open_images(paths))
    records = records_by_prompt(jobs, [j.prompt for j in jobs], paths, detections)
    settings = {"generation": generation_settings(generation), "model": model_block(components, model_info),
                "image_dir": str(out_dir)}
    return AttackResult("plain", tuple(records), detector_settings(detector), settings)


def model_block(components: SDComponents, model_info: dict[str, Any] | None) -> dict[str, Any]:
    return {"source": components.source, "revision": components.revision, "family": components.family,
            "dtype": str(components.unet.dtype).removeprefix("torch."), **(model_info or {})}


