"""Smoke run of every phase at FULL size (not in CI): shape, dtype and memory-layout errors that tiny configs hide.

Builds the full SD v1.4 architecture with RANDOM weights (benchmarks/bench_train.build_sd14_random: UNet 860M,
CLIP ViT-L/14 text tower, VAE) and a random full-size CLIP ViT-B/32, and runs one or two steps of each phase
through the library's own functions, in each precision:

    erase      Trainer.run_phase(erase-1), `--steps` iterations at stop index 1 (a 1-step partial trajectory)
    inversion  Trainer.run_phase(inversion-1): VAE encoding of the slice + `--steps` textual-inversion steps
    stage2     Trainer.run_phase(stage2): `--steps` ReCARE stage-2 iterations
    train      recare.train.run.train end to end (rounds 1, every stage `--steps` long): checkpoints between
               phases, unet.safetensors, losses, run.json
    cce        recare.attacks.cce.learn_cce_token: the CCE attack's textual inversion, `--steps` steps
    careset    one CARE-set batch: a few random 512-px images and a random subset of the vocabulary through the
               random CLIP ViT-B/32, then careset_from_features (candidates, re-encoding, t-SNE, k-means, refinement)
    generate   recare.generate.generate_images: one image, `--generate-steps` denoising steps, VAE decode, PNG

Precisions: "no" (fp32: mixed_precision 'no', fp32 weights) and "bf16" (bf16 autocast over fp32 master weights for
training and inversions; bf16 weights for generation and the CLIP of the CARE-set, as `--dtype bf16` would load
them). Each precision runs in its own child process, so that one crash (a segfault, the kernel's out-of-memory
killer) costs only its phase: the parent starts a fresh child for the phases after it. On the CPU the child's
address space is capped (`--memory-limit-gib`, default: what the machine has available) so that running out of
memory is a Python error with a traceback rather than a SIGKILL, and other jobs on the machine are left alone.

Reports seconds and peak resident memory per phase (the kernel's high-water mark, reset before each phase through
/proc/self/clear_refs; a 20 ms sampler where that is refused) beside the RSS the phase started from (what earlier
phases left resident; freed heap is handed back with malloc_trim between phases), plus peak CUDA memory on a GPU.
Prints a table and writes JSON with --json. A full-size noxattn run needs about 20 GiB of RAM in stage 2 (fp32
master weights, gradients and AdamW moments of 815M parameters plus a teacher copy and activations); on a smaller
machine `--train-method xattn` exercises the same code paths with a small trainable set.

`--model sdxl`: the SDXL base architecture instead (benchmarks/sdxl_models.build_sdxl_random: UNet 2.57B, both text
towers, VAE, Euler; two text encoders, the packed conditioning, both encoders' rows in the inversions). Its fp32
weights alone are 12.9 GiB (UNet 9.6, text encoders 3.05, VAE 0.3), so on a 23 GiB machine neither noxattn (+ 22.6 GiB
of gradients and AdamW moments + 7.5 GiB teacher copy: `benchmarks/memory_plan.py`) nor xattn (+ 8.1 GiB, 21 GiB
before activations) fits; `--train-method xattn --lora-rank 4` (a rank-4 LoRA on the cross-attention modules, 3.1M
trainable parameters: the same Trainer, plus the LoRA path) leaves room for the activations. The trainer phases'
adapter is removed (`unet.unload_lora()`) before `train` adds its own. SDXL's default 1024 px (128x128 latents)
makes a step several minutes on a 2-core CPU: `--resolution 512` runs the same architecture on 64x64 latents (time
ids (512, 512, 0, 0, 512, 512)).

    python benchmarks/smoke_full_size.py --threads 1 --json /tmp/smoke.json       # full size, both precisions
    python benchmarks/smoke_full_size.py --model sdxl --resolution 512 --train-method xattn --lora-rank 4 \
        --precisions no --threads 1 --json /tmp/smoke-sdxl.json                   # full-size SDXL on 23 GiB
    python benchmarks/smoke_full_size.py --tiny --phases erase generate           # seconds, to check the script
    python benchmarks/smoke_full_size.py --tiny --model sdxl                      # tiny random SDXL
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from bench_train import build_sd14_random, build_tiny, memory_plan, script_logging, write_images
from recare.io import write_json_atomic
from sdxl_models import build_sdxl_random

logger = logging.getLogger("smoke_full_size")

PHASES = ("erase", "inversion", "stage2", "train", "cce", "careset", "generate")
PRECISIONS = {"no": "fp32", "bf16": "bf16"}
try:
    from recare.models.acceleration import COMPILE_MODES
except ImportError:  # a version without compile support: --compile is then ignored with a warning
    COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
CARE_WORDS = ["person", "woman", "man", "girl", "body", "skin"]
MODELS = {"sd14": ("SD v1.4 architecture, random weights", build_sd14_random, 512),
          "sdxl": ("SDXL base architecture, random weights", build_sdxl_random, 1024)}
"""--model: (name, builder of the full-size random components, default image side in pixels)."""


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM, VmSize), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB (lifetime peak)


class PeakMemory:
    """Peak RSS (MiB) of this process inside a `with` block, and peak CUDA memory (GiB) on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_mib: float | None = None
        self.start_rss_mib: float | None = None
        self.cuda_gib: float | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        self._exact = _reset_high_water_mark()
        self.method = "VmHWM after clear_refs" if self._exact else "20 ms sampler"
        self._samples = [_rss_mib()]
        self.start_rss_mib = self._samples[0]
        if not self._exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._samples.append(_rss_mib())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self._exact:
            self.rss_mib = (_status_kib("VmHWM") or 0) / 1024
        else:
            self._stop.set()
            self._thread.join()
            self.rss_mib = max(self._samples)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc), so the next phase starts low."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def cap_address_space(extra_gib: float) -> float | None:
    """Limit this process's address space to what it maps now plus `extra_gib` (RLIMIT_AS); the cap in GiB.

    An allocation past it fails with a Python exception (torch: "DefaultCPUAllocator: can't allocate memory")
    instead of waking the kernel's out-of-memory killer. Only for CPU runs: CUDA reserves huge address ranges.
    """
    size_kib = _status_kib("VmSize")
    if size_kib is None or extra_gib <= 0:
        return None
    cap = int(size_kib * 1024 + extra_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap / 2**30


# ----------------------------------------------------------------------------- the phases


@dataclasses.dataclass
class Context:
    """What the phases of one precision share (one child process)."""

    args: argparse.Namespace
    precision: str
    device: torch.device
    workdir: Path
    components: Any = None
    images: list[Path] = dataclasses.field(default_factory=list)
    trainer: Any = None

    @property
    def resolution(self) -> int:
        return self.components.image_size


def build_components(ctx: Context) -> None:
    """The components (--model at full size, or tiny SD), at --resolution, and the random target images."""
    args = ctx.args
    if args.tiny:
        from recare.models.tiny import build_tiny_sdxl

        ctx.components = build_tiny(str(ctx.device)) if args.model == "sd14" else build_tiny_sdxl(0).to(ctx.device)
    else:
        ctx.components = MODELS[args.model][1](str(ctx.device))
    if not args.tiny and args.resolution and args.resolution != ctx.components.image_size:
        if args.resolution % 64:
            raise SystemExit(f"--resolution must be a multiple of 64, got {args.resolution}")
        ctx.components.unet.register_to_config(sample_size=args.resolution // ctx.components.vae_scale_factor)
    ctx.images = write_images(ctx.workdir / "train-images", args.images, ctx.resolution, seed=0)


def train_config(ctx: Context, placeholder: str):
    """A TrainConfig of the real recipe with every stage `--steps` long and a 1-step partial trajectory."""
    from recare.train.config import TrainConfig
    from recare.train.inversion import InversionConfig

    args, steps = ctx.args, ctx.args.steps
    extra = {}
    if "compile" in {f.name for f in dataclasses.fields(TrainConfig)}:
        extra["compile"] = args.compile or "off"
    elif args.compile:
        logger.warning("TrainConfig has no 'compile' field in this version: --compile %s ignored", args.compile)
    inversion = InversionConfig(steps=steps, resolution=ctx.resolution, mixed_precision=ctx.precision)
    return TrainConfig(method="recare", train_method=args.train_method, lora_rank=args.lora_rank, rounds=1,
                       erase_iterations=steps,
                       stage2_iterations=steps, erase_set_tokens=1, stop_range=(1, 1), checkpoint_every=0,
                       mixed_precision=ctx.precision, placeholder_template=placeholder, inversion=inversion, **extra)


def _careset():
    from recare.careset.artifact import CareSet

    return CareSet.from_words("nudity", CARE_WORDS, "nudity")


def _trainer(ctx: Context):
    """One Trainer for the erase, inversion and stage-2 phases (as bench_train drives it)."""
    if ctx.trainer is None:
        from recare.train.state import run_identity
        from recare.train.trainer import Trainer

        config = train_config(ctx, "<smoke-{}>")
        careset = _careset()
        identity = run_identity(ctx.components, config, careset, ctx.images)
        ctx.trainer = Trainer(ctx.components, config, ctx.workdir / "trainer", ctx.device, careset, ctx.images,
                              identity, {}, progress=False)
    return ctx.trainer


def _run_trainer_phase(ctx: Context, kind: str, round_index: int) -> dict:
    from recare.train.trainer import Phase

    trainer = _trainer(ctx)
    trainer.state.step = 0
    trainer.run_phase(Phase(kind, round_index, ctx.args.steps))
    trainer.flush()  # the losses' host sync and their finiteness check, as the real loop does
    last = trainer.state.losses[-1] if trainer.state.losses else None
    return {"last_loss": last[3] if last else None}


def phase_erase(ctx: Context) -> dict:
    return _run_trainer_phase(ctx, "erase", 1)


def phase_inversion(ctx: Context) -> dict:
    out = _run_trainer_phase(ctx, "inversion", 1)
    return {**out, "learned_tokens": list(ctx.trainer.state.learned_tokens)}


def phase_stage2(ctx: Context) -> dict:
    return _run_trainer_phase(ctx, "stage2", 0)


def phase_train(ctx: Context) -> dict:
    from recare.train.run import train

    ctx.trainer = None  # its copies of the parameters would sit beside the new run's
    gc.collect()
    if getattr(ctx.components.unet, "peft_config", None):  # the trainer phases' LoRA adapter: back to stock modules
        ctx.components.unet.unload_lora()
    out = ctx.workdir / "train-run"
    try:
        result = train(ctx.components, train_config(ctx, "<smoke-e2e-{}>"), out, careset=_careset(),
                       images=ctx.images, device=ctx.device, progress=False)
        written = sorted(p.name for p in out.iterdir())
    finally:
        shutil.rmtree(out, ignore_errors=True)  # unet.safetensors alone is 3.4 GB at full size
    return {"complete": result.complete, "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
            "written": written}


def phase_cce(ctx: Context) -> dict:
    from recare.attacks.cce import CceConfig, learn_cce_token
    from recare.train.inversion import InversionConfig

    held_out = write_images(ctx.workdir / "cce-images", ctx.args.images, ctx.resolution, seed=1)
    inversion = InversionConfig(steps=ctx.args.steps, resolution=ctx.resolution, mixed_precision=ctx.precision)
    token = learn_cce_token(ctx.components, held_out, ctx.workdir / "cce", CceConfig(inversion=inversion),
                            device=ctx.device, progress=False)
    return {"token": token.token, "mean_final_loss": token.mean_final_loss}


def phase_careset(ctx: Context) -> dict:
    from recare.careset.algorithm import top_k_candidates
    from recare.careset.build import careset_from_features, check_reference_word, encode_image_inputs
    from recare.careset.config import CareSetConfig
    from recare.careset.vocab import Vocabulary, encode_texts_by_length, vocabulary_entries
    from recare.models.tiny import build_clip_vit_b32, build_tiny_clip

    args = ctx.args
    clip = build_tiny_clip(seed=0) if args.tiny else build_clip_vit_b32(seed=0)
    clip.model.to(ctx.device, torch.bfloat16 if ctx.precision == "bf16" else torch.float32)
    rng = np.random.default_rng(2)
    side = ctx.resolution
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
              for _ in range(args.careset_images)]
    features = encode_image_inputs(clip, images, batch_size=len(images), progress=False)
    words, tokens, texts = vocabulary_entries(clip.tokenizer, "word")
    rows = sorted(random.Random(0).sample(range(len(texts)), min(args.careset_vocab, len(texts))))
    subset = [texts[i] for i in rows]
    vocab = Vocabulary(mode="word", words=[words[i] for i in rows], tokens=[tokens[i] for i in rows], texts=subset,
                       features=encode_texts_by_length(clip, subset, batch_size=len(subset)))
    config = CareSetConfig(concept_type="nudity", top_k=min(50, len(vocab)))
    distinct = top_k_candidates(features, vocab.features, config.top_k, 1).n_distinct
    config = dataclasses.replace(config, top_n=min(config.top_n, distinct))  # random weights: few distinct tokens
    careset = careset_from_features(clip, features, vocab, check_reference_word(clip, "nudity"), config)
    return {"images": len(images), "vocabulary_entries": len(vocab), "candidates": config.top_n,
            "care_words": len(careset.words), "feature_dtype": str(features.dtype)}


def phase_generate(ctx: Context) -> dict:
    from recare.generate.images import GenerationConfig, generate_images
    from recare.generate.prompts import PromptJob

    ctx.trainer = None
    gc.collect()
    if ctx.precision == "bf16":  # generation's precision is the weights' dtype (last phase: converted in place)
        ctx.components.to(dtype=torch.bfloat16)
    jobs = [PromptJob("a photo of a person", 0, "00000")]
    config = GenerationConfig(num_inference_steps=ctx.args.generate_steps, batch_size=1)
    paths = generate_images(ctx.components, jobs, ctx.workdir / "generated", config, ctx.device)
    with Image.open(paths[0]) as image:
        size = image.size
    return {"image_size": list(size), "weights_dtype": str(ctx.components.unet.dtype),
            "steps": config.num_inference_steps}


PHASE_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "erase": phase_erase, "inversion": phase_inversion, "stage2": phase_stage2, "train": phase_train,
    "cce": phase_cce, "careset": phase_careset, "generate": phase_generate,
}


# ----------------------------------------------------------------------------- child process


class Progress:
    """JSON lines to the parent: a 'start' and an 'end' record per phase, flushed to disk at once."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def timed(name: str, precision: str, device: torch.device, progress: Progress, run: Callable[[], dict | None]) -> dict:
    """Run one phase: seconds, peak memory, outcome; an exception becomes an 'error' row with its traceback."""
    progress.write({"event": "start", "phase": name, "precision": precision})
    logger.info("[%s] %s ...", PRECISIONS[precision], name)
    row: dict[str, Any] = {"event": "end", "phase": name, "precision": precision}
    memory = PeakMemory(device)
    start = time.perf_counter()
    try:
        with memory:
            if os.environ.get("SMOKE_TEST_KILL_PHASE") == name:  # tests the parent's recovery from a dead child
                os.kill(os.getpid(), 9)
            details = run() or {}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        row.update(status="ok", details=details)
    except Exception as err:  # noqa: BLE001 - a crash is the finding: record it and go on with the next phase
        row.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        del err
    row.update(seconds=round(time.perf_counter() - start, 2), peak_rss_mib=round(memory.rss_mib or 0.0, 1),
               start_rss_mib=round(memory.start_rss_mib or 0.0, 1), rss_method=memory.method)
    if memory.cuda_gib is not None:
        row["peak_cuda_gib"] = round(memory.cuda_gib, 3)
    release_memory()
    level = logging.INFO if row["status"] == "ok" else logging.ERROR
    logger.log(level, "[%s] %s: %s in %.1f s, peak RSS %.0f MiB%s", PRECISIONS[precision], name, row["status"],
               row["seconds"], row["peak_rss_mib"], f"\n{row['traceback']}" if row["status"] == "error" else "")
    progress.write(row)
    return row


def run_precision_here(args: argparse.Namespace, precision: str, phases: list[str], progress: Progress) -> list[dict]:
    """All `phases` of one precision in this process (the child's body); the rows."""
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"smoke-{precision}-", dir=args.workdir) as tmp:
        ctx = Context(args, precision, device, Path(tmp))
        build = timed("build", precision, device, progress, lambda: build_components(ctx) or {
            "unet_parameters_M": round(sum(p.numel() for p in ctx.components.unet.parameters()) / 1e6, 1),
            "image_size": ctx.resolution})
        rows.append(build)
        if build["status"] != "ok":
            return rows
        for name in phases:
            rows.append(timed(name, precision, device, progress, lambda name=name: PHASE_FUNCTIONS[name](ctx)))
        ctx.trainer = ctx.components = None
    return rows


def child_main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.memory_limit_gib:
        cap = cap_address_space(args.memory_limit_gib)
        logger.info("address space capped at %.1f GiB (now mapped + %.1f GiB)", cap or 0, args.memory_limit_gib)
    run_precision_here(args, args.child, args.phases, Progress(args.progress))
    return 0


# ----------------------------------------------------------------------------- parent


def _child_command(args: argparse.Namespace, precision: str, phases: list[str], progress: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", precision, "--progress", str(progress),
               "--device", args.device, "--model", args.model, "--resolution", str(args.resolution),
               "--steps", str(args.steps),
               "--generate-steps", str(args.generate_steps), "--images", str(args.images),
               "--careset-images", str(args.careset_images), "--careset-vocab", str(args.careset_vocab),
               "--train-method", args.train_method, "--lora-rank", str(args.lora_rank),
               "--memory-limit-gib", str(args.memory_limit_gib),
               "--phases", *phases]
    if args.workdir:
        command += ["--workdir", args.workdir]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.compile:
        command += ["--compile", args.compile]
    if args.tiny:
        command.append("--tiny")
    return command


def _read_progress(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (the kernel's out-of-memory killer?)" if -code == signal.SIGKILL else ""
        return f"child killed by {name}{hint}"
    return f"child exited with status {code}"


def run_precision_in_children(args: argparse.Namespace, precision: str, phases: list[str]) -> list[dict]:
    """Run the phases in child processes; a phase that kills its child is recorded and the rest run in a new one."""
    rows: list[dict] = []
    remaining = list(phases)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    while True:
        with tempfile.TemporaryDirectory(prefix="smoke-progress-") as tmp:
            progress = Path(tmp) / "progress.jsonl"
            code = subprocess.run(_child_command(args, precision, remaining, progress), env=env).returncode
            events = _read_progress(progress)
        ended = [e for e in events if e["event"] == "end"]
        rows += ended
        done = {e["phase"] for e in ended}
        open_phases = [e["phase"] for e in events if e["event"] == "start" and e["phase"] not in done]
        if code == 0 and not open_phases:
            return rows
        crashed = open_phases[0] if open_phases else "build"
        logger.error("[%s] %s: %s", PRECISIONS[precision], crashed, _exit_reason(code))
        rows.append({"event": "end", "phase": crashed, "precision": precision, "status": "killed",
                     "error": _exit_reason(code), "seconds": None, "peak_rss_mib": None})
        if crashed == "build" or crashed not in remaining:
            rows += [{"event": "end", "phase": p, "precision": precision, "status": "not run",
                      "error": "build failed", "seconds": None, "peak_rss_mib": None}
                     for p in remaining if p not in done]
            return rows
        remaining = remaining[remaining.index(crashed) + 1:]
        if not remaining:
            return rows


def format_table(rows: list[dict]) -> list[str]:
    cuda = any("peak_cuda_gib" in r for r in rows)
    header = (f"{'phase':<10} {'precision':<9} {'status':<8} {'seconds':>8} {'RSS at start MiB':>17} "
              f"{'peak RSS MiB':>13}")
    header += f" {'peak CUDA GiB':>14}" if cuda else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        seconds = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-"
        start = f"{r['start_rss_mib']:.0f}" if r.get("start_rss_mib") else "-"
        line = f"{r['phase']:<10} {PRECISIONS[r['precision']]:<9} {r['status']:<8} {seconds:>8} {start:>17} {rss:>13}"
        if cuda:
            line += f" {r['peak_cuda_gib']:>14.2f}" if "peak_cuda_gib" in r else f" {'-':>14}"
        if r.get("error"):
            line += f"  {r['error'].splitlines()[0][:160]}"
        lines.append(line)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (also OMP/MKL in the children)")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=sorted(PRECISIONS),
                        help="'no' = fp32, 'bf16' = bf16 autocast (bf16 weights for generation and CLIP)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="phases to run, in order")
    parser.add_argument("--model", default="sd14", choices=sorted(MODELS),
                        help="full-size architecture: SD v1.4 or SDXL base (random weights)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels, a multiple of 64 (default: the model's, 512 SD v1.4, 1024 SDXL)")
    parser.add_argument("--steps", type=int, default=1, help="steps of each training / inversion phase")
    parser.add_argument("--generate-steps", type=int, default=1, help="denoising steps of the generation phase")
    parser.add_argument("--images", type=int, default=1, help="random target images (training slice; CCE held-out)")
    parser.add_argument("--careset-images", type=int, default=4, help="random images of the CARE-set batch")
    parser.add_argument("--careset-vocab", type=int, default=512, help="vocabulary entries of the CARE-set batch")
    parser.add_argument("--train-method", default="noxattn", help="UNet parameters trained (TrainConfig.train_method)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="TrainConfig.lora_rank: train a rank-r LoRA adapter on --train-method's modules (0: none)")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES,
                        help="TrainConfig.compile, where that field exists (default: 'off')")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="CPU only: cap each child's new allocations at this many GiB (an allocation past it "
                             "raises); default: available memory minus 1 GiB; 0: no cap")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random models (of --model's family) instead of full size (a quick check)")
    parser.add_argument("--in-process", action="store_true", help="run the precisions in this process (no children)")
    parser.add_argument("--workdir", default=None, help="folder for temporary files (default: the system's)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the setup here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = MODELS[args.model][2]
    if args.memory_limit_gib is None:
        available = available_memory_gib()
        args.memory_limit_gib = round(max(available - 1.0, 1.0), 1) if available else 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    script_logging()
    if args.child:
        return child_main(args)
    from recare.provenance import cpu_model

    tiny_name = "tiny random SD" if args.model == "sd14" else "tiny random SDXL"
    setup = {"model": tiny_name if args.tiny else MODELS[args.model][0],
             "device": args.device, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
             "torch": torch.__version__, "resolution": args.resolution, "steps": args.steps,
             "generate_steps": args.generate_steps, "train_method": args.train_method, "lora_rank": args.lora_rank,
             "compile": args.compile,
             "available_memory_gib": available_memory_gib(), "memory_limit_gib": args.memory_limit_gib}
    if not args.tiny:
        setup["memory_plan_gib_bf16"] = memory_plan(args.train_method, args.model, args.lora_rank)
    logger.info("smoke: %s", json.dumps(setup))
    start = time.perf_counter()
    rows = []
    for precision in args.precisions:
        if args.in_process:
            if args.threads:
                torch.set_num_threads(args.threads)
            rows += run_precision_here(args, precision, args.phases, Progress(None))
        else:
            rows += run_precision_in_children(args, precision, args.phases)
    for r in rows:
        r.pop("event", None)
    failed = [r for r in rows if r["status"] != "ok"]
    side = 32 if args.tiny else args.resolution
    print(f"\nsmoke ({setup['model']}, {args.device}, {side} px, {args.threads or 'default'} threads, "
          f"{time.perf_counter() - start:.0f} s in all):")
    print("\n".join(format_table(rows)))
    for r in failed:
        if r.get("traceback"):
            print(f"\n--- {r['phase']} ({PRECISIONS[r['precision']]}) ---\n{r['traceback']}")
    if args.json:
        write_json_atomic(args.json, {"setup": setup, "rows": rows, "failed": len(failed),
                                      "wall_s": round(time.perf_counter() - start, 1)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
