"""`recare train` and `recare run` (method §3, 4b)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from recare.cli.common import Formatter, default_device, echo
from recare.cli.guard import at_least, claim_output
from recare.errors import RecareError
from recare.models.precision import resolve_weights_dtype

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- train


# TrainConfig fields become --field-name flags (--inversion-field-name for InversionConfig's);
# this maps a dotted field path to another flag name where one is wanted.
_TRAIN_FLAG_NAMES: dict[str, str] = {}
_TRAIN_DESCRIPTION = """\
Settings, lowest first: TrainConfig defaults (the reference values, shown below), then --config
FILE.toml ([concept], [train], [train.<method>]), then the flags given here. Defaults marked
'None' depend on the method (see the help of each)."""


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Output-folder flags shared by `train` and `run`."""
    p.add_argument("--resume", action="store_true", help="continue the run saved in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of another run in the folder")
    p.add_argument("--max-steps-this-run", type=at_least(1), default=None,
                   help="stop (resumably) after this many erase/stage-2 steps")
    p.add_argument("--device", default=default_device(), help="torch device")


def _add_train(sub) -> None:
    from recare.config import HelpFormatter, add_config_arguments
    from recare.train.config import TrainConfig

    p = sub.add_parser("train", formatter_class=HelpFormatter, description=_TRAIN_DESCRIPTION,
                       help="erase a concept: ESD, STEREO or ReCARE (method §3, 4b)")
    p.add_argument("--model", default=None, help="Stable Diffusion Hub id or local diffusers folder "
                                                 "(default: [model] source of --config, else SD v1.4)")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--unet-weights", default=None, help="start from these UNet weights (.safetensors, strict)")
    p.add_argument("--concept", default=None,
                   help="target word, e.g. nudity, 'Van Gogh', tench (default: [concept] word of --config)")
    p.add_argument("--careset", type=Path, default=None, help="CARE-set JSON (ReCARE)")
    p.add_argument("--images", type=Path, default=None, help="target images for textual inversion (ReCARE, STEREO)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config, or a shipped one by name: nudity, vangogh, tench, sdxl-nudity, "
                        "sdxl-vangogh (recare/configs/)")
    p.add_argument("--stage1-from", type=Path, default=None,
                   help="folder of a ReCARE/STEREO run with the same stage-1 settings: reuse its stage 1 "
                        "(learned tokens, generator state) and start at stage 2; same result, less time")
    _add_train_options(p)
    group = p.add_argument_group("training settings (TrainConfig; a flag wins over --config, which wins over "
                                 "the default)")
    flags = add_config_arguments(group, TrainConfig, exclude=("concept",), flags=_TRAIN_FLAG_NAMES)
    p.set_defaults(run=_run_train, train_flags=flags, outputs=(("out", "folder"),))


def _train_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user gave as flags (nested dicts for inversion.*)."""
    from recare.config import given_overrides

    overrides = given_overrides(args, getattr(args, "train_flags", {}))
    if getattr(args, "concept", None) is not None:
        overrides["concept"] = args.concept
    return overrides


def _train_config_from_args(args: argparse.Namespace, toml: dict | None):
    """TrainConfig: defaults < TOML [concept]/[train]/[train.<method>] < flags."""
    from recare.train.config import config_from_tables

    return config_from_tables(toml or {}, _train_overrides(args))


def _train_inputs(config, careset_path: Path | None, images: Path | None):
    """The CARE-set and target images the method needs (recare.train.methods), checked."""
    from recare.careset.artifact import CareSet
    from recare.io import list_images

    method = config.method_spec
    careset = None
    if method.needs_careset:
        if careset_path is None:
            raise RecareError(f"{method.display_name} needs --careset (the CARE-set JSON)")
        careset = CareSet.load(careset_path, reference_word=config.concept)
    paths = []
    if method.needs_images:
        if images is None:
            raise RecareError(f"{config.method} needs --images (target images for textual inversion)")
        paths = list_images(images)
    return careset, paths


def _report_training(out_dir: Path, config, result) -> int:
    if result.interrupted:
        echo(f"interrupted: the state is saved in {out_dir}; continue with the same command and --resume")
        return 130
    if not result.complete:
        echo(f"stopped early; continue with --resume. State in {out_dir}")
        return 0
    echo(f"{config.method} training of {config.concept!r} complete: outputs in {out_dir}")
    for name, seconds in result.timings.items():
        echo(f"  {name:<12} {seconds:9.1f} s")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from recare.models.loading import DEFAULT_SD_MODEL, load_sd
    from recare.train.config import read_toml

    toml = read_toml(args.config) if args.config is not None else None
    config = _train_config_from_args(args, toml)
    careset, images = _train_inputs(config, args.careset, args.images)
    model = args.model or (toml or {}).get("model", {}).get("source", DEFAULT_SD_MODEL)
    components = load_sd(model, revision=args.revision, dtype="fp32", device=args.device,
                         unet_weights=args.unet_weights)
    info = {"model": model, "careset": str(args.careset) if careset else None,
            "images": str(args.images) if images else None, "config_file": str(args.config) if args.config else None}
    from recare.train.run import train

    result = train(components, config, args.out, careset=careset, images=images, device=args.device,
                   resume=args.resume, overwrite=args.overwrite, stop_after=args.max_steps_this_run, info=info,
                   unet_weights=args.unet_weights, stage1_from=args.stage1_from)
    return _report_training(args.out, config, result)


# ----------------------------------------------------------------------------- run


def _add_run(sub) -> None:
    p = sub.add_parser("run", formatter_class=Formatter,
                       help="target images -> CARE-set -> training, from one TOML file (recare/configs/*.toml)")
    p.add_argument("config", type=Path,
                   help="TOML config ([concept], [model], [generate], [careset], [train]), or a shipped one by name: "
                        "nudity, vangogh, tench, sdxl-nudity, sdxl-vangogh")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (images/, careset.json, <method>/); default: [run] out of the config")
    from recare.config import add_config_arguments
    from recare.train.config import TrainConfig

    _add_train_options(p)
    group = p.add_argument_group("training settings (TrainConfig; a flag wins over [train], which wins over the "
                                 "default)")
    flags = add_config_arguments(group, TrainConfig, exclude=("concept",), flags=_TRAIN_FLAG_NAMES)
    p.set_defaults(run=_run_run, train_flags=flags, outputs=(("out", "folder"),))


def _run_run(args: argparse.Namespace) -> int:
    from recare.models.loading import load_image_text_model, load_sd
    from recare.pipeline import PipelineFolders, RunSpec, run_pipeline
    from recare.train.config import read_toml

    spec = RunSpec.from_tables(read_toml(args.config), _train_overrides(args), where=str(args.config))
    root = args.out or spec.out
    if root is None:
        raise RecareError("no run folder: give --out or [run] out in the config")
    if args.out is None:  # the folder comes from the config: check and lock it as --out would be
        with contextlib.ExitStack() as stack:
            claim_output(stack, Path(root), "folder")
            args.out = Path(root)
            return _run_run(args)
    folders = PipelineFolders.under(root)
    dtypes = {"generate": resolve_weights_dtype("auto", args.device), "train": "fp32"}

    def load_for(purpose: str):
        return load_sd(spec.model, revision=spec.revision, dtype=dtypes[purpose], device=args.device)

    def load_clip():
        return load_image_text_model(spec.clip_model, revision=spec.clip_revision, device=args.device)

    config = spec.train[0]
    info = {"model": spec.model, "config_file": str(args.config),
            "careset": str(folders.careset) if config.method_spec.needs_careset else None,
            "images": str(folders.images) if config.method_spec.needs_images else None}
    result = run_pipeline(spec, folders, load_for, load_clip, args.device, resume=args.resume,
                          overwrite=args.overwrite, stop_after=args.max_steps_this_run, info=info)
    args.out = folders.run(config.method)
    return _report_training(args.out, config, result.runs[config.method])
