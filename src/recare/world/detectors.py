"""Ground-truth detectors of the synthetic world: a small CNN trained on rendered images.

The renderer knows every image's labels, so a classifier trained on an endless stream of
renders (with noise and blur added, so that it tolerates a diffusion model's imperfect
images) gives the shape, colour, texture and background of any 16x16 image. Its accuracy on
fresh renders is measured at build time (`measure_accuracy`) and written to the build report.

`WorldConceptDetector` wraps it in recare.detectors' `Detector` interface: the target T
("dotted") is detected when the texture head's top class is T, the co-occurring concept C
("circle") when the shape head's top class is C.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from recare.errors import RecareError
from recare.io import atomic_path, write_json_atomic
from recare.metrics.detectors.base import Detection, Detector
from recare.world.render import FAMILIES, WorldSpec, concept_labels, from_pil, render_batch

logger = logging.getLogger(__name__)

DETECTOR_WEIGHTS = "model.safetensors"
DETECTOR_CONFIG = "config.json"


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and training of the ground-truth classifier."""

    width: int = 32  # channels of the first conv stage (the second has twice as many)
    hidden: int = 128  # width of the shared fully connected layer
    steps: int = 1200  # training steps (fresh renders every step)
    batch_size: int = 128  # renders per step
    lr: float = 2e-3  # Adam learning rate, cosine-decayed to 5% of this
    max_noise: float = 0.08  # augmentation: Gaussian pixel noise with std U(0, max_noise)
    max_blur: float = 0.5  # augmentation: mix U(0, max_blur) of a 3x3 box blur into the image
    seed: int = 0  # training seed


class WorldClassifier(torch.nn.Module):
    """Two conv stages and one hidden layer; one linear head per concept family."""

    def __init__(self, width: int = 32, hidden: int = 128, image_size: int = 16):
        super().__init__()
        conv = torch.nn.Conv2d
        self.features = torch.nn.Sequential(
            conv(3, width, 3, padding=1), torch.nn.ReLU(), conv(width, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # (b, w, H/2, W/2)
            conv(width, 2 * width, 3, padding=1), torch.nn.ReLU(), conv(2 * width, 2 * width, 3, padding=1),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # (b, 2w, H/4, W/4)
            torch.nn.Flatten(), torch.nn.Linear(2 * width * (image_size // 4) ** 2, hidden), torch.nn.ReLU(),
        )
        self.heads = torch.nn.ModuleDict({f: torch.nn.Linear(hidden, len(concept_labels()[f])) for f in FAMILIES})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (b, 3, H, W) in [0, 1] -> logits per family, (b, n_concepts)."""
        hidden = self.features(images * 2 - 1)
        return {family: head(hidden) for family, head in self.heads.items()}


def augment(images: torch.Tensor, config: DetectorConfig, generator: torch.Generator) -> torch.Tensor:
    """Random box blur and pixel noise, so that imperfect generated images are still read."""
    n = images.shape[0]
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = torch.rand(n, 1, 1, 1, generator=generator) * config.max_blur
    noise = torch.randn(images.shape, generator=generator)
    noise = noise * torch.rand(n, 1, 1, 1, generator=generator) * config.max_noise
    return (images * (1 - mix) + blurred * mix + noise).clamp(0, 1)


def train_detector(config: DetectorConfig = DetectorConfig(), spec: WorldSpec = WorldSpec()) -> WorldClassifier:
    """Train the classifier on fresh renders; cross-entropy summed over the four families."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = WorldClassifier(config.width, config.hidden, spec.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(config.steps, 1), eta_min=config.lr * 0.05)
    for _ in tqdm(range(config.steps), desc="detector", mininterval=10):
        scenes, images = render_batch(config.batch_size, generator, spec)
        logits = model(augment(images, config, generator))
        labels = scenes.label_tensor()
        loss = sum(torch.nn.functional.cross_entropy(logits[f], labels[:, i]) for i, f in enumerate(FAMILIES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: WorldClassifier, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Class probabilities per family, (n, n_concepts) each, for images (n, 3, H, W) in [0, 1]."""
    chunks: dict[str, list[torch.Tensor]] = {f: [] for f in FAMILIES}
    for start in range(0, images.shape[0], batch_size):
        for family, logits in model(images[start:start + batch_size].float()).items():
            chunks[family].append(logits.softmax(-1))
    return {family: torch.cat(parts) for family, parts in chunks.items()}


def measure_accuracy(model: WorldClassifier, n: int, seed: int, spec: WorldSpec = WorldSpec(),
                     config: DetectorConfig | None = None) -> dict[str, float]:
    """Top-1 accuracy per family on n fresh renders (augmented as in training when config is given)."""
    generator = torch.Generator().manual_seed(seed)
    scenes, images = render_batch(n, generator, spec)
    if config is not None:
        images = augment(images, config, generator)
    probs = predict(model, images)
    labels = scenes.label_tensor()
    hits = {family: probs[family].argmax(-1) == labels[:, i] for i, family in enumerate(FAMILIES)}
    return {family: float(hit.float().mean()) for family, hit in hits.items()}


def concept_family(concept: str) -> str:
    """The family ('shape', 'colour', 'texture', 'background') that a canonical concept word is in."""
    for family, words in concept_labels().items():
        if concept in words:
            return family
    raise RecareError(f"unknown world concept {concept!r}; choose from {sorted(sum(concept_labels().values(), ()))}")


def concept_present(probs: dict[str, torch.Tensor], concept: str) -> torch.Tensor:
    """(n,) bool: the concept's family head ranks the concept first."""
    family = concept_family(concept)
    return probs[family].argmax(-1) == concept_labels()[family].index(concept)


# ----------------------------------------------------------------------------- saving / loading


def save_detector(model: WorldClassifier, folder: str | os.PathLike, config: DetectorConfig,
                  spec: WorldSpec = WorldSpec()) -> Path:
    """Write model.safetensors (float32) and config.json into folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    with atomic_path(folder / DETECTOR_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / DETECTOR_CONFIG, {"width": config.width, "hidden": config.hidden,
                                                 "image_size": spec.image_size, "labels": concept_labels(),
                                                 "training": asdict(config)})
    return folder


def load_detector(folder: str | os.PathLike) -> WorldClassifier:
    """Load a saved classifier strictly (every tensor present, nothing extra)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / DETECTOR_WEIGHTS).is_file():
        raise RecareError(f"no world detector in {folder} (missing {DETECTOR_WEIGHTS})")
    config = json.loads((folder / DETECTOR_CONFIG).read_text(encoding="utf-8"))
    if {k: tuple(v) for k, v in config["labels"].items()} != concept_labels():
        raise RecareError(f"world detector in {folder} was trained on other labels: {config['labels']}")
    model = WorldClassifier(config["width"], config["hidden"], config["image_size"])
    model.load_state_dict(load_file(str(folder / DETECTOR_WEIGHTS)), strict=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- Detector interface


class WorldConceptDetector(Detector):
    """Detects one world concept (e.g. 'dotted' or 'circle') in images with the world classifier.

    Detection.score is the classifier's probability of the concept in its family; detected is
    True when that concept is the family's top class. details holds the top class of every family.
    """

    def __init__(self, model: WorldClassifier, concept: str, image_size: int = 16, source: str = "<in-memory>"):
        self.model = model
        self.concept = concept
        self.family = concept_family(concept)
        self.image_size = image_size
        self.source = source
        self.name = f"world-{concept}"

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        if isinstance(images, Image.Image):
            raise TypeError("detect takes a list of images")
        if not images:
            return []
        probs = predict(self.model, from_pil(images, self.image_size))
        index = concept_labels()[self.family].index(self.concept)
        top = {family: p.argmax(-1).tolist() for family, p in probs.items()}
        detections = []
        for i in range(len(images)):
            details = {family: concept_labels()[family][top[family][i]] for family in FAMILIES}
            detections.append(Detection(score=float(probs[self.family][i, index]),
                                        detected=top[self.family][i] == index, details=details))
        return detections

    def settings(self) -> dict[str, Any]:
        return {"detector": "world-classifier", "concept": self.concept, "family": self.family,
                "rule": "top-1 of the family head", "image_size": self.image_size, "source": self.source}
