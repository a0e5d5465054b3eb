"""The detector interface: Detection, Detector, detection rate."""

from __future__ import annotations

import abc
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from PIL import Image

from recare.errors import RecareError

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Detection:
    """The verdict of a detector on one image."""

    score: float  # the detector's confidence for the concept (meaning: see each detector)
    detected: bool  # True when the concept is judged present (an attack success)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-ready backend output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Detector(abc.ABC):
    """Common interface: `detect(images) -> list[Detection]`, a `name`, and `settings()`."""

    name: str = "detector"

    @abc.abstractmethod
    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        """One Detection per image, in order."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that decides a verdict, recorded in reports."""


@runtime_checkable
class DetectorLike(Protocol):
    """What the attacks need of a detector: any object with `detect` and `settings` (a Detector,
    the synthetic world's ground-truth classifier, a user's own). A plain callable
    `images -> list[Detection]` is accepted too (its settings are then recorded as "custom")."""

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        """One Detection per image, in order."""
        ...

    def settings(self) -> dict[str, Any]:
        """Everything that decides a verdict, recorded in reports."""
        ...


DetectorFunction = Callable[[Sequence[Image.Image]], Sequence[Detection]]
"""A plain callable detector: images -> one Detection per image."""


def detection_rate(detections: Sequence[Detection]) -> float:
    """Percentage of detections with detected=True (an attack success rate, 0-100)."""
    if not detections:
        raise RecareError("no detections: cannot compute a rate over zero images")
    return 100.0 * sum(d.detected for d in detections) / len(detections)


def rgb_list(images: Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        raise TypeError("detect takes a list of images")
    return [img if img.mode == "RGB" else img.convert("RGB") for img in images]


