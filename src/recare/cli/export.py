"""`recare export`: a finished training run as a diffusers model folder with a model card."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recare.cli.common import Formatter, echo

logger = logging.getLogger(__name__)


def _add_export(sub) -> None:
    p = sub.add_parser("export", formatter_class=Formatter,
                       help="a finished run as a folder StableDiffusionPipeline.from_pretrained loads, "
                            "with a model card",
                       description="Writes the base model's components with the erased UNet (diffusers layout), "
                                   "README.md (a Hugging Face model card: base model, method, concept, CARE-set, "
                                   "training settings, evaluation when --results is given) and recare/ (run record, "
                                   "CARE-set, learned tokens, loss plot).")
    p.add_argument("run_dir", type=Path, help="folder of a complete `recare train` run (run.json status complete)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (new or empty)")
    p.add_argument("--results", type=Path, default=None,
                   help="results.json of `recare eval all` that evaluated this run: its numbers go into the card")
    p.add_argument("--license", default=None,
                   help="license id of the card (default: the base model's for SD 1.x/2.x, mit for the synthetic "
                        "world, else 'other')")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="also upload the folder to this Hub repo (private; needs the network and a token)")
    p.set_defaults(run=_run_export, outputs=(("out", "folder"),))


def _run_export(args: argparse.Namespace) -> int:
    from recare.models.loading import load_sd
    from recare.report.export import export_run, push_to_hub, read_finished_run, results_of

    read_finished_run(args.run_dir)  # a bad run folder is reported before the base model is loaded
    results = results_of(args.results) if args.results is not None else None
    folder = export_run(args.run_dir, args.out, load_sd, results=results, license_id=args.license,
                        overwrite=args.overwrite)
    echo(f"model folder written to {folder} (StableDiffusionPipeline.from_pretrained loads it)")
    if args.push_to_hub:
        echo(f"uploaded: {push_to_hub(folder, args.push_to_hub)}")
    return 0
