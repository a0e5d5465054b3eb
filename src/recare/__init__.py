"""recare: concept erasure for Stable Diffusion that keeps co-occurring retained concepts.

Implements ReCARE, "Co-occurring Associated REtained concepts in Diffusion Unlearning"
(ICLR 2026), with ESD and STEREO baselines from the same code. The subpackages follow the
method's flow: models -> generate -> careset -> train -> attacks / metrics -> eval -> report,
with `pipeline` running generate -> careset -> train and `cli` the `recare` command.

The public API below is importable from `recare` directly; each name is loaded on first use,
so `import recare` (and `recare --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from recare.errors import RecareError

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "SDComponents": "recare.models.loading", "ImageTextModel": "recare.models.loading",
    "load_sd": "recare.models.loading", "load_image_text_model": "recare.models.loading",
    # generate
    "GenerationConfig": "recare.generate.images", "generate_images": "recare.generate.images",
    "PromptJob": "recare.generate.prompts", "jobs_for_prompt": "recare.generate.prompts",
    "jobs_for_prompts": "recare.generate.prompts", "read_prompt_file": "recare.generate.prompts",
    # careset
    "CareSet": "recare.careset.artifact", "CareSetConfig": "recare.careset.config",
    "build_careset": "recare.careset.build", "build_careset_from_folder": "recare.careset.build",
    "format_report": "recare.careset.report",
    # train
    "TrainConfig": "recare.train.config", "InversionConfig": "recare.train.inversion",
    "ErasureMethod": "recare.train.methods", "METHODS": "recare.train.methods", "get_method": "recare.train.methods",
    "train": "recare.train.run", "TrainResult": "recare.train.run",
    # attacks and metrics
    "CceConfig": "recare.attacks.cce", "UnlearnDiffAtkConfig": "recare.attacks.unlearndiff",
    "CareScoreConfig": "recare.metrics.care_score", "evaluate_care_score": "recare.metrics.care_score",
    "clip_score": "recare.metrics.clip_score", "compute_fid": "recare.metrics.fid",
    "compute_ratio": "recare.metrics.ratio", "make_detector": "recare.metrics.detectors.registry",
    # evaluation, reports, the pipeline
    "EvalConfig": "recare.eval.config", "MethodSpec": "recare.eval.config",
    "evaluate_all": "recare.eval.runner", "evaluate_robustness_of": "recare.eval.runner",
    "write_reports": "recare.report.writer",
    "RunSpec": "recare.pipeline", "PipelineFolders": "recare.pipeline", "run_pipeline": "recare.pipeline",
}

__all__ = ["RecareError", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import the public names lazily (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'recare' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static type checkers and IDEs see the real imports
    from recare.attacks.cce import CceConfig
    from recare.attacks.unlearndiff import UnlearnDiffAtkConfig
    from recare.careset.artifact import CareSet
    from recare.careset.build import build_careset, build_careset_from_folder
    from recare.careset.config import CareSetConfig
    from recare.careset.report import format_report
    from recare.eval.config import EvalConfig, MethodSpec
    from recare.eval.runner import evaluate_all, evaluate_robustness_of
    from recare.generate.images import GenerationConfig, generate_images
    from recare.generate.prompts import PromptJob, jobs_for_prompt, jobs_for_prompts, read_prompt_file
    from recare.metrics.care_score import CareScoreConfig, evaluate_care_score
    from recare.metrics.clip_score import clip_score
    from recare.metrics.detectors.registry import make_detector
    from recare.metrics.fid import compute_fid
    from recare.metrics.ratio import compute_ratio
    from recare.models.loading import ImageTextModel, SDComponents, load_image_text_model, load_sd
    from recare.pipeline import PipelineFolders, RunSpec, run_pipeline
    from recare.report.writer import write_reports
    from recare.train.config import TrainConfig
    from recare.train.inversion import InversionConfig
    from recare.train.methods import METHODS, ErasureMethod, get_method
    from recare.train.run import TrainResult, train
