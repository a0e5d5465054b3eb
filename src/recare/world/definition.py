"""A built world as the demo sees it: its concepts T and C and everything derived from them.

`recare synthetic build --target T --care C` trains a world for any texture T and shape C the
renderer offers (recare.world.render: TEXTURES, SHAPES). The build derives the demo's inputs from
the world's spec (`world_concepts`) and records them in build_report.json under "world":

    target, care            T (a texture, analogue of "nudity"), C (a shape, analogue of "person")
    target_prompts          "a <T> <colour> thing", one per colour: name T, leave the shape implicit
    care_prompts            "a <colour> <C> <place>": name C and no texture (the CARE-score prompts)
    initializer             C: the initializer word of textual inversion and of the CCE attack
    stereo_anchors          the T scene without T: things and C shapes of the other textures
    care_labels             the CARE score's labels: the world's object categories (its shapes)
    rates                   co-occurrence and caption rates (copies of the spec's fields)

`load_world(folder)` reads a world folder back (models and report) and refuses, naming the
problem, a folder that is not a built world or whose report lacks these fields. The committed
world (`committed_world()`, T = "dotted", C = "circle") is the demo's default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recare.config import check_fields, from_dict
from recare.errors import RecareError
from recare.world.render import SHAPES, TEXTURES, WorldSpec, care_prompts, stereo_anchors, target_prompts

WORLD_SECTION = "world"
"""Key of the demo's inputs in build_report.json."""
RATE_FIELDS = ("target_rate", "care_given_target", "omit_shape_given_target", "omit_shape_otherwise")
"""WorldSpec fields copied into the report's rates (with target_name_rate, the spec's naming rate of T)."""
MODEL_FOLDERS = ("clip", "sd", "detector")


@dataclass(frozen=True)
class WorldConcepts:
    """What the demo takes from a world besides its models (build_report.json, "world")."""

    target: str  # T: the texture to erase (analogue of "nudity")
    care: str  # C: the shape that co-occurs with T (analogue of "person")
    target_prompts: tuple[str, ...]  # prompts that name T and leave the shape implicit (target images, attacks)
    care_prompts: tuple[str, ...]  # prompts that name C and no texture (the CARE score's images)
    initializer: str  # initializer word of textual inversion and of the CCE attack
    stereo_anchors: tuple[str, ...]  # STEREO's anchors: the T scene without T
    care_labels: tuple[str, ...]  # labels of the CARE score's top-1 (C among them)
    rates: dict[str, float]  # co-occurrence and caption rates of the world (informative copies of the spec)

    def __post_init__(self) -> None:
        check_fields(self, "world concepts")
        if self.target not in TEXTURES:
            raise RecareError(f"world target {self.target!r} is not a texture of the renderer: {TEXTURES}")
        if self.care not in SHAPES:
            raise RecareError(f"world CARE concept {self.care!r} is not a shape of the renderer: {SHAPES}")
        for name in ("target_prompts", "care_prompts", "stereo_anchors"):
            if not getattr(self, name):
                raise RecareError(f"world concepts: {name} is empty")
        if self.care not in self.care_labels:
            raise RecareError(f"world concepts: the CARE concept {self.care!r} is not among care_labels "
                              f"{list(self.care_labels)}")
        if not self.initializer or " " in self.initializer:
            raise RecareError(f"world concepts: initializer must be one word, got {self.initializer!r}")


def world_concepts(spec: WorldSpec) -> WorldConcepts:
    """The demo's inputs derived from a world spec (module docstring)."""
    rates = {name: float(getattr(spec, name)) for name in RATE_FIELDS}
    rates["target_name_rate"] = float(spec.texture_name_rate(spec.target))
    return WorldConcepts(target=spec.target, care=spec.care, target_prompts=tuple(target_prompts(spec)),
                         care_prompts=tuple(care_prompts(spec)), initializer=spec.care,
                         stereo_anchors=tuple(stereo_anchors(spec)), care_labels=SHAPES, rates=rates)


def with_target_name_rate(spec: WorldSpec, rate: float) -> WorldSpec:
    """The spec with P(a caption names the texture T) set to `rate` (the other textures keep theirs)."""
    if not 0.0 <= rate <= 1.0:
        raise RecareError(f"target_name_rate must be a probability, got {rate}")
    return replace(spec, p_name_texture=tuple((t, rate if t == spec.target else p) for t, p in spec.p_name_texture))


@dataclass(frozen=True)
class World:
    """A built world folder: its models, its spec and its concepts."""

    folder: Path  # the folder (clip/, sd/, detector/, build_report.json)
    spec: WorldSpec  # the world's renderer and caption settings (build_report.json, config.spec)
    concepts: WorldConcepts  # the demo's inputs (build_report.json, "world")
    build_seed: int = 0  # the build's base seed (build_report.json, config.seed)
    detector_accuracy: dict[str, float] | None = None  # the classifier's accuracy per family on clean renders

    def clip_path(self) -> Path:
        """The world's CLIP, for recare.models.load_image_text_model."""
        return self.folder / "clip"

    def sd_path(self) -> Path:
        """The world's text-to-image model, for recare.models.load_sd."""
        return self.folder / "sd"

    def detector_path(self) -> Path:
        """The world's ground-truth classifier, for recare.world.detectors.load_detector."""
        return self.folder / "detector"

    def load_detector(self) -> Any:
        """The world's ground-truth classifier (recare.world.detectors.WorldClassifier)."""
        from recare.world.detectors import load_detector

        return load_detector(self.detector_path())

    def describe(self) -> dict[str, Any]:
        """What names the world in a demo's files (no path of this machine): T, C, the build seed and
        whether it is the committed world."""
        return {"target": self.concepts.target, "care": self.concepts.care, "build_seed": self.build_seed,
                "committed": self.is_committed()}

    def is_committed(self) -> bool:
        """Whether this is the world that ships with recare."""
        return self.folder.resolve() == committed_folder().resolve()


def committed_folder() -> Path:
    """The folder of the world that ships with recare."""
    from recare import world

    return world.weights_dir()


def load_world(folder: str | os.PathLike) -> World:
    """Read a built world folder; RecareError names what is missing or inconsistent."""
    from recare.io import read_json
    from recare.world.build import REPORT_NAME

    folder = Path(folder)
    if not folder.is_dir():
        raise RecareError(f"world folder {folder} does not exist (build one with `recare synthetic build`)")
    missing = [f"{name}/" for name in MODEL_FOLDERS if not (folder / name).is_dir()]
    missing += [] if (folder / REPORT_NAME).is_file() else [REPORT_NAME]
    if missing:
        raise RecareError(f"{folder} is not a world folder: it lacks {', '.join(missing)} "
                          "(a world folder is what `recare synthetic build --out` writes)")
    report = read_json(folder / REPORT_NAME, "world build report")
    where = f"{folder / REPORT_NAME}"
    if not isinstance(report, dict) or WORLD_SECTION not in report or "spec" not in report.get("config", {}):
        raise RecareError(f"{where} lacks the fields the demo needs ('{WORLD_SECTION}' and 'config.spec'); "
                          "rebuild the world with this version of `recare synthetic build`")
    spec = from_dict(WorldSpec, report["config"]["spec"], f"{where}: config.spec")
    concepts = from_dict(WorldConcepts, report[WORLD_SECTION], f"{where}: {WORLD_SECTION}",
                         required=[f for f in WorldConcepts.__dataclass_fields__])
    if (concepts.target, concepts.care) != (spec.target, spec.care):
        raise RecareError(f"{where}: '{WORLD_SECTION}' names T = {concepts.target!r}, C = {concepts.care!r} but the "
                          f"spec it was built with names T = {spec.target!r}, C = {spec.care!r}")
    accuracy = report.get("detector", {}).get("accuracy_clean")
    return World(folder, spec, concepts, int(report["config"].get("seed", 0)), accuracy)


def committed_world() -> World:
    """The world that ships with recare (T = "dotted", C = "circle"): the demo's default."""
    return load_world(committed_folder())
