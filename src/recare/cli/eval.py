"""`recare eval care|robustness|all` (SPEC 5)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from recare.cli.common import (
    Formatter,
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
    from recare.metrics.care_score import CareScoreConfig

    d = CareScoreConfig()
    p = sub.add_parser("care", formatter_class=Formatter,
                       help="CARE score: CLIP R-Precision@1 of the CARE word on generated images (SPEC 5)")
    add_model_args(p)
    add_clip_args(p)
    p.add_argument("--care-word", required=True, help="w*, e.g. person (nudity), stars (Van Gogh), freshwater (tench)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="CARE prompt file; default: the shipped prompts for --care-word")
    p.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt, help="images per prompt (seeds SEED+i)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of every prompt")
    p.add_argument("--steps", type=int, default=d.num_inference_steps, help="denoising steps")
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="classifier-free guidance")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per pipeline call")
    p.add_argument("--label-template", default=d.label_template,
                   help="CLIP text of a label: '{}' raw (reference) or e.g. 'a photo of a {}'")
    p.add_argument("--extra-labels", nargs="*", default=[], help="labels appended to the 82 defaults")
    p.add_argument("--save-images", type=Path, default=None, help="keep the generated images here (resumable)")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    p.set_defaults(run=_run_eval_care)


def _run_eval_care(args: argparse.Namespace) -> int:
    from recare.generate.prompts import read_prompts
    from recare.io import write_json_atomic
    from recare.metrics.care_score import CareScoreConfig, check_labels, evaluate_care_score
    from recare.metrics.labels import care_prompt_file

    config = CareScoreConfig(images_per_prompt=args.images_per_prompt, seed=args.seed,
                             num_inference_steps=args.steps, guidance_scale=args.guidance,
                             batch_size=args.batch_size, label_template=args.label_template,
                             extra_labels=tuple(args.extra_labels))
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




# flag dest -> EvalConfig field paths it sets ("a.b" = nested field b of a)
_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("model",), "revision": ("revision",), "dtype": ("dtype",), "prompts": ("prompts",),
    "limit": ("prompt_limit",), "detector": ("detector.name",), "nudity_threshold": ("detector.threshold",),
    "imagenet_model": ("detector.imagenet_model",), "imagenet_class": ("detector.target_class",),
    "style_model": ("detector.style_model",), "artist_label": ("detector.artist_label",),
    "style_top_k": ("detector.top_k",), "detector_clip_model": ("detector.clip_model",),
    "concept_prompts": ("detector.concept_prompts",), "contrast_prompts": ("detector.contrast_prompts",),
    "cce_images": ("cce_images",), "training_images": ("training_images",), "cce_replace_word": ("cce_replace_word",),
    "initializer": ("cce.initializer",), "inversion_steps": ("cce.inversion.steps",),
    "inversion_resolution": ("cce.inversion.resolution",), "cce_templates": ("cce.inversion.templates",),
    "cce_num_images": ("cce.num_images",), "uda_iterations": ("uda.iterations",), "uda_target": ("uda.target",),
    "steps": ("generation.num_inference_steps", "care.num_inference_steps"),
    "guidance": ("generation.guidance_scale", "care.guidance_scale"),
    "batch_size": ("generation.batch_size", "care.batch_size"),
    "scheduler": ("generation.scheduler", "care.scheduler"), "clip_model": ("clip_model",),
    "coco_prompts": ("coco_prompts",), "coco_limit": ("coco_limit",), "fid_reference": ("fid_reference",),
    "fid_method": ("fid_method",),
    "care_word": ("care_word",), "care_prompts": ("care_prompts",), "images_per_prompt": ("care.images_per_prompt",),
    "base_name": ("base_name",), "grid_columns": ("grid_columns",),
}


def _overrides(args: argparse.Namespace, attacks: list[str] | None) -> dict[str, Any]:
    """Nested EvalConfig overrides from the flags that were given."""
    out: dict[str, Any] = {}
    for dest, fields in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for path in fields:
            *parents, leaf = path.split(".")
            table = out
            for parent in parents:
                table = table.setdefault(parent, {})
            table[leaf] = tuple(value) if isinstance(value, list) else value
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


def _add_model_group(p: argparse.ArgumentParser, single: bool) -> None:
    from recare.cli.common import default_device

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="original Stable Diffusion (Hub id or folder; default SD v1.4)")
    g.add_argument("--revision", default=None, help="Hub revision of --model")
    if single:
        g.add_argument("--unet-weights", default=None, help="erased-UNet weights (.safetensors) of the attacked model")
        g.add_argument("--learned-embeddings", nargs="*", default=[], metavar="FILE",
                       help="textual-inversion files of the attacked model")
        g.add_argument("--text-encoder-weights", default=None,
                       help="replacement text encoder of the attacked model (e.g. AdvUnlearn's), loaded strictly")
    g.add_argument("--device", default=default_device(), help="torch device")
    g.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights dtype (default auto: fp16 on CUDA, fp32 on CPU)")


def _add_attack_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attacks (defaults: SPEC 5)")
    g.add_argument("--prompts", default=None, help="benchmark prompt CSV (prompt, evaluation_seed, ...) for "
                                                   "plain / unlearndiffatk / --cce-replace-word")
    g.add_argument("--limit", type=int, default=None, help="only the first LIMIT benchmark prompts")
    g.add_argument("--cce-images", default=None, help="CCE: HELD-OUT target images (not the training images)")
    g.add_argument("--training-images", default=None, help="CCE: the training images, checked to differ")
    g.add_argument("--cce-replace-word", default=None,
                   help="CCE: also attack the benchmark prompts with this word replaced by the token")
    g.add_argument("--initializer", default=None, help="CCE: initializer word of the token (person)")
    g.add_argument("--inversion-steps", type=int, default=None, help="CCE: textual-inversion steps (3000)")
    g.add_argument("--inversion-resolution", type=int, default=None, help="CCE: inversion image size (512)")
    g.add_argument("--cce-templates", choices=["object", "style"], default=None, help="CCE: inversion templates")
    g.add_argument("--cce-num-images", type=int, default=None, help="CCE: images of 'a photo of a <token>' (100)")
    g.add_argument("--uda-iterations", type=int, default=None, help="UnlearnDiffAtk: iterations per prompt (40)")
    g.add_argument("--uda-target", choices=["original", "noise"], default=None,
                   help="UnlearnDiffAtk: L2 target: the original model's prediction (SPEC) or the noise "
                        "(the reference code)")
    g.add_argument("--uda-attack-detected", action="store_true",
                   help="UnlearnDiffAtk: also attack prompts whose plain image is already detected "
                        "(the reference stops there and counts a success)")


def _add_detector_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detector")
    g.add_argument("--detector", default=None, help="nudenet (default), imagenet, style or clip")
    g.add_argument("--nudity-threshold", type=float, default=None, help="nudenet: exposed-class threshold (0.75)")
    g.add_argument("--imagenet-model", choices=["resnet50", "efficientnet_lite0"], default=None,
                   help="imagenet: classifier (resnet50 as the paper; efficientnet_lite0 ships offline)")
    g.add_argument("--imagenet-class", default=None, help="imagenet: target class name or index, e.g. tench")
    g.add_argument("--style-model", default=None, help="style: image classifier (Hub id or folder)")
    g.add_argument("--artist-label", default=None, help="style: the artist's label")
    g.add_argument("--style-top-k", type=int, default=None, help="style: success when the artist is in the top k (3)")
    g.add_argument("--detector-clip-model", default=None, help="clip: CLIP of the detector (default --clip-model)")
    g.add_argument("--concept-prompts", nargs="+", default=None, help="clip: texts naming the concept")
    g.add_argument("--contrast-prompts", nargs="+", default=None, help="clip: texts for everything else")


def _add_generation_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (also the CARE images in eval all)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (50)")
    g.add_argument("--guidance", type=float, default=None, help="guidance for prompts without their own (7.5)")
    g.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    g.add_argument("--scheduler", choices=["default", "ddim"], default=None, help="sampler (default: the model's)")
    g.add_argument("--clip-model", default=None, help="CLIP (ViT-B/32) for CLIP score, CARE and the clip detector")
    g.add_argument("--note", action="append", default=[], help="a note written at the top of the report")
    g.add_argument("--random-models", action="store_true", help="say in the report that the models are random/tiny")


def add_eval_robustness(sub) -> None:
    from recare.cli.common import Formatter

    p = sub.add_parser("robustness", formatter_class=Formatter,
                       help="attack success rate of one model: plain prompts, CCE or UnlearnDiffAtk (SPEC 5)")
    _add_model_group(p, single=True)
    p.add_argument("--attack", required=True, choices=["plain", "cce", "unlearndiffatk"], help="the attack")
    _add_attack_group(p)
    _add_detector_group(p)
    _add_generation_group(p)
    p.add_argument("--work-dir", type=Path, default=None, help="images and caches (default: OUT's name + '_images')")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    p.set_defaults(run=run_eval_robustness)


def add_eval_all(sub) -> None:
    p = sub.add_parser("all", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="several models on every axis: ASR, CLIP, FID, CARE, RATIO; reports and grids",
                       description="Settings: EvalConfig defaults (SPEC 5), then --spec FILE (TOML/JSON: EvalConfig "
                                   "fields and [[method]] tables), then the flags given here.")
    p.add_argument("--spec", type=Path, default=None, help="evaluation spec, TOML or JSON")
    p.add_argument("--method", action="append", default=[], metavar="NAME=UNET[,EMBEDS...]",
                   help="an erased model (repeatable); the base model is always included")
    p.add_argument("--base-name", default=None, help="report name of the base model")
    _add_model_group(p, single=False)
    p.add_argument("--attacks", nargs="+", choices=["plain", "cce", "unlearndiffatk"], default=None,
                   help="attacks (default: all three)")
    _add_attack_group(p)
    _add_detector_group(p)
    _add_generation_group(p)
    g = p.add_argument_group("utility and CARE")
    g.add_argument("--coco-prompts", default=None, help="COCO prompt CSV (coco_30k.csv) for CLIP score and FID")
    g.add_argument("--coco-limit", type=int, default=None, help="COCO prompts used (1000)")
    g.add_argument("--fid-reference", default=None, help="reference image folder or .npz statistics for FID")
    g.add_argument("--fid-method", choices=["sqrtm", "eigh"], default=None,
                   help="FID matrix root: sqrtm (clean-fid) or eigh (same value, faster)")
    g.add_argument("--care-word", default=None, help="CARE word w*: person, stars, freshwater")
    g.add_argument("--care-prompts", default=None, help="CARE prompt file (default: the shipped one)")
    g.add_argument("--images-per-prompt", type=int, default=None, help="CARE images per prompt (10)")
    g.add_argument("--grid-columns", type=int, default=None, help="prompts per image grid (4)")
    p.add_argument("--cache-dir", type=Path, default=None, help="base-model images and FID statistics "
                                                                "(default OUT/cache; share it between runs)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=run_eval_all)


# ----------------------------------------------------------------------------- runners


def _shard(device: str):
    """(ShardInfo, this rank's device); joins the process group under torchrun / accelerate launch."""
    from recare.generate.sharding import init_distributed, shard_device, shard_info_from_env

    shard = shard_info_from_env()
    init_distributed(shard)
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
