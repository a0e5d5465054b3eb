"""`recare synthetic build` and `recare demo`: the synthetic world."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from recare.cli.common import Formatter, echo
from recare.cli.guard import at_least

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- synthetic


def _add_synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="the synthetic world: train its CLIP, text-to-image model and detectors")
    synthetic_sub = p.add_subparsers(dest="synthetic_command", required=True, metavar="{build}")
    b = synthetic_sub.add_parser("build", formatter_class=Formatter,
                                 help="train the world's detector, CLIP and T2I model from a seed")
    b.add_argument("--out", type=Path, required=True, help="output folder (clip/, sd/, detector/, build_report.json)")
    b.add_argument("--seed", type=int, default=0, help="base seed of every training run")
    b.add_argument("--fast", action="store_true", help="a few steps of everything (smoke test; untrained models)")
    b.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    b.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    b.set_defaults(run=_run_synthetic_build, outputs=(("out", "folder"),))


def _run_synthetic_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from recare.world.build import BuildConfig, build_world, format_summary

    config = BuildConfig.fast(args.seed) if args.fast else BuildConfig(seed=args.seed)
    report = build_world(args.out, replace(config, threads=args.threads), overwrite=args.overwrite)
    print(format_summary(report))
    print(f"world written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", formatter_class=Formatter,
                       help="the whole method on the built-in synthetic world, offline on a CPU (recare.world.demo)")
    p.add_argument("--out", type=Path, default=Path("recare-demo"),
                   help="output folder (an interrupted run in it resumes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (out/seed-<s>); with several, summary.md has mean and 95%% intervals")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="a shortened demo (the end-to-end test's sizes)")
    scale.add_argument("--paper-scale", action="store_true",
                       help="the paper's iterations and learning rates (200 erase iterations per round, 200 of "
                            "stage 2, no learning-rate scaling); about 20 minutes per seed on 2 cores")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=_run_demo, outputs=(("out", "folder"),))


def _run_demo(args: argparse.Namespace) -> int:

    from recare.world.demo import DemoConfig, run_demo
    from recare.world.seeds import format_seed_summary, run_demo_seeds

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig.paper_scale() if args.paper_scale else DemoConfig()
    if len(args.seeds) == 1:
        from dataclasses import replace

        summary = run_demo(args.out, replace(config, seed=args.seeds[0]), device=args.device)
        echo(f"demo finished in {summary['seconds']:.0f} s (synthetic world; see the report's notes)")
        for row in summary["ground_truth"]:
            echo(f"  {row['name']:<9} T plain {100 * row['plain_T']['rate']:5.1f}%  "
                 f"T under CCE {100 * row['cce_T']['rate']:5.1f}%  "
                 f"C kept (GT) {100 * row['care_images_C']['rate']:5.1f}%  "
                 f"CARE score {100 * row['care_score']['rate']:5.1f}%")
        echo(f"report: {args.out / summary['report']}")
        return 0
    summary = run_demo_seeds(args.out, args.seeds, config, device=args.device)
    echo(format_seed_summary(summary))
    echo(f"summary: {(args.out / 'summary.md').resolve()}")
    return 0


