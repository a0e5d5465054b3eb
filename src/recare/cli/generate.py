"""`recare generate`: target images (method §1)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recare.cli.common import Formatter, add_model_args, load_sd_from_args, model_info_from_args
from recare.cli.guard import at_least

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- generate

_GENERATE_BATCH_SIZE = 8  # the command's default (GenerationConfig's is 4); images do not depend on it


def _add_generate(sub) -> None:
    from recare.config import add_config_arguments
    from recare.generate.images import GenerationConfig

    p = sub.add_parser("generate", formatter_class=Formatter,
                       help="generate target images (method §1); resumes, writes manifest.json")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt, e.g. 'A photo of a nude person'")
    source.add_argument("--prompts", type=Path, help="prompt file (.txt, one per line, or .csv with a prompt column) "
                                                     "or a shipped set: nudity, vangogh, tench, coco_30k, i2p")
    p.add_argument("--num-images", type=at_least(1), default=500, help="images (per prompt with --prompts)")
    p.add_argument("--seed", type=int, default=42, help="image i gets seed SEED+i (CSV evaluation_seed wins)")
    p.add_argument("--limit", type=at_least(1), default=None, help="only the first LIMIT prompts of --prompts")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    group = p.add_argument_group("generation settings (GenerationConfig)")
    flags = add_config_arguments(group, GenerationConfig, defaults=GenerationConfig(batch_size=_GENERATE_BATCH_SIZE),
                                 flags={"num_inference_steps": "steps", "guidance_scale": "guidance"})
    p.set_defaults(run=_run_generate, generation_flags=flags, outputs=(("out", "folder"),))


def _run_generate(args: argparse.Namespace) -> int:
    from recare.config import from_dict, given_overrides
    from recare.generate.images import GenerationConfig, generate_images
    from recare.generate.prompts import jobs_for_prompt, read_prompt_file

    settings = {"batch_size": _GENERATE_BATCH_SIZE, **given_overrides(args, args.generation_flags)}
    config = from_dict(GenerationConfig, settings, "generation settings")
    if args.prompt is not None:
        jobs = jobs_for_prompt(args.prompt, args.num_images, args.seed)
    else:
        jobs = read_prompt_file(args.prompts, args.num_images, args.seed, limit=args.limit)
    components = load_sd_from_args(args)
    paths = generate_images(components, jobs, args.out, config, device=args.device,
                            model_info=model_info_from_args(args))
    logger.info("%d images in %s", len(paths), args.out)
    return 0
