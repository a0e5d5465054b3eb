"""Count host-device synchronisations per step of each training loop (erase, inversion, stage 2) on CUDA.

Runs a few iterations of each loop through the library's Trainer (as bench_train drives it) with
torch.cuda.set_sync_debug_mode("warn"), which makes torch warn at every synchronising CUDA call
(.item(), .cpu(), .tolist(), a blocking host<->device copy, torch.cuda.synchronize, ...). The warnings
are collected under warnings.catch_warnings() by a showwarning hook that also keeps the innermost recare
frame of each, and are attributed to the step during which they fired:

- erase / stage 2: Trainer._steps yields once per iteration; everything from one yield to the next
  (the iteration's body and the loop's own bookkeeping after it: loss logging every LOG_EVERY steps,
  checkpoints) belongs to that step;
- inversion: one step per call of recare.train.inversion._draw_batch (the first thing each step does).

"setup" is what fired in the phase before its first step (optimizer, embeddings, VAE encoding, ...),
"flush" the trainer's flush after it (one deliberate synchronize). Step 1 may sync (first calls, compilation),
and so may logging/checkpoint steps; the steady state is steps 2..N, reported separately, and the sites
(file:line in recare) say where each sync comes from.

Without CUDA (--device cpu, e.g. with --tiny as a dry run) sync debug mode is not set and every count is 0:
the run only checks that the script works.

    python benchmarks/sync_check.py --json sync.json                 # full size on cuda
    python benchmarks/sync_check.py --tiny --device cpu --json /tmp/sync.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from bench_train import build_sd14_random, build_tiny, script_logging, write_images
from recare.io import write_json_atomic

logger = logging.getLogger("sync_check")

SYNC_MESSAGE = "synchroniz"  # torch: "called a synchronizing CUDA operation"
RECARE_MARK = "recare"


@dataclasses.dataclass
class Recorded:
    message: str
    site: str  # where torch saw it (the warning's filename:lineno)
    recare_site: str | None  # the innermost frame inside the recare package


class SyncRecorder:
    """Collects the sync warnings (and counts other warnings) while active."""

    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self.other = 0

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if SYNC_MESSAGE not in text.lower():
            self.other += 1
            return
        recare_site = None
        for frame in reversed(traceback.extract_stack()[:-1]):
            if f"{RECARE_MARK}/" in frame.filename.replace("\\", "/") and "benchmarks" not in frame.filename:
                path = frame.filename.replace("\\", "/")
                recare_site = f"{path[path.rindex(RECARE_MARK + '/'):]}:{frame.lineno} ({frame.name})"
                break
        self.records.append(Recorded(text.splitlines()[0][:200], f"{Path(filename).name}:{lineno}", recare_site))

    @contextlib.contextmanager
    def active(self, cuda: bool) -> Iterator["SyncRecorder"]:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = self.showwarning
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")


def counting_trainer_class():
    """A Trainer whose _steps records where each step starts in the recorder's list."""
    from recare.train.trainer import Trainer

    class CountingTrainer(Trainer):
        recorder: SyncRecorder
        marks: list[int]

        def _steps(self, phase, optimizer, teacher):
            for step in super()._steps(phase, optimizer, teacher):
                self.marks.append(len(self.recorder.records))
                yield step

    return CountingTrainer


@contextlib.contextmanager
def inversion_step_marks(marks: list[int], recorder: SyncRecorder) -> Iterator[None]:
    """Mark a step start at every call of recare.train.inversion._draw_batch."""
    import recare.train.inversion as inversion

    original = inversion._draw_batch

    def marked(*args, **kwargs):
        marks.append(len(recorder.records))
        return original(*args, **kwargs)

    inversion._draw_batch = marked
    try:
        yield
    finally:
        inversion._draw_batch = original


def compile_context(trainer) -> contextlib.AbstractContextManager:
    """Trainer.run compiles the UNet for its phases; run_phase alone does not, so do it here when asked."""
    mode = getattr(trainer, "compile_mode", None)
    if mode is None:
        return contextlib.nullcontext()
    from recare.models.acceleration import compiled

    return compiled(trainer.unet, mode)


def summarise(records: list[Recorded], marks: list[int], end: int, flush: list[Recorded], log_every: int,
              seconds: float) -> dict[str, Any]:
    """Counts per step from the step-start marks (indices into `records`)."""
    bounds = marks + [end]
    per_step = [bounds[i + 1] - bounds[i] for i in range(len(marks))]
    steady = per_step[1:]
    log_steps = [i + 1 for i in range(1, len(marks)) if (i + 1) % log_every == 0]
    plain = [n for i, n in enumerate(per_step) if i >= 1 and (i + 1) not in log_steps]
    sites = collections.Counter((r.recare_site or "outside recare") + "  <- " + r.site
                                for r in records[bounds[1] if len(bounds) > 1 else 0:end])
    return {
        "steps": len(marks), "seconds": round(seconds, 2),
        "setup": marks[0] if marks else end, "per_step": per_step, "first_step": per_step[0] if per_step else 0,
        "steps_2_to_n_total": sum(steady),
        "steps_2_to_n_per_step": round(sum(steady) / len(steady), 3) if steady else 0,
        "log_steps": log_steps, "steady_steps_without_logging_per_step":
            round(sum(plain) / len(plain), 3) if plain else 0,
        "flush": len(flush), "steady_state_sites": dict(sites.most_common(12)),
        "setup_and_first_step_sites": dict(collections.Counter(
            (r.recare_site or "outside recare") + "  <- " + r.site
            for r in records[:bounds[1] if len(bounds) > 1 else end]).most_common(12)),
    }


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    from recare.careset.artifact import CareSet
    from recare.train.config import TrainConfig
    from recare.train.inversion import InversionConfig
    from recare.train.state import run_identity
    from recare.train.steps import LOG_EVERY
    from recare.train.trainer import Phase

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    components = build_tiny(args.device) if args.tiny else build_sd14_random(args.device)
    built = time.perf_counter() - start
    n = args.iterations
    extra = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "compile" in fields:
        extra["compile"] = args.compile
    elif args.compile != "off":
        logger.warning("TrainConfig has no 'compile' field: --compile %s ignored", args.compile)
    config = TrainConfig(method="recare", rounds=1, erase_iterations=n, stage2_iterations=n, erase_set_tokens=1,
                         stop_range=tuple(args.stops), checkpoint_every=0, mixed_precision=args.mixed_precision,
                         inversion=InversionConfig(steps=n, resolution=components.image_size), **extra)
    report: dict[str, Any] = {
        "model": "tiny random SD" if args.tiny else "SD v1.4 architecture, random weights",
        "device": torch.cuda.get_device_name(device) if cuda else "CPU", "cuda": cuda, "torch": torch.__version__,
        "sync_debug_mode": "warn" if cuda else "not set (no CUDA): dry run, every count is 0",
        "iterations": n, "stop_range": list(args.stops), "mixed_precision": config.mixed_precision,
        "compile": extra.get("compile", "n/a"), "log_every": LOG_EVERY, "build_s": round(built, 1), "loops": {}}
    with tempfile.TemporaryDirectory(prefix="sync-check-") as tmp:
        images = write_images(Path(tmp) / "images", 2, components.image_size)
        careset = CareSet.from_words("nudity", ["person", "woman", "man", "girl"], "nudity")
        identity = run_identity(components, config, careset, images)
        recorder = SyncRecorder()
        trainer = counting_trainer_class()(components, config, Path(tmp) / "out", device, careset, images, identity,
                                           {}, progress=False)
        trainer.recorder, trainer.marks = recorder, []
        with compile_context(trainer):
            for kind, round_index in (("erase", 1), ("inversion", 1), ("stage2", 0)):
                recorder.records, trainer.marks = [], []
                trainer.state.step = 0
                started = time.perf_counter()
                with recorder.active(cuda):
                    hook = inversion_step_marks(trainer.marks, recorder) if kind == "inversion" else \
                        contextlib.nullcontext()
                    with hook:
                        trainer.run_phase(Phase(kind, round_index, n))
                    end = len(recorder.records)
                    trainer.flush()
                seconds = time.perf_counter() - started
                flush = recorder.records[end:]
                loop = summarise(recorder.records, list(trainer.marks), end, flush, LOG_EVERY, seconds)
                report["loops"][kind] = loop
                logger.info("%-9s setup %3d  step 1 %3d  steps 2..%d: %3d (%.2f per step)  flush %d  [%.1f s]", kind,
                            loop["setup"], loop["first_step"], n, loop["steps_2_to_n_total"],
                            loop["steps_2_to_n_per_step"], loop["flush"], seconds)
                for site, count in loop["steady_state_sites"].items():
                    logger.info("    %4d  %s", count, site)
        report["other_warnings"] = recorder.other
    report["steady_state_syncs_per_step"] = {k: v["steps_2_to_n_per_step"] for k, v in report["loops"].items()}
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random SD instead of full size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=12,
                        help="steps of each loop (>= LOG_EVERY + 1 includes one loss-logging step)")
    parser.add_argument("--stops", type=int, nargs=2, default=(1, 3), help="stop-index range of the iterations")
    parser.add_argument("--mixed-precision", default="auto", help="TrainConfig.mixed_precision (auto: bf16 on CUDA)")
    parser.add_argument("--compile", default="off", help="TrainConfig.compile (default off: the eager loops)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    script_logging()
    report = run_check(args)
    print(f"\nsync warnings per steady-state step (steps 2..{args.iterations}), {report['device']}: "
          + ", ".join(f"{k} {v}" for k, v in report["steady_state_syncs_per_step"].items())
          + ("" if report["cuda"] else "  (dry run: no CUDA)"))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
