"""Inputs of the tiny `recare train` runs shared by the CLI tests of both model families (SD 1.x, SDXL).

A plain module beside conftest.py (pytest puts tests/ on sys.path for it): importable by test modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY_TRAIN = """
[train]
erase_iterations = 2
rounds = 2
stage2_iterations = 2
ddim_steps = 4
stop_range = [1, 3]
checkpoint_every = 1

[train.inversion]
steps = 2
resolution = 32

[train.esd]
train_method = "xattn"
"""


def write_train_inputs(root: Path) -> Path:
    """Four random 32-px images (root/images), a CARE-set for 'nudity' and root/tiny.toml; returns root."""
    from recare.careset.artifact import CareSet

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    CareSet.from_words("nudity", ["person", "woman", "man"], concept_type="nudity").save(root / "careset.json")
    (root / "tiny.toml").write_text(TINY_TRAIN)
    return root


def train_args(inputs: Path, model_dir: Path, method: str, out: Path, *extra: str) -> list[str]:
    """`recare train` arguments of a tiny run on `model_dir` with the inputs of write_train_inputs."""
    return ["train", "--method", method, "--model", str(model_dir), "--concept", "nudity",
            "--careset", str(inputs / "careset.json"), "--images", str(inputs / "images"), "--out", str(out),
            "--config", str(inputs / "tiny.toml"), "--device", "cpu", *extra]
