"""The detector registry: name -> constructor."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable

from recare.errors import RecareError
from recare.metrics.detectors.base import Detector
from recare.metrics.detectors.classifiers import ImageNetDetector, StyleDetector
from recare.metrics.detectors.nudity import NudityDetector
from recare.metrics.detectors.zero_shot import ClipZeroShotDetector

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- registry


def _make_style(model: str | os.PathLike, artist_label: str, **kwargs: Any) -> StyleDetector:
    return StyleDetector.load(model, artist_label, **kwargs)


DETECTORS: dict[str, Callable[..., Detector]] = {
    "nudenet": NudityDetector,
    "imagenet": ImageNetDetector.load,
    "style": _make_style,
    "clip": ClipZeroShotDetector,
}


def make_detector(name: str, **kwargs: Any) -> Detector:
    """Build a detector by name: 'nudenet', 'imagenet', 'style' or 'clip'.

    kwargs go to NudityDetector, ImageNetDetector.load, StyleDetector.load (model=, artist_label=)
    or ClipZeroShotDetector respectively.
    """
    if name not in DETECTORS:
        raise RecareError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    factory = DETECTORS[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise RecareError(f"bad arguments for detector {name!r}: {err}") from err
    return factory(**kwargs)
