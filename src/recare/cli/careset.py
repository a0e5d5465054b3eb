"""`recare careset`: the CARE-set from target images (method §2)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recare.cli.common import Formatter, add_clip_args, default_device, echo, load_clip_from_args

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- careset


def _add_careset(sub) -> None:
    from recare.careset.config import CareSetConfig
    from recare.config import add_config_arguments

    p = sub.add_parser("careset", formatter_class=Formatter, help="build the CARE-set from target images (method §2)")
    p.add_argument("--images", type=Path, required=True, help="folder of target images (.jpg/.jpeg/.png)")
    p.add_argument("--reference-word", required=True, help="the target's word, e.g. 'nudity' or 'Van Gogh'")
    add_clip_args(p)
    p.add_argument("--device", default=default_device(), help="torch device")
    p.add_argument("--vocab-file", type=Path, default=None,
                   help="text file of words (one per line, # comments): search only these vocabulary words")
    p.add_argument("--cache-dir", type=Path, default=None, help="vocabulary cache ($RECARE_CACHE or ~/.cache/recare)")
    p.add_argument("--out", type=Path, required=True, help="CARE-set JSON to write")
    p.add_argument("--layout", default="recare", choices=["recare", "reference"],
                   help="recare: versioned JSON with diagnostics; reference: the reference code's careset.json")
    group = p.add_argument_group("CARE-set settings (CareSetConfig, method §2)")
    flags = add_config_arguments(group, CareSetConfig, exclude=("vocab_words",), flags={"n_clusters": "clusters"})
    p.set_defaults(run=_run_careset, careset_flags=flags, outputs=(("out", "file"),))


def _run_careset(args: argparse.Namespace) -> int:
    from recare.careset.build import build_careset_from_folder
    from recare.careset.config import CareSetConfig
    from recare.careset.report import format_report
    from recare.careset.vocab import read_word_list
    from recare.config import from_dict, given_overrides
    from recare.io import check_images, list_images

    settings = given_overrides(args, args.careset_flags)
    if args.vocab_file is not None:
        settings["vocab_words"] = read_word_list(args.vocab_file)
    config = from_dict(CareSetConfig, settings, "CARE-set settings")
    check_images(list_images(args.images), "target image")  # every image decodes, before CLIP is loaded
    clip = load_clip_from_args(args)
    careset = build_careset_from_folder(clip, args.images, args.reference_word, config, args.cache_dir)
    careset.save(args.out, layout=args.layout)
    echo(format_report(careset))
    echo(f"CARE-set written to {args.out}")
    return 0
