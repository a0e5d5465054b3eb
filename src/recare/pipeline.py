"""The erasure pipeline as library code: target images -> CARE-set -> training (method §1, 2, 3).

Used by `recare run` (one TOML file, `RunSpec.from_tables`) and by the synthetic-world demo
(recare.world.demo), so the sequence exists once. Each stage resumes from what an interrupted
run left behind: generation skips finished images, a CARE-set file is reused, training resumes
or finds its run complete. What a method needs (target images, a CARE-set) comes from the method
table (recare.train.methods): stages a run's methods do not need are skipped.

Models are passed in as loaders (`load_sd(purpose)`, purpose "generate" or "train"; `load_clip()`),
called only when a stage needs them, so a resumed run does not load what it will not use.
When several methods are trained and one's stage 1 equals another's finished stage 1 (ReCARE after
STEREO with the same stage-1 settings), the later one starts at stage 2 from it (identical result).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from recare.careset.artifact import CareSet
from recare.careset.build import build_careset
from recare.careset.config import CareSetConfig
from recare.config import from_dict
from recare.errors import RecareError
from recare.generate.images import GenerationConfig, generate_images
from recare.generate.prompts import PromptJob, jobs_for_prompt
from recare.io import list_images
from recare.models.loading import DEFAULT_CLIP_MODEL, DEFAULT_SD_MODEL, ImageTextModel, SDComponents
from recare.train.config import TrainConfig, config_from_tables
from recare.train.run import TrainResult, train
from recare.train.state import STAGE2_FIELDS

logger = logging.getLogger(__name__)

SDLoader = Callable[[str], SDComponents]
"""load_sd(purpose) with purpose "generate" (generation dtype) or "train" (float32 master weights)."""
ClipLoader = Callable[[], ImageTextModel]
StageTimer = Callable[[str], ContextManager[Any]]
RUN_TABLES = ("concept", "model", "generate", "careset", "train", "run")


@dataclass(frozen=True)
class PipelineFolders:
    """Where the stages write: target images, the CARE-set file, and one run folder per method."""

    images: Path
    careset: Path
    runs: Path

    @classmethod
    def under(cls, root: str | os.PathLike) -> PipelineFolders:
        """The layout of `recare run`: root/images, root/careset.json, root/<method>."""
        root = Path(root)
        return cls(root / "images", root / "careset.json", root)

    def run(self, method: str) -> Path:
        """The output folder of `method`'s training run."""
        return self.runs / method


def _no_timer(name: str) -> ContextManager[Any]:
    return contextlib.nullcontext()


def target_images_stage(load_sd: SDLoader, jobs: Sequence[PromptJob], folder: Path, generation: GenerationConfig,
                        device: str | torch.device, info: dict[str, Any] | None = None) -> list[Path]:
    """Target images of the original model (method §1); finished images are kept."""
    components = load_sd("generate")
    paths = generate_images(components, jobs, folder, generation, device=device, model_info=info)
    del components
    return paths


def careset_stage(load_clip: ClipLoader, images: Sequence[Path], reference_word: str, config: CareSetConfig,
                  path: Path, *, cache_dir: str | os.PathLike | None = None, reuse: bool = True,
                  progress: bool = True) -> CareSet:
    """The CARE-set of the target images (method §2), saved to `path`; an existing file is reused if `reuse`."""
    if reuse and path.is_file():
        logger.info("reusing the CARE-set %s", path)
        return CareSet.load(path, reference_word=reference_word)
    careset = build_careset(load_clip(), images, reference_word, config, cache_dir=cache_dir, progress=progress)
    careset.save(path)
    return careset


def _stage1_settings(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in STAGE2_FIELDS}


def train_stage(load_sd: SDLoader, configs: Sequence[TrainConfig], folders: PipelineFolders, *,
                careset: CareSet | None, images: Sequence[Path], device: str | torch.device,
                share_stage1: bool = True, timer: StageTimer = _no_timer,
                **train_kwargs: Any) -> dict[str, TrainResult]:
    """Train each config's method into folders.run(method), in order (method §3, 4b).

    A method gets the CARE-set and images only if the method table says it needs them. With
    `share_stage1`, a method with a stage 1 adopts the stage 1 of an earlier finished run in this
    call whose stage-1 settings are the same. `train_kwargs` go to recare.train.train.
    """
    results: dict[str, TrainResult] = {}
    finished: list[tuple[TrainConfig, Path]] = []
    for config in configs:
        method = config.method_spec
        stage1_from = None
        if share_stage1 and method.has_stage1:
            stage1_from = next((folder for done, folder in finished if _stage1_settings(done) ==
                                _stage1_settings(config)), None)
        with timer(f"train {config.method}"):
            result = train(load_sd("train"), config, folders.run(config.method),
                           careset=careset if method.needs_careset else None,
                           images=images if method.needs_images else (), device=device, stage1_from=stage1_from,
                           **train_kwargs)
        results[config.method] = result
        if result.interrupted:  # a signal: stop here, the run is saved and resumes
            break
        if result.complete and method.has_stage1:
            finished.append((config, folders.run(config.method)))
    return results


@dataclass(frozen=True)
class PipelineResult:
    """What `run_pipeline` produced."""

    images: list[Path]
    careset: CareSet | None
    runs: dict[str, TrainResult] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """Everything `recare run` needs, read from one TOML file (recare/configs/*.toml)."""

    train: tuple[TrainConfig, ...]
    """One TrainConfig per method, in training order."""
    reference_word: str
    """[concept] word: the target word the CARE-set is built for."""
    model: str = DEFAULT_SD_MODEL
    revision: str | None = None
    target_jobs: tuple[PromptJob, ...] = ()
    """Prompts and seeds of the target images ([concept] prompt x [generate] num_images from seed)."""
    generation: GenerationConfig = GenerationConfig()
    careset: CareSetConfig = CareSetConfig()
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_revision: str | None = None
    careset_cache_dir: str | None = None
    out: str | None = None
    """[run] out: the run folder when no --out is given."""

    @property
    def needs_images(self) -> bool:
        return any(c.method_spec.needs_images for c in self.train)

    @property
    def needs_careset(self) -> bool:
        return any(c.method_spec.needs_careset for c in self.train)

    @classmethod
    def from_tables(cls, toml: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                    methods: Sequence[str] | None = None, where: str = "config") -> RunSpec:
        """The spec of parsed TOML tables; `overrides` (TrainConfig fields) win over [train]."""
        unknown = sorted(set(toml) - set(RUN_TABLES))
        if unknown:
            raise RecareError(f"{where}: unknown tables {unknown}")
        concept = _table(toml, "concept")
        if "word" not in concept:
            raise RecareError(f"{where}: [concept] word is missing")
        overrides = dict(overrides or {})
        names = list(methods or [overrides.pop("method", None) or _table(toml, "train").get("method", "recare")])
        configs = tuple(config_from_tables(toml, {**overrides, "method": m}) for m in names)
        model = _table(toml, "model")
        careset = _table(toml, "careset")
        clip_model = careset.pop("clip_model", DEFAULT_CLIP_MODEL)
        clip_revision = careset.pop("clip_revision", None)
        cache_dir = careset.pop("cache_dir", None)
        careset.setdefault("concept_type", concept.get("type", "object"))
        jobs, generation = _generation_of(toml, concept, any(c.method_spec.needs_images for c in configs))
        return cls(train=configs, reference_word=concept["word"], model=model.get("source", DEFAULT_SD_MODEL),
                   revision=model.get("revision"),
                   target_jobs=jobs, generation=generation, careset=CareSetConfig.from_dict(careset),
                   clip_model=clip_model, clip_revision=clip_revision, careset_cache_dir=cache_dir,
                   out=_table(toml, "run").get("out"))


def _table(toml: Mapping[str, Any], name: str) -> dict[str, Any]:
    table = toml.get(name, {})
    if not isinstance(table, Mapping):
        raise RecareError(f"[{name}] must be a table")
    return dict(table)


def _generation_of(toml: Mapping[str, Any], concept: Mapping[str, Any],
                   needed: bool) -> tuple[tuple[PromptJob, ...], GenerationConfig]:
    settings = _table(toml, "generate")
    num_images, seed = settings.pop("num_images", 500), settings.pop("seed", 42)
    generation = from_dict(GenerationConfig, settings, "[generate]")
    if not needed:
        return (), generation
    prompt = concept.get("prompt")
    if not prompt:
        raise RecareError("[concept] prompt is needed to generate the target images")
    return tuple(jobs_for_prompt(prompt, num_images, seed)), generation


def run_pipeline(spec: RunSpec, folders: PipelineFolders, load_sd: SDLoader, load_clip: ClipLoader,
                 device: str | torch.device, *, progress: bool = True, timer: StageTimer = _no_timer,
                 **train_kwargs: Any) -> PipelineResult:
    """Target images (if a method needs them) -> CARE-set (if one needs it) -> training of each method."""
    images: list[Path] = []
    careset = None
    if spec.needs_images:
        with timer("target images"):
            images = target_images_stage(load_sd, spec.target_jobs, folders.images, spec.generation, device)
    if spec.needs_careset:
        with timer("CARE-set"):
            careset = careset_stage(load_clip, list_images(folders.images), spec.reference_word, spec.careset,
                                    folders.careset,
                                    cache_dir=spec.careset_cache_dir, progress=progress)
    runs = train_stage(load_sd, spec.train, folders, careset=careset, images=images, device=device,
                       timer=timer, progress=progress, **train_kwargs)
    return PipelineResult(images, careset, runs)
