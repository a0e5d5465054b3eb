"""Generation throughput: recare's generation code against a bare diffusers StableDiffusionPipeline.

Both sample the SAME randomly initialised components (default: the full SD v1.4 architecture of
bench_train.build_sd14_random, in fp16 on CUDA), with the model's own scheduler (PNDM), the same prompt,
resolution, step count, guidance and batch size, in the same process:

- bare:   diffusers.StableDiffusionPipeline(...)(prompt=[p] * batch, generator=one generator), PIL images
          in memory, nothing written;
- recare: recare.generate.generate_images (per-image generators, PNG files written atomically,
          manifest.json), a fresh output folder per round so nothing is skipped as already made.

After one warm-up batch of each, the two alternate for --rounds rounds of --images images; images/s is the
median over rounds, and the ratio recare / bare is the figure of merit (target >= 0.9). With
--recare-compile MODE ..., recare is measured once per GenerationConfig.compile mode (where that field
exists; the compiled warm-up includes the compilation). The JSON is rewritten after every measurement, so a
run stopped by a timeout still leaves what it measured.

    python benchmarks/bench_generate.py --json gen.json                   # full size, fp16, cuda
    python benchmarks/bench_generate.py --tiny --device cpu               # tiny random SD, CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import build_sd14_random, build_tiny, script_logging
from recare.io import write_json_atomic

logger = logging.getLogger("bench_generate")

PROMPT = "a photo of a person walking on a beach"
TARGET_RATIO = 0.9
PERF_REFERENCE = {"images_per_s": 3.18, "batch": 25, "card": "H200", "scheduler": "DDIM",
                  "note": "the reference code per PERF.md (fp16, 512 px, 50 steps)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_pipeline(components, scheduler_name: str):
    """A plain diffusers pipeline over the components (safety checker off, as recare's)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cls = DDIMScheduler if scheduler_name == "ddim" else type(components.scheduler)
    scheduler = cls.from_config(components.scheduler.config)
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_bare(pipe, device: torch.device, n: int, batch: int, steps: int, size: int, guidance: float) -> float:
    """Seconds for n images in batches of `batch`."""
    _sync(device)
    start = time.perf_counter()
    for first in range(0, n, batch):
        count = min(batch, n - first)
        pipe(prompt=[PROMPT] * count, generator=torch.Generator(device).manual_seed(first), height=size,
             width=size, num_inference_steps=steps, guidance_scale=guidance, output_type="pil")
    _sync(device)
    return time.perf_counter() - start


def generation_config(args: argparse.Namespace, compile_mode: str | None):
    from recare.generate.images import GenerationConfig

    extra = {}
    if compile_mode is not None:
        if "compile" not in {f.name for f in dataclasses.fields(GenerationConfig)}:
            raise SystemExit("GenerationConfig has no 'compile' field in this version; drop --recare-compile")
        extra["compile"] = compile_mode
    return GenerationConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size,
                            height=args.resolution, width=args.resolution, scheduler=args.scheduler, **extra)


def run_recare(components, config, device: torch.device, n: int, folder: Path, seed0: int) -> float:
    """Seconds for n images through recare.generate.generate_images into an empty folder."""
    from recare.generate.images import generate_images
    from recare.generate.prompts import PromptJob

    jobs = [PromptJob(PROMPT, seed0 + i, f"{i:05d}") for i in range(n)]
    _sync(device)
    start = time.perf_counter()
    paths = generate_images(components, jobs, folder, config, device)
    _sync(device)
    seconds = time.perf_counter() - start
    if len(paths) != n or not all(p.is_file() for p in paths):
        raise RuntimeError(f"generate_images made {sum(p.is_file() for p in paths)} of {n} images in {folder}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--tiny", action="store_true", help="tiny random SD (CPU check) instead of full size")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="weights dtype (default fp16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's, 512 full size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --tiny 2)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="default", choices=("default", "ddim"),
                        help="both sides: the model's own (PNDM) or DDIM (as PERF.md's reference figure)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call, both sides")
    parser.add_argument("--images", type=int, default=16, help="images per side and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    parser.add_argument("--recare-compile", nargs="+", default=None,
                        help="GenerationConfig.compile modes to measure recare with (default: 'off' where the "
                             "field exists)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here (after every measurement)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.tiny else 50
    if args.dtype is None:
        args.dtype = "fp16" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    script_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    from recare.generate.images import GenerationConfig

    modes: list[str | None] = list(args.recare_compile or [])
    if not modes:
        modes = ["off"] if "compile" in {f.name for f in dataclasses.fields(GenerationConfig)} else [None]
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    components = build_tiny(args.device) if args.tiny else build_sd14_random(args.device)
    components.to(dtype=dtype)
    args.resolution = args.resolution or components.image_size
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = "tiny random SD" if args.tiny else "SD v1.4 architecture, random weights"
    report = {"model": model, "device": card, "torch": torch.__version__, "dtype": args.dtype,
              "resolution": args.resolution, "steps": args.steps, "guidance": args.guidance,
              "batch_size": args.batch_size, "images_per_round": args.images, "rounds": args.rounds,
              "scheduler": args.scheduler, "build_s": round(time.perf_counter() - start, 1),
              "target_ratio": TARGET_RATIO, "perf_md_reference": PERF_REFERENCE, "bare": {}, "recare": {}}
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass

    def save() -> None:
        if args.json:
            write_json_atomic(args.json, report)

    logger.info("%s on %s, %s, %d px, %d steps, batch %d, %d images x %d rounds per side", model, card, args.dtype,
                args.resolution, args.steps, args.batch_size, args.images, args.rounds)
    pipe = bare_pipeline(components, args.scheduler)
    report["scheduler_class"] = type(pipe.scheduler).__name__
    shape = (args.batch_size, args.steps, args.resolution, args.guidance)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        warm = run_bare(pipe, device, args.batch_size, *shape)
        report["bare"]["warmup_s"] = round(warm, 2)
        logger.info("bare warm-up batch: %.2f s", warm)
        configs = {mode: generation_config(args, mode) for mode in modes}
        for mode, config in configs.items():
            key = mode or "default"
            warm = run_recare(components, config, device, args.batch_size, Path(tmp) / f"warm-{key}", 10_000)
            report["recare"][key] = {"warmup_s": round(warm, 2), "images_per_s": []}
            logger.info("recare (compile %s) warm-up batch: %.2f s", key, warm)
            save()
        bare_rates = []
        for r in range(args.rounds):
            seconds = run_bare(pipe, device, args.images, *shape)
            bare_rates.append(args.images / seconds)
            logger.info("round %d: bare %.3f images/s", r + 1, bare_rates[-1])
            for mode, config in configs.items():
                key = mode or "default"
                seconds = run_recare(components, config, device, args.images, Path(tmp) / f"r{r}-{key}", 20_000)
                report["recare"][key]["images_per_s"].append(args.images / seconds)
                logger.info("round %d: recare (compile %s) %.3f images/s", r + 1, key, args.images / seconds)
            report["bare"]["images_per_s"] = bare_rates
            _summarise(report)
            save()
    _summarise(report)
    save()
    bare = report["bare"]["median_images_per_s"]
    print(f"\nGeneration throughput ({model}, {card}, {args.dtype}, {args.resolution} px, {args.steps} steps "
          f"{report['scheduler_class']}, batch {args.batch_size}):")
    print(f"  bare diffusers pipeline : {bare:8.3f} images/s")
    for key, entry in report["recare"].items():
        print(f"  recare (compile {key:<5}) : {entry['median_images_per_s']:8.3f} images/s  ratio "
              f"{entry['ratio_vs_bare']:.3f} (target >= {TARGET_RATIO}) -> "
              f"{'MET' if entry['ratio_vs_bare'] >= TARGET_RATIO else 'NOT MET'}")
    print(f"  PERF.md reference code: {PERF_REFERENCE['images_per_s']} images/s at batch {PERF_REFERENCE['batch']} "
          f"({PERF_REFERENCE['card']})")
    return 0


def _summarise(report: dict) -> None:
    rates = report["bare"].get("images_per_s") or []
    if not rates:
        return
    bare = statistics.median(rates)
    report["bare"]["median_images_per_s"] = bare
    for entry in report["recare"].values():
        if entry["images_per_s"]:
            entry["median_images_per_s"] = statistics.median(entry["images_per_s"])
            entry["ratio_vs_bare"] = entry["median_images_per_s"] / bare
            entry["meets_target"] = entry["ratio_vs_bare"] >= TARGET_RATIO


if __name__ == "__main__":
    sys.exit(main())
