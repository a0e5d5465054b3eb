"""`recare generate`: target images (SPEC 1)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recare.cli.common import Formatter, add_model_args, load_sd_from_args, model_info_from_args

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- generate


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", formatter_class=Formatter,
                       help="generate target images (SPEC 1); resumes, writes manifest.json")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt, e.g. 'A photo of a nude person'")
    source.add_argument("--prompts", type=Path, help="prompt file: .txt (one per line) or .csv with a prompt column")
    p.add_argument("--num-images", type=int, default=500, help="images (per prompt with --prompts)")
    p.add_argument("--seed", type=int, default=42, help="image i gets seed SEED+i (CSV evaluation_seed wins)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT prompts of --prompts")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="default", choices=["default", "ddim"],
                   help="the model's own scheduler (PNDM for SD v1.4) or DDIM")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from recare.generate.images import GenerationConfig, generate_images
    from recare.generate.prompts import jobs_for_prompt, read_prompt_file

    config = GenerationConfig(num_inference_steps=args.steps, guidance_scale=args.guidance,
                              batch_size=args.batch_size, scheduler=args.scheduler)
    if args.prompt is not None:
        jobs = jobs_for_prompt(args.prompt, args.num_images, args.seed)
    else:
        jobs = read_prompt_file(args.prompts, args.num_images, args.seed, limit=args.limit)
    components = load_sd_from_args(args)
    paths = generate_images(components, jobs, args.out, config, device=args.device,
                            model_info=model_info_from_args(args))
    logger.info("%d images in %s", len(paths), args.out)
    return 0


