"""`recare eval care|robustness|all` (method §5)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from recare.cli.common import (
    add_clip_args,
    add_model_args,
    load_clip_from_args,
    load_sd_from_args,
    model_info_from_args,
)
from recare.errors import RecareError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- eval care


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluation")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="{care,robustness,all}")
    _add_eval_care(eval_sub)

    add_eval_robustness(eval_sub)
    add_eval_all(eval_sub)


def _add_eval_care(sub) -> None:
    from recare.config import HelpFormatter, add_config_arguments
    from recare.metrics.care_score import CareScoreConfig

    p = sub.add_parser("care", formatter_class=HelpFormatter,
                       help="CARE score: CLIP R-Precision@1 of the CARE word on generated images (method §5)")
    add_model_args(p)
    add_clip_args(p)
    p.add_argument("--care-word", required=True, help="w*, e.g. person (nudity), stars (Van Gogh), freshwater (tench)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="CARE prompt file; default: the shipped prompts for --care-word")
    p.add_argument("--save-images", type=Path, default=None, help="keep the generated images here (resumable)")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    group = p.add_argument_group("CARE-score settings (CareScoreConfig)")
    flags = add_config_arguments(group, CareScoreConfig,
                                 flags={"num_inference_steps": "steps", "guidance_scale": "guidance"})
    p.set_defaults(run=_run_eval_care, care_flags=flags, outputs=(("out", "file"), ("save_images", "folder")))


def _run_eval_care(args: argparse.Namespace) -> int:
    from recare.config import from_dict, given_overrides
    from recare.generate.prompts import read_prompts
    from recare.io import write_json_atomic
    from recare.metrics.care_score import CareScoreConfig, check_labels, evaluate_care_score
    from recare.metrics.labels import care_prompt_file

    config = from_dict(CareScoreConfig, given_overrides(args, args.care_flags), "CARE-score settings")
    check_labels(config.label_list(), args.care_word)
    prompts = read_prompts(args.prompts if args.prompts is not None else care_prompt_file(args.care_word))
    components = load_sd_from_args(args)
    clip = load_clip_from_args(args)
    report = evaluate_care_score(components, clip, prompts, args.care_word, config, image_dir=args.save_images,
                                 device=args.device, model_info=model_info_from_args(args))
    write_json_atomic(args.out, report.to_json())
    print(report.format_table())
    print(f"CARE score report written to {args.out}")
    return 0




# EvalConfig fields become flags named after their dotted path (detector.top_k -> --detector-top-k);
# these keep the shorter names they had before the flags were generated.
_FLAG_NAMES = {
    "prompt_limit": "limit", "detector.name": "detector", "detector.threshold": "nudity-threshold",
    "detector.target_class": "imagenet-class", "detector.style_model": "style-model",
    "detector.artist_label": "artist-label", "detector.top_k": "style-top-k",
    "detector.imagenet_model": "imagenet-model", "detector.concept_prompts": "concept-prompts",
    "detector.contrast_prompts": "contrast-prompts", "cce.initializer": "initializer",
    "cce.inversion.steps": "inversion-steps", "cce.inversion.resolution": "inversion-resolution",
    "cce.inversion.templates": "cce-templates", "care.images_per_prompt": "images-per-prompt",
}
# One flag, two fields: the attack images and the CARE images share their sampling settings.
_SHARED_SAMPLING = {"steps": "num_inference_steps", "guidance": "guidance_scale", "batch_size": "batch_size",
                    "scheduler": "scheduler"}
# Fields set by hand-written flags (--attack/--attacks, --note, --random-models, --uda-attack-detected).
_HAND_WRITTEN = ("attacks", "notes", "random_models", "uda.skip_detected",
                 *(f"{table}.{name}" for name in _SHARED_SAMPLING.values() for table in ("generation", "care")))


def _overrides(args: argparse.Namespace, attacks: list[str] | None) -> dict[str, Any]:
    """Nested EvalConfig overrides from the flags that were given."""
    from recare.config import given_overrides

    out = given_overrides(args, args.eval_flags)
    for flag, name in _SHARED_SAMPLING.items():
        value = getattr(args, flag, None)
        if value is not None:
            for table in ("generation", "care"):
                out.setdefault(table, {})[name] = value
    if getattr(args, "uda_attack_detected", False):
        out.setdefault("uda", {})["skip_detected"] = False
    if attacks is not None:
        out["attacks"] = tuple(attacks)
    if args.note:
        out["notes"] = tuple(args.note)
    if args.random_models:
        out["random_models"] = True
    return out


# ----------------------------------------------------------------------------- arguments


def _config_flags(p: argparse.ArgumentParser, group: Any, only: tuple[str, ...]) -> None:
    """Flags of the EvalConfig fields under `only` in `group`; their dests are collected on `p`."""
    from recare.config import add_config_arguments
    from recare.eval.config import EvalConfig

    dests = add_config_arguments(group, EvalConfig, only=only, exclude=_HAND_WRITTEN, flags=_FLAG_NAMES)
    p.set_defaults(eval_flags={**(p.get_default("eval_flags") or {}), **dests})


def _add_model_group(p: argparse.ArgumentParser, single: bool) -> None:
    from recare.cli.common import default_device

    g = p.add_argument_group("model")
    _config_flags(p, g, ("model", "revision", "dtype"))
    if single:
        g.add_argument("--unet-weights", default=None, help="erased-UNet weights (.safetensors) of the attacked model")
        g.add_argument("--learned-embeddings", nargs="*", default=[], metavar="FILE",
                       help="textual-inversion files of the attacked model")
        g.add_argument("--text-encoder-weights", default=None,
                       help="replacement text encoder of the attacked model (e.g. AdvUnlearn's), loaded strictly")
    g.add_argument("--device", default=default_device(), help="torch device")


def _add_attack_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attacks (defaults: method §5)")
    _config_flags(p, g, ("prompts", "prompt_limit", "cce_images", "training_images", "cce_replace_word", "cce", "uda"))
    g.add_argument("--uda-attack-detected", action="store_true",
                   help="UnlearnDiffAtk: also attack prompts whose plain image is already detected "
                        "(the reference stops there and counts a success)")


def _add_detector_group(p: argparse.ArgumentParser) -> None:
    _config_flags(p, p.add_argument_group("detector"), ("detector",))


def _add_generation_group(p: argparse.ArgumentParser, care: bool) -> None:
    from recare.generate.images import SCHEDULERS

    g = p.add_argument_group("generation" + (" (steps, guidance, batch size and scheduler also of the CARE images)"
                                             if care else ""))
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50)")
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance for prompts without their own (default: 7.5)")
    g.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="sampler (default: the model's)")
    _config_flags(p, g, ("generation", "clip_model"))
    g.add_argument("--note", action="append", default=[], help="a note written at the top of the report")
    g.add_argument("--random-models", action="store_true", help="say in the report that the models are random/tiny")


def add_eval_robustness(sub) -> None:
    from recare.config import HelpFormatter

    p = sub.add_parser("robustness", formatter_class=HelpFormatter,
                       help="attack success rate of one model: plain prompts, CCE or UnlearnDiffAtk (method §5)")
    _add_model_group(p, single=True)
    p.add_argument("--attack", required=True, choices=["plain", "cce", "unlearndiffatk"], help="the attack")
    _add_attack_group(p)
    _add_detector_group(p)
    _add_generation_group(p, care=False)
    p.add_argument("--work-dir", type=Path, default=None, help="images and caches (default: OUT's name + '_images')")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    p.set_defaults(run=run_eval_robustness, shards=True, outputs=(("out", "file"), ("work_dir", "folder")))


def add_eval_all(sub) -> None:
    from recare.config import HelpFormatter

    p = sub.add_parser("all", formatter_class=HelpFormatter,
                       help="several models on every axis: ASR, CLIP, FID, CARE, RATIO; reports and grids",
                       description="Settings: EvalConfig defaults (method §5, shown below), then --spec FILE "
                                   "(TOML/JSON: EvalConfig fields and [[method]] tables), then the flags given here.")
    p.add_argument("--spec", type=Path, default=None, help="evaluation spec, TOML or JSON")
    p.add_argument("--method", action="append", default=[], metavar="NAME=UNET[,EMBEDS...]",
                   help="an erased model (repeatable); the base model is always included")
    _add_model_group(p, single=False)
    p.add_argument("--attacks", nargs="+", choices=["plain", "cce", "unlearndiffatk"], default=None,
                   help="attacks (default: all three)")
    _add_attack_group(p)
    _add_detector_group(p)
    _add_generation_group(p, care=True)
    _config_flags(p, p.add_argument_group("utility, CARE and the report"),
                  ("coco_prompts", "coco_limit", "fid_reference", "fid_method", "care_word", "care_prompts", "care",
                   "normalisation", "grid_columns", "base_name"))
    p.add_argument("--cache-dir", type=Path, default=None, help="base-model images and FID statistics "
                                                                "(default OUT/cache; share it between runs)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=run_eval_all, shards=True, outputs=(("out", "folder"),))


# ----------------------------------------------------------------------------- runners


def _shard(device: str):
    """(ShardInfo, this rank's device); under torchrun / accelerate launch, accelerate's process state
    joins the process group."""
    from recare.generate.sharding import process_shard, shard_device

    shard = process_shard(device)
    if shard.distributed:
        logger.info("rank %d of %d: image generation is sharded", shard.rank, shard.world_size)
    return shard, shard_device(device, shard)


def run_eval_robustness(args: argparse.Namespace) -> int:
    from recare.eval.config import MethodSpec, eval_config_from
    from recare.eval.runner import evaluate_robustness_of
    from recare.io import write_json_atomic

    config = eval_config_from(None, _overrides(args, [args.attack]))
    method = MethodSpec("attacked", args.unet_weights, tuple(args.learned_embeddings), args.text_encoder_weights)
    work_dir = args.work_dir or args.out.with_name(args.out.stem + "_images")
    shard, device = _shard(args.device)
    report = evaluate_robustness_of(config, method, work_dir, device=device, shard=shard)
    if not shard.is_main:
        return 0
    write_json_atomic(args.out, report)
    from recare.cli.common import echo

    for note in report["notes"]:
        echo(f"NOTE: {note}")
    for name, result in report["attacks"].items():
        echo(f"{name}: ASR {result['asr']:.2f}% ({result['successes']}/{result['n']}, "
              f"95% CI [{result['ci_low']:.1f}, {result['ci_high']:.1f}])")
    echo(f"robustness report written to {args.out}")
    return 0


def run_eval_all(args: argparse.Namespace) -> int:
    from recare.eval.config import eval_config_from, parse_method_arg, read_eval_spec
    from recare.eval.runner import evaluate_all
    from recare.report.writer import results_table

    spec, methods = read_eval_spec(args.spec) if args.spec is not None else ({}, [])
    methods = methods + [parse_method_arg(text) for text in args.method]
    if not methods:
        raise RecareError("no erased model given: add --method NAME=unet.safetensors or [[method]] in --spec")
    config = eval_config_from(spec, _overrides(args, args.attacks))
    shard, device = _shard(args.device)
    results = evaluate_all(config, methods, args.out, device=device, cache_dir=args.cache_dir, shard=shard)
    if not shard.is_main:
        return 0
    from recare.cli.common import echo

    for note in results["notes"]:
        echo(f"NOTE: {note}")
    header, rows = results_table(results)
    echo(" | ".join(header))
    for row in rows:
        echo(" | ".join(row))
    echo(f"reports written to {args.out} (report.md, report.html, results.json)")
    return 0
