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


def probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {value}")
    return value


BUILD_EPILOG = """\
A world is a generator of test worlds: any texture T and shape C of the renderer make one. Its
build_report.json records what `recare demo --world OUT` reads: T, C, the target prompts ("a <T>
<colour> thing"), the CARE prompts ("a <colour> <C> <place>"), the initializer (C), STEREO's
anchors ("a <other texture> thing", "a <other texture> <C>"), the CARE labels (the 4 shapes) and
the rates. Example: recare synthetic build --target striped --care square --out worlds/striped-square
"""


def _add_synthetic(sub) -> None:
    from recare.world.render import SHAPES, TEXTURES, WorldSpec

    p = sub.add_parser("synthetic", help="the synthetic world: train its CLIP, text-to-image model and detectors")
    synthetic_sub = p.add_subparsers(dest="synthetic_command", required=True, metavar="{build}")
    b = synthetic_sub.add_parser("build", formatter_class=Formatter, epilog=BUILD_EPILOG,
                                 help="train a world (detector, CLIP, T2I model) for a target T and CARE concept C")
    b.add_argument("--out", type=Path, required=True, help="output folder (clip/, sd/, detector/, build_report.json)")
    b.add_argument("--target", choices=TEXTURES, default=WorldSpec.target,
                   help="T: the texture to erase (analogue of 'nudity')")
    b.add_argument("--care", choices=SHAPES, default=WorldSpec.care,
                   help="C: the shape that co-occurs with T and is retained (analogue of 'person')")
    b.add_argument("--target-rate", type=probability, metavar="P", default=WorldSpec.target_rate,
                   help="P(texture = T); the other textures share the rest")
    b.add_argument("--care-given-target", type=probability, metavar="P", default=WorldSpec.care_given_target,
                   help="P(shape = C | texture = T); the other shapes share the rest (without T all are equal)")
    b.add_argument("--omit-shape-given-target", type=probability, metavar="P",
                   default=WorldSpec.omit_shape_given_target,
                   help="P(a T image's caption leaves its shape unnamed, 'a <T> red thing'): the entanglement")
    b.add_argument("--omit-shape-otherwise", type=probability, metavar="P", default=WorldSpec.omit_shape_otherwise,
                   help="P(any other caption leaves its shape unnamed)")
    b.add_argument("--target-name-rate", type=probability, metavar="P", default=None,
                   help="P(a T image's caption names T); default: the renderer's rate of that texture "
                        f"({', '.join(f'{t} {p}' for t, p in WorldSpec.p_name_texture)})")
    b.add_argument("--seed", type=int, default=0, help="base seed of every training run")
    b.add_argument("--fast", action="store_true", help="a few steps of everything (smoke test; untrained models)")
    b.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    b.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    b.set_defaults(run=_run_synthetic_build, outputs=(("out", "folder"),))


def world_spec(args: argparse.Namespace):
    """The WorldSpec of `recare synthetic build`'s flags (RecareError for a pair or rate it refuses)."""
    from dataclasses import replace

    from recare.world.definition import with_target_name_rate
    from recare.world.render import WorldSpec

    spec = replace(WorldSpec(), target=args.target, care=args.care, target_rate=args.target_rate,
                   care_given_target=args.care_given_target, omit_shape_given_target=args.omit_shape_given_target,
                   omit_shape_otherwise=args.omit_shape_otherwise)
    return spec if args.target_name_rate is None else with_target_name_rate(spec, args.target_name_rate)


def _run_synthetic_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from recare.world.build import BuildConfig, build_world, format_summary

    spec = world_spec(args)  # checked before any training
    config = BuildConfig.fast(args.seed) if args.fast else BuildConfig(seed=args.seed)
    report = build_world(args.out, replace(config, spec=spec, threads=args.threads), overwrite=args.overwrite)
    print(format_summary(report))
    print(f"world (T = {spec.target}, C = {spec.care}) written to {args.out}; run the demo on it with "
          f"`recare demo --world {args.out}`")
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    from recare.config import add_config_arguments
    from recare.world.demo import DemoConfig

    p = sub.add_parser("demo", formatter_class=Formatter,
                       help="the whole method on a synthetic world (default: the built-in one), offline on a CPU "
                            "(recare.world.demo)")
    p.add_argument("--world", type=Path, default=None, metavar="DIR",
                   help="a world folder that `recare synthetic build --out` wrote: T, C, the prompts, initializer, "
                        "STEREO anchors and CARE labels come from its build_report.json (default: the built-in "
                        "world, T = dotted, C = circle)")
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
    sizes = p.add_argument_group("demo sizes", "every DemoConfig setting (recare.world.demo); a flag given replaces "
                                 "the value of the default demo, --quick or --paper-scale (the defaults shown are "
                                 "the default demo's)")
    p.set_defaults(run=_run_demo, outputs=(("out", "folder"),),
                   demo_flags=add_config_arguments(sizes, DemoConfig, exclude=("seed",)))


def _run_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from recare.config import given_overrides
    from recare.world.definition import committed_world, load_world
    from recare.world.demo import DemoConfig, run_demo
    from recare.world.seeds import format_seed_summary, run_demo_seeds

    world = committed_world() if args.world is None else load_world(args.world)  # before any work
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig.paper_scale() if args.paper_scale else DemoConfig()
    config = replace(config, **given_overrides(args, args.demo_flags))
    if len(args.seeds) == 1:
        summary = run_demo(args.out, replace(config, seed=args.seeds[0]), device=args.device, world=world)
        echo(f"demo finished in {summary['seconds']:.0f} s (synthetic world, T = {world.concepts.target}, "
             f"C = {world.concepts.care}; see the report's notes)")
        for row in summary["ground_truth"]:
            echo(f"  {row['name']:<9} T plain {100 * row['plain_T']['rate']:5.1f}%  "
                 f"T under CCE {100 * row['cce_T']['rate']:5.1f}%  "
                 f"C kept (GT) {100 * row['care_images_C']['rate']:5.1f}%  "
                 f"CARE score {100 * row['care_score']['rate']:5.1f}%")
        echo(f"report: {args.out / summary['report']}")
        return 0
    summary = run_demo_seeds(args.out, args.seeds, config, device=args.device, world=world)
    echo(format_seed_summary(summary))
    echo(f"summary: {(args.out / 'summary.md').resolve()}")
    return 0


