"""What every command shares: output, the device default, model and CLIP arguments."""

from __future__ import annotations

import argparse
import logging

import torch

from recare.config import HelpFormatter
from recare.models.precision import resolve_weights_dtype

logger = logging.getLogger(__name__)

Formatter = HelpFormatter
"""Every command's help formatter: argparse prints each non-None default once."""


def echo(text: str) -> None:
    """Write one line of command output to stdout (library code logs instead; see STYLE)."""
    print(text)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from recare.models.loading import DEFAULT_SD_MODEL

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_SD_MODEL, help="Stable Diffusion Hub id or local diffusers folder")
    group.add_argument("--revision", default=None, help="Hub revision of --model")
    group.add_argument("--unet-weights", default=None, help="erased-UNet weights (.safetensors) loaded strictly")
    group.add_argument("--learned-embeddings", nargs="*", default=[], metavar="FILE",
                       help="textual-inversion .safetensors files whose tokens are added")
    group.add_argument("--text-encoder-weights", default=None,
                       help="replacement text encoder (file or folder, e.g. AdvUnlearn's), loaded strictly")
    group.add_argument("--device", default=default_device(), help="torch device")
    group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="weights dtype; auto = fp16 on CUDA, fp32 on CPU")


def load_sd_from_args(args: argparse.Namespace):
    from recare.models.loading import load_sd

    return load_sd(args.model, revision=args.revision, dtype=resolve_weights_dtype(args.dtype, args.device),
                   device=args.device, unet_weights=args.unet_weights, learned_embeddings=args.learned_embeddings,
                   text_encoder_weights=args.text_encoder_weights)


def model_info_from_args(args: argparse.Namespace) -> dict:
    return {"unet_weights": args.unet_weights, "learned_embeddings": list(args.learned_embeddings),
            "text_encoder_weights": args.text_encoder_weights}


def add_clip_args(parser: argparse.ArgumentParser) -> None:
    from recare.models.loading import DEFAULT_CLIP_MODEL

    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP or SigLIP Hub id or local folder")
    parser.add_argument("--clip-revision", default=None, help="Hub revision of --clip-model")


def load_clip_from_args(args: argparse.Namespace):
    from recare.models.loading import load_image_text_model

    return load_image_text_model(args.clip_model, revision=args.clip_revision, device=args.device)


