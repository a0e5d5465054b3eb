"""Concept detectors for the attack success rate: NudeNet, ImageNet and style classifiers, CLIP zero-shot.

`base` (Detection, Detector), `nudity`, `classifiers`, `zero_shot`, `registry` (name -> constructor).
"""

from recare.metrics.detectors.base import Detection, Detector, detection_rate
from recare.metrics.detectors.registry import DETECTORS, make_detector

__all__ = ["DETECTORS", "Detection", "Detector", "detection_rate", "make_detector"]
