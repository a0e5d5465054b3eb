"""Detection and attack success rate (method §5): detector calls, ASR with a Wilson interval, records."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from recare.errors import RecareError
from recare.generate.images import GenerationConfig
from recare.generate.prompts import PromptJob
from recare.io import load_image_rgb
from recare.metrics.care_score import proportion_ci
from recare.metrics.detectors.base import Detection, DetectorFunction, DetectorLike

logger = logging.getLogger(__name__)

DetectorArg = DetectorLike | DetectorFunction
"""A detector object (recare.metrics.detectors.DetectorLike) or a plain callable."""
ImageGenerator = Callable[..., list[Path]]  # the signature of recare.generate.generate_images

# ----------------------------------------------------------------------------- detection and ASR


def detect_images(detector: DetectorArg, images: Sequence[Image.Image]) -> list[Detection]:
    """Run a Detector (its .detect) or a plain callable on images; one Detection per image."""
    run = detector.detect if hasattr(detector, "detect") else detector
    detections = list(run(list(images)))
    if len(detections) != len(images):
        raise RecareError(f"the detector returned {len(detections)} detections for {len(images)} images")
    return detections


def detector_settings(detector: DetectorArg) -> dict[str, Any]:
    """The detector's settings() for reports, or its name when it is a plain callable."""
    if hasattr(detector, "settings"):
        return dict(detector.settings())
    return {"detector": getattr(detector, "__name__", type(detector).__name__), "rule": "custom callable"}


@dataclass(frozen=True)
class AsrSummary:
    """Attack successes among n images, as a percentage with a Wilson interval."""

    successes: int  # images detected
    n: int  # images scored
    level: float = 0.95  # confidence level of the interval

    @property
    def asr(self) -> float:
        """Attack success rate in percent."""
        return 100.0 * self.successes / self.n

    @property
    def ci(self) -> tuple[float, float]:
        """Wilson interval of the ASR, in percent (recare.care_score.proportion_ci)."""
        low, high = proportion_ci(self.successes, self.n, self.level)
        return 100.0 * low, 100.0 * high

    def to_json(self) -> dict[str, Any]:
        low, high = self.ci
        return {"asr": self.asr, "ci_low": low, "ci_high": high, "ci_level": self.level,
                "successes": self.successes, "n": self.n}


def summarize_asr(detections: Sequence[Detection | bool], level: float = 0.95) -> AsrSummary:
    """ASR of a list of detections (or booleans): successes = detected images."""
    if not detections:
        raise RecareError("no detections: cannot compute an attack success rate over zero images")
    hits = sum(bool(d.detected if isinstance(d, Detection) else d) for d in detections)
    return AsrSummary(hits, len(detections), level)


@dataclass(frozen=True)
class AttackRecord:
    """One prompt of an attack: what was given to the model and what the detector saw."""

    prompt: str  # the benchmark prompt (CCE generic: the template filled with the token)
    attacked_prompt: str  # the text given to the pipeline
    seeds: tuple[int, ...]  # one per image
    images: tuple[str, ...]  # image paths, one per seed
    detections: tuple[Detection, ...]  # one per image
    case_id: str | None = None  # the prompt file's case number, if any
    details: dict[str, Any] = field(default_factory=dict)  # attack-specific (token, prefix ids, losses)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "attacked_prompt": self.attacked_prompt, "case_id": self.case_id,
                "seeds": list(self.seeds), "images": list(self.images),
                "detections": [d.to_dict() for d in self.detections], "details": self.details}


@dataclass(frozen=True)
class AttackResult:
    """An attack's records, its ASR, and everything that produced it."""

    attack: str  # "plain", "cce", "cce-replaced" or "unlearndiffatk"
    records: tuple[AttackRecord, ...]
    detector: dict[str, Any]  # detector settings
    settings: dict[str, Any]  # attack, generation and model settings

    @property
    def summary(self) -> AsrSummary:
        return summarize_asr([d for r in self.records for d in r.detections])

    @property
    def asr(self) -> float:
        return self.summary.asr

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, **self.summary.to_json(), "detector": self.detector,
                "settings": self.settings, "records": [r.to_json() for r in self.records]}

    def format_line(self) -> str:
        s = self.summary
        low, high = s.ci
        return f"{self.attack}: ASR {s.asr:.2f}% ({s.successes}/{s.n}, 95% CI [{low:.1f}, {high:.1f}])"


def open_images(paths: Sequence[Path]) -> list[Image.Image]:
    return [load_image_rgb(p) for p in paths]


def records_by_prompt(jobs: Sequence[PromptJob], attacked: Sequence[str], paths: Sequence[Path],
                       detections: Sequence[Detection], details: Sequence[dict] | None = None) -> list[AttackRecord]:
    """Group per-image results into one record per prompt (jobs of one prompt_index and prompt)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.prompt_index, job.prompt), []).append(i)
    records = []
    for (_, prompt), idx in groups.items():
        first = idx[0]
        records.append(AttackRecord(
            prompt=prompt, attacked_prompt=attacked[first], seeds=tuple(jobs[i].seed for i in idx),
            images=tuple(str(paths[i]) for i in idx), detections=tuple(detections[i] for i in idx),
            case_id=jobs[first].case_id, details=dict(details[first]) if details else {}))
    return records


def generation_settings(generation: GenerationConfig) -> dict[str, Any]:
    return asdict(generation)
