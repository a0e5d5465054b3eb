"""The CARE score (method §5): does the erased model still draw the co-occurring concept w*?

Generate images from prompts that contain w* ("A photo of a person"); an image is a success
when its CLIP cosine to the label w* is the largest over a fixed label list (R-Precision@1,
i.e. top-1 zero-shot classification). The score is the fraction of successes, reported per
prompt and overall, each with a Wilson 95% interval.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from recare.config import option
from recare.errors import RecareError
from recare.generate.images import SCHEDULERS, GenerationConfig, generate_images
from recare.generate.prompts import DEFAULT_SEED, jobs_for_prompts
from recare.io import load_image_rgb
from recare.metrics.labels import default_care_labels
from recare.models.loading import ImageTextModel, SDComponents

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure metric


def care_hits(image_features: torch.Tensor, label_features: torch.Tensor, target_index: int) -> torch.Tensor:
    """Successes of R-Precision@1: the target label has the strictly largest cosine (method §5).

    Args:
        image_features: (n, d) image embeddings (normalised here, so any scale is fine).
        label_features: (L, d) label text embeddings.
        target_index: row of the CARE word w* in label_features.
    Returns:
        (n,) bool tensor. A tie for the maximum counts as a FAILURE, whatever the label order
        (the reference takes `argmax`, which breaks ties towards the lower label index; exact
        ties of float cosines practically never happen).
    """
    sims = cosine_matrix(image_features, label_features)  # (n, L)
    if not 0 <= target_index < sims.shape[1]:
        raise ValueError(f"target_index {target_index} out of range for {sims.shape[1]} labels")
    target = sims[:, target_index]  # (n,)
    others = torch.cat([sims[:, :target_index], sims[:, target_index + 1:]], dim=1)  # (n, L-1)
    if others.shape[1] == 0:
        return torch.ones_like(target, dtype=torch.bool)
    return target > others.max(dim=1).values


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosines between the rows of a (n, d) and b (m, d), in float32."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927, JASA 22:209-212), by scipy:
    `scipy.stats.binomtest(successes, n).proportion_ci(level, method="wilson")`.

    With p = successes/n and z the two-sided normal quantile of `level`:
        centre = (p + z^2/(2n)) / (1 + z^2/n)
        half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2))
    """
    from scipy import stats

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return max(0.0, float(interval.low)), min(1.0, float(interval.high))


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class CareTally:
    """Successes among n images, with the mean cosine of the images to w*."""

    successes: int
    n: int
    mean_target_cosine: float  # mean CLIP cosine image vs. w* (the reference's "mean_target_score")
    level: float = 0.95  # confidence level of `ci`

    @property
    def score(self) -> float:
        return self.successes / self.n

    @property
    def ci(self) -> tuple[float, float]:
        """Wilson interval of the score."""
        return proportion_ci(self.successes, self.n, self.level)

    def to_json(self) -> dict[str, Any]:
        low, high = self.ci
        return {"score": self.score, "ci_low": low, "ci_high": high, "ci_level": self.level,
                "successes": self.successes, "n": self.n, "mean_target_cosine": self.mean_target_cosine}


@dataclass(frozen=True)
class CareScoreReport:
    """CARE score per prompt and overall, and what produced it."""

    care_word: str  # w*
    labels: tuple[str, ...]  # the label list the images were classified against
    label_template: str  # text given to CLIP for a label: template.format(label)
    prompts: tuple[str, ...]  # in first-appearance order
    per_prompt: tuple[CareTally, ...]  # one per prompt, same order
    overall: CareTally  # all images together
    clip_model: dict[str, Any]  # {"source", "revision"} of the image-text model
    settings: dict[str, Any] = field(default_factory=dict)  # generation settings, SD model, notes (caller's)

    @property
    def score(self) -> float:
        return self.overall.score

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": "care_score", "care_word": self.care_word, **self.overall.to_json(),
            "per_prompt": [{"prompt": p, **t.to_json()} for p, t in zip(self.prompts, self.per_prompt)],
            "labels": list(self.labels), "label_template": self.label_template,
            "clip_model": self.clip_model, "settings": self.settings,
        }

    def format_table(self) -> str:
        """A plain-text table: one row per prompt, then the overall row."""
        rows = [(p, t) for p, t in zip(self.prompts, self.per_prompt)] + [("ALL", self.overall)]
        width = min(60, max(len(p) for p, _ in rows))
        lines = [f"CARE score for {self.care_word!r} ({len(self.labels)} labels, "
                 f"{int(self.overall.level * 100)}% Wilson CI)",
                 f"{'prompt':<{width}}  {'hits':>9}  {'score':>5}  {'CI':>13}  {'cos(w*)':>7}"]
        for prompt, t in rows:
            if prompt == "ALL":
                lines.append("-" * len(lines[1]))
            text = prompt if len(prompt) <= width else prompt[:width - 3] + "..."
            low, high = t.ci
            lines.append(f"{text:<{width}}  {f'{t.successes}/{t.n}':>9}  {t.score:5.3f}  "
                         f"[{low:.3f}, {high:.3f}]  {t.mean_target_cosine:7.4f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- scoring


def label_texts(labels: Sequence[str], template: str = "{}") -> list[str]:
    """The texts encoded for the labels: template.format(label) ('{}' = raw label, the default)."""
    if template.count("{}") != 1:
        raise RecareError(f"label template must contain '{{}}' exactly once, got {template!r}")
    return [template.format(label) for label in labels]


def check_labels(labels: Sequence[str], care_word: str) -> int:
    """Index of care_word in labels; RecareError for a missing word or a duplicate label."""
    if len(set(labels)) != len(labels):
        duplicates = sorted({x for x in labels if list(labels).count(x) > 1})
        raise RecareError(f"label list has duplicates: {duplicates}")
    if care_word not in labels:
        raise RecareError(f"CARE word {care_word!r} is not in the label list ({len(labels)} labels); "
                          "it must be on the list (method §5: it is never added automatically)")
    return list(labels).index(care_word)


def score_care_images(
    clip: ImageTextModel,
    images: Sequence[Image.Image],
    prompt_of_image: Sequence[str],
    care_word: str,
    labels: Sequence[str] | None = None,
    template: str = "{}",
    settings: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> CareScoreReport:
    """CARE score of already-generated images (method §5).

    Args:
        clip: the image-text model (ViT-B/32 in the reference).
        images: the generated images.
        prompt_of_image: the prompt of each image; rows of the report follow first appearance.
        care_word: w*, which must be one of `labels`.
        labels: label list; None = recare.labels.default_care_labels() (82 labels).
        template: label text template, '{}' = raw labels (reference default).
        settings: recorded as is in the report.
        batch_size: images per CLIP forward pass.
    """
    labels = default_care_labels() if labels is None else list(labels)
    target = check_labels(labels, care_word)
    if len(images) != len(prompt_of_image):
        raise ValueError(f"{len(images)} images but {len(prompt_of_image)} prompts")
    if not images:
        raise RecareError("no images to score")
    label_features = clip.encode_text(label_texts(labels, template))  # (L, d)
    image_features = clip.encode_images(list(images), batch_size=batch_size)  # (n, d)
    hits = care_hits(image_features, label_features, target)  # (n,)
    target_cos = cosine_matrix(image_features, label_features)[:, target]  # (n,)
    prompts = list(dict.fromkeys(prompt_of_image))
    per_prompt = []
    for prompt in prompts:
        mask = torch.tensor([p == prompt for p in prompt_of_image])
        per_prompt.append(_tally(hits[mask], target_cos[mask]))
    return CareScoreReport(care_word, tuple(labels), template, tuple(prompts), tuple(per_prompt),
                           _tally(hits, target_cos), {"source": clip.source, "revision": clip.revision},
                           dict(settings or {}))


def _tally(hits: torch.Tensor, target_cos: torch.Tensor) -> CareTally:
    return CareTally(int(hits.sum()), int(hits.numel()), float(target_cos.mean()))


# ----------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class CareScoreConfig:
    """CARE-score settings; defaults are the reference's (method §5)."""

    images_per_prompt: int = 10  # images per prompt, at seeds seed..seed+images_per_prompt-1
    seed: int = DEFAULT_SEED  # base seed of every prompt
    num_inference_steps: int = 50  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance
    scheduler: str = option("default", choices=SCHEDULERS)  # the pipeline's own scheduler (PNDM for SD v1.4), or "ddim"
    batch_size: int = 10  # images per pipeline call (does not change the images)
    label_template: str = "{}"  # CLIP text for a label; '{}' = raw label (reference default), e.g. "a photo of a {}"
    labels: tuple[str, ...] | None = None  # label list; None = the reference's 82 (COCO 80 + stars, freshwater)
    extra_labels: tuple[str, ...] = ()  # appended to the label list (w* is never added automatically)
    clip_batch_size: int = 64  # images per CLIP forward pass

    def __post_init__(self):
        if self.images_per_prompt < 1:
            raise RecareError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if self.clip_batch_size < 1:
            raise RecareError(f"clip_batch_size must be >= 1, got {self.clip_batch_size}")
        label_texts([], self.label_template)
        self.generation_config()  # validates steps, batch size and scheduler

    def label_list(self) -> list[str]:
        """The full label list: `labels` (or the default 82) followed by `extra_labels`."""
        base = default_care_labels() if self.labels is None else list(self.labels)
        return base + list(self.extra_labels)

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                batch_size=self.batch_size, scheduler=self.scheduler)


def evaluate_care_score(
    components: SDComponents,
    clip: ImageTextModel,
    prompts: Sequence[str],
    care_word: str,
    config: CareScoreConfig = CareScoreConfig(),
    image_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    model_info: dict[str, Any] | None = None,
) -> CareScoreReport:
    """Generate images_per_prompt images per prompt (seeds 42+i for every prompt) and score them (method §5).

    Images are kept in `image_dir` (with manifest.json; an interrupted run resumes there), else
    they go to a temporary folder that is removed afterwards. `model_info` identifies the SD
    model in the image manifest and in the report (e.g. the erased-UNet weights path).
    """
    labels = config.label_list()
    check_labels(labels, care_word)
    if not prompts:
        raise RecareError("no CARE prompts given")
    repeated = sorted({p for p in prompts if list(prompts).count(p) > 1})
    if repeated:
        raise RecareError(f"CARE prompts listed more than once (their images would be identical): {repeated}")
    jobs = jobs_for_prompts(list(prompts), config.images_per_prompt, config.seed)
    with tempfile.TemporaryDirectory(prefix="recare-care-") as tmp:
        folder = Path(image_dir) if image_dir is not None else Path(tmp)
        paths = generate_images(components, jobs, folder, config.generation_config(), device, model_info)
        images = [load_image_rgb(path) for path in paths]
    settings = {"care_score": _config_json(config),
                "sd_model": {"source": components.source, "revision": components.revision,
                             "family": components.family, "dtype": str(components.unet.dtype).removeprefix("torch."),
                             **(model_info or {})},
                "generator_device": torch.device(device).type if device is not None else components.unet.device.type,
                "image_dir": str(image_dir) if image_dir is not None else None}
    return score_care_images(clip, images, [job.prompt for job in jobs], care_word, labels,
                             config.label_template, settings, config.clip_batch_size)


def _config_json(config: CareScoreConfig) -> dict[str, Any]:
    data = asdict(config)
    data["labels"] = None if config.labels is None else list(config.labels)
    data["extra_labels"] = list(config.extra_labels)
    return data
