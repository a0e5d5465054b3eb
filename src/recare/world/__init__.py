"""A small procedural world in which the whole ReCARE pipeline runs offline on a CPU.

16x16 images of one shape (circle, square, triangle, diamond) with a colour, a texture (plain,
striped, dotted) and a background, with captions from a grammar and ground truth for every
image (recare.world.render). The target concept is the texture "dotted"; the co-occurring
benign concept is the shape "circle" (80% of dotted objects are circles, and their captions
usually leave the shape unnamed, as "a nude" leaves "person" implicit).

Trained models ship with the package (built by `recare synthetic build`, see recare.world.build):

    from recare.models import load_image_text_model, load_sd
    clip = load_image_text_model(recare.world.clip_path())   # the world's CLIP
    sd = load_sd(recare.world.sd_path())                      # the world's text-to-image model
    detector = recare.world.load_world_detector()             # ground-truth classifier

`build_report()` returns what the build measured (times, machine, accuracies, entanglement,
SHA-256 of every weight file's tensors) and, under "world", what the demo reads from a world.

The committed world is one of many: `recare synthetic build --target T --care C` trains a world
for any texture T and shape C, and `recare demo --world DIR` runs the demo on it
(recare.world.definition: `load_world`, `committed_world`). TARGET and CARE below are the
committed world's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recare.errors import RecareError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TARGET, CARE = "dotted", "circle"

__all__ = ["WEIGHTS_DIR", "TARGET", "CARE", "weights_dir", "clip_path", "sd_path", "detector_path",
           "load_world_detector", "build_report"]


def weights_dir() -> Path:
    """The folder of the committed world models (clip/, sd/, detector/, build_report.json)."""
    if not (WEIGHTS_DIR / "build_report.json").is_file():
        raise RecareError(f"the world's weights are missing from {WEIGHTS_DIR}; "
                          "build them with `recare synthetic build --out <dir>`")
    return WEIGHTS_DIR


def clip_path() -> Path:
    """Folder of the world's CLIP, for recare.models.load_image_text_model."""
    return weights_dir() / "clip"


def sd_path() -> Path:
    """Folder of the world's text-to-image model, for recare.models.load_sd / StableDiffusionPipeline."""
    return weights_dir() / "sd"


def detector_path() -> Path:
    """Folder of the world's ground-truth classifier, for recare.world.detectors.load_detector."""
    return weights_dir() / "detector"


def load_world_detector() -> Any:
    """The committed ground-truth classifier (recare.world.detectors.WorldClassifier)."""
    from recare.world.detectors import load_detector

    return load_detector(detector_path())


def build_report() -> dict[str, Any]:
    """The committed build report (JSON)."""
    from recare.io import read_json

    return read_json(weights_dir() / "build_report.json", "world build report")
