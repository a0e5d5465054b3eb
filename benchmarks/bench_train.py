"""Time the erasure-training stages (erase, textual inversion, stage 2) and extrapolate a full run.

Builds a RANDOMLY initialised model (costs do not depend on the weights; nothing is downloaded):
- default: the full SD v1.4 architecture from configs written below (UNet 860M, CLIP ViT-L/14
  text tower, VAE), meant for a GPU;
- --tiny: recare.tiny's tiny SD, to check the script end to end on a CPU.

Per stage it runs the library's own phase loop (recare.train.Trainer.run_phase) at two fixed
stop indices, fits "fixed + per sampling step" costs, and extrapolates to the paper defaults
(2 x 200 erase iterations, 2 x 3000 inversion steps, 200 stage-2 iterations, stop index
uniform in [1, 48], mean 24.5 sampling steps). Printed next to the paper (H100: 28.33 min,
24 GB) and PERF.md's measurement of the reference code (H200: 29.9 min, 27.2 GiB).

    python benchmarks/bench_train.py                 # full size, cuda if available
    python benchmarks/bench_train.py --tiny --device cpu
    python benchmarks/bench_train.py --compile auto --json train-compiled.json

--compile MODE sets TrainConfig.compile (where this version has that field) and compiles the UNet
around the timed phases as Trainer.run does (the warm-up and the first inversion run include the
compilation; the per-step costs are fitted from differences, so it drops out of them). The JSON holds
the ratios to PERF.md's reference figures ("ratios") and the targets (<= 5 min, <= 16 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from recare.careset.artifact import CareSet
from recare.io import write_json_atomic
from recare.models.loading import SDComponents
from recare.train.config import TrainConfig
from recare.train.inversion import InversionConfig
from recare.train.outputs import peak_memory
from recare.train.run import train
from recare.train.state import run_identity
from recare.train.trainer import Phase, Trainer

PAPER = {"minutes": 28.33, "memory": "24 GB", "card": "H100"}
PERF_REFERENCE = {"minutes": 29.9, "memory": "27.2 GiB", "card": "H200",
                  "erase_s_per_it": 1.36, "inversion_s_per_step": 0.149, "stage2_s_per_it": 1.80}
TARGETS = {"minutes": 5.0, "peak_gib": 16.0}
REFERENCE_PEAK_GIB = 27.2
FULL_RUN = {"rounds": 2, "erase_iterations": 200, "inversion_steps": 3000, "stage2_iterations": 200,
            "mean_stop": 24.5}

# SD v1.4 configs (CompVis/stable-diffusion-v1-4: unet/, text_encoder/, vae/ config.json).
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)


def build_sd14_random(device: str, seed: int = 0) -> SDComponents:
    """Full-size SD v1.4 architecture with random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from recare.models.tiny import SD14_SCHEDULER
    from recare.models.tokenizer import offline_clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD14_UNET)
        vae = AutoencoderKL(**SD14_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    scheduler = PNDMScheduler(**SD14_SCHEDULER)
    scheduler.register_to_config(clip_sample=False)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return SDComponents(offline_clip_tokenizer(), text_encoder, vae, unet, scheduler, source="<random-sd-v1-4>")


def build_sd14_meta() -> SDComponents:
    """The SD v1.4 architecture on the meta device (shapes only, no memory), for counting."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from recare.models.tiny import SD14_SCHEDULER
    from recare.models.tokenizer import offline_clip_tokenizer

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD14_UNET), AutoencoderKL(**SD14_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    return SDComponents(offline_clip_tokenizer(), text_encoder, vae, unet, PNDMScheduler(**SD14_SCHEDULER),
                        source="<meta-sd-v1-4>")


MODELS = ("sd14", "sdxl")


def build_meta(model: str) -> SDComponents:
    """`model` ('sd14' or 'sdxl', full size) on the meta device."""
    if model == "sd14":
        return build_sd14_meta()
    if model == "sdxl":
        from sdxl_models import build_sdxl_meta

        return build_sdxl_meta()
    raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")


def grad_path_weights(unet, cond_requires_grad: bool = False) -> int:
    """Weights of the UNet's Linear/Conv2d layers whose input needs a gradient in a backward pass, by one forward
    on the meta device (the trainable parameters as they are flagged; `cond_requires_grad`: the text conditioning
    needs one too, as in a textual inversion).

    Under bf16 autocast each of these layers saves its weight's bf16 CAST for the backward: new memory, held from
    the forward to the backward (with fp32 weights and no autocast the saved weight is the parameter itself).
    """
    from recare.models.conditioning import is_sdxl_unet, pooled_width

    total = 0

    def count(module, inputs, output):
        nonlocal total
        if inputs[0].requires_grad:
            total += module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.device("meta"), torch.enable_grad():
            config = unet.config
            sample = torch.zeros(1, config.in_channels, 8, 8)
            cond = torch.zeros(1, 77, config.cross_attention_dim, requires_grad=cond_requires_grad)
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled_width(unet)),
                                           "time_ids": torch.zeros(1, 6)}} if is_sdxl_unet(unet) else {}
            unet(sample, torch.tensor([500.0]), encoder_hidden_states=cond, **extra)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def memory_plan(train_method: str = "noxattn", model: str = "sd14", lora_rank: int = 0,
                precision: str = "bf16") -> dict[str, float]:
    """GiB of the tensors a full-size training run keeps, counted on the meta device (activations come on top).

    What recare.train.trainer.Trainer keeps on the device: the whole UNet in fp32 (master weights; with LoRA
    the frozen base plus the adapter), fp32 gradients and the two fp32 AdamW moments of the trainable
    tensors (train_method's selection, or the rank-`lora_rank` adapter on it), ONE teacher copy of the
    trainable tensors (steps.teacher_copy: bf16 under bf16 autocast, fp32 without; the original model in
    round 1 and stage 2, the previous round's weights in rounds >= 2), and the text encoder(s) and VAE in
    fp32. precision 'bf16' (autocast, the GPU default 'auto'): the original trainable values also wait as
    an fp32 master copy in HOST memory (Trainer.original_master, what stage 2 restarts from); 'no' (fp32):
    the device's fp32 teacher copy is that master copy. The textual inversion trains one embedding row
    per encoder (bytes). The benchmark's measured peak includes the activations.

    Not persistent but weight-sized, under bf16 autocast only: the bf16 casts of the weights that the student
    step's backward needs (grad_path_weights; with the trainable set flagged), held from its forward to its
    backward ("autocast_weight_casts_bf16"; "step_total" adds them), and those of an inversion step, whose
    gradient runs through the whole UNet's conditioning path and every Linear of the text encoder(s)
    ("inversion_autocast_weight_casts_bf16"). Found on a 23 GiB CPU, where bf16 steps of full-size SDXL needed
    more memory than fp32 ones (benchmarks/README.md).
    """
    from recare.models.params import add_lora, set_trainable

    if precision not in ("bf16", "no"):
        raise ValueError(f"unknown precision {precision!r}; choose 'bf16' or 'no'")
    components = build_meta(model)
    unet = components.unet
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    unet_parameters = count([unet])  # the stock UNet, before any adapter
    bf16 = precision == "bf16"
    inversion_casts = (grad_path_weights(unet, cond_requires_grad=True) + sum(
        m.weight.numel() for encoder in components.text_encoders for m in encoder.modules()
        if isinstance(m, nn.Linear))) if bf16 else 0
    if lora_rank:
        names = set(add_lora(unet, lora_rank, float(lora_rank), target=train_method))
        params = {name: p for name, p in unet.named_parameters() if name in names}
    else:
        params = dict(set_trainable(unet, train_method))
    step_casts = grad_path_weights(unet) if bf16 else 0
    trainable = sum(p.numel() for p in params.values())
    gib = 2.0 ** 30
    teacher_bytes = 2 if precision == "bf16" else 4
    plan = {"unet_fp32": 4 * count([unet]) / gib, "gradients_fp32": 4 * trainable / gib,
            "adamw_states_fp32": 8 * trainable / gib,
            f"teacher_copy_{'bf16' if precision == 'bf16' else 'fp32'}": teacher_bytes * trainable / gib,
            "text_encoders_fp32": 4 * count(components.text_encoders) / gib,
            "vae_fp32": 4 * count([components.vae]) / gib}
    plan["total"] = sum(plan.values())
    plan["text_encoder_and_vae_fp32"] = plan["text_encoders_fp32"] + plan["vae_fp32"]  # the earlier key
    plan["host_original_master_fp32"] = 4 * trainable / gib if bf16 else 0.0
    plan["autocast_weight_casts_bf16"] = 2 * step_casts / gib
    plan["step_total"] = plan["total"] + plan["autocast_weight_casts_bf16"]
    plan["inversion_autocast_weight_casts_bf16"] = 2 * inversion_casts / gib
    plan["unet_parameters_M"] = unet_parameters / 1e6
    plan["trainable_parameters_M"] = trainable / 1e6
    return plan


def build_tiny(device: str) -> SDComponents:
    from recare.models.tiny import build_tiny_sd

    return build_tiny_sd(seed=0).to(device)


def script_logging() -> None:
    """INFO messages of the script itself on stdout; recare, diffusers and transformers only from WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("recare", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_fields(mode: str | None) -> dict:
    """{"compile": mode} where TrainConfig has that field (None: leave the config's default)."""
    if mode is None:
        return {}
    if "compile" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise SystemExit(f"--compile {mode}: TrainConfig has no 'compile' field in this version")
    return {"compile": mode}


def compile_context(trainer: Trainer) -> contextlib.AbstractContextManager:
    """The UNet compiled as Trainer.run compiles it (run_phase alone runs eagerly); nothing when eager."""
    mode = getattr(trainer, "compile_mode", None)
    if mode is None:
        return contextlib.nullcontext()
    from recare.models.acceleration import compiled

    return compiled(trainer.unet, mode)


def time_phase(trainer: Trainer, phase: Phase, **config_changes) -> float:
    """Seconds for one phase run by the library loop, with temporary config changes."""
    trainer.config = dataclasses.replace(trainer.config, **config_changes)
    trainer.state.step = 0
    _sync(trainer.device)
    start = time.perf_counter()
    trainer.run_phase(phase)
    trainer.flush()  # host sync of the losses, as the real loop does every checkpoint
    _sync(trainer.device)
    return time.perf_counter() - start


def linear_fit(trainer: Trainer, kind: str, iterations: int, stops: tuple[int, int]) -> dict:
    """Per-iteration cost at two stop indices -> fixed + per-sampling-step cost."""
    per_it = {}
    for stop in stops:
        seconds = time_phase(trainer, Phase(kind, 1, iterations), stop_range=(stop, stop))
        per_it[stop] = seconds / iterations
        print(f"  {kind:<7} stop index {stop:>2}: {per_it[stop]:.3f} s/it", flush=True)
    a, b = stops
    per_step = (per_it[b] - per_it[a]) / (b - a)
    fixed = per_it[a] - a * per_step
    return {"s_per_it": per_it, "fixed_s": fixed, "per_sampling_step_s": per_step,
            "s_per_it_at_mean_stop": fixed + per_step * FULL_RUN["mean_stop"]}


def benchmark(components: SDComponents, device: torch.device, iterations: int, inversion_steps: tuple[int, int],
              stops: tuple[int, int], workdir: Path, compile_mode: str | None = None,
              on_progress: Callable[[dict], None] | None = None) -> dict:
    """The timed phases; `on_progress` gets the partial results after each stage (a timeout keeps them)."""
    image_size = components.image_size
    images = write_images(workdir / "images", 4, image_size)
    careset = CareSet.from_words("nudity", ["person", "woman", "man", "girl", "body", "skin"], "nudity")
    config = TrainConfig(method="recare", checkpoint_every=0, inversion=InversionConfig(resolution=image_size),
                         **compile_fields(compile_mode))
    identity = run_identity(components, config, careset, images)
    trainer = Trainer(components, config, workdir / "out", device, careset, images, identity, {}, progress=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_info = {"config": getattr(config, "compile", None),
                    "resolved": getattr(trainer, "compile_mode", None) or "off"}
    progress = (lambda part: on_progress({**part, "compile": compile_info, "partial": True})) if on_progress else None
    with compile_context(trainer):
        report = _timed_phases(trainer, config, iterations, inversion_steps, stops, progress)
    report["compile"] = compile_info
    return report


def _timed_phases(trainer: Trainer, config: TrainConfig, iterations: int, inversion_steps: tuple[int, int],
                  stops: tuple[int, int], progress: Callable[[dict], None] | None) -> dict:
    device = trainer.device
    start = time.perf_counter()
    progress = progress or (lambda part: None)
    warmup = 2 if getattr(trainer, "compile_mode", None) is None else 4  # compiled: compilation + graph recording
    print(f"warm-up ({warmup} erase iterations) ...", flush=True)
    time_phase(trainer, Phase("erase", 1, warmup), stop_range=(1, 1))
    print("stage-1 erase:", flush=True)
    erase = linear_fit(trainer, "erase", iterations, stops)
    progress({"erase": erase, "peak_memory": peak_memory(device)})
    print("textual inversion:", flush=True)
    inv_times = []
    for round_index, steps in enumerate(inversion_steps, start=1):
        inv = dataclasses.replace(config.inversion, steps=steps)
        inv_times.append(time_phase(trainer, Phase("inversion", round_index, steps), inversion=inv))
        print(f"  {steps} steps: {inv_times[-1]:.2f} s (incl. VAE encoding of the slice)", flush=True)
    inversion_step = (inv_times[1] - inv_times[0]) / (inversion_steps[1] - inversion_steps[0])
    print(f"  -> {inversion_step:.4f} s/step", flush=True)
    progress({"erase": erase, "inversion_s_per_step": inversion_step, "peak_memory": peak_memory(device)})
    print(f"stage 2 (after {warmup} warm-up iterations with the learned tokens):", flush=True)
    time_phase(trainer, Phase("stage2", 0, warmup), stop_range=(1, 1))
    stage2 = linear_fit(trainer, "stage2", iterations, stops)
    full = {
        "erase_min": FULL_RUN["rounds"] * FULL_RUN["erase_iterations"] * erase["s_per_it_at_mean_stop"] / 60,
        "inversion_min": FULL_RUN["rounds"] * FULL_RUN["inversion_steps"] * inversion_step / 60,
        "stage2_min": FULL_RUN["stage2_iterations"] * stage2["s_per_it_at_mean_stop"] / 60,
    }
    full["total_min"] = sum(full.values())
    return {"erase": erase, "inversion_s_per_step": inversion_step, "stage2": stage2, "full_run": full,
            "peak_memory": peak_memory(device), "benchmark_wall_s": time.perf_counter() - start}


def ratios(report: dict) -> dict:
    """The measurement beside PERF.md's reference figures and the targets (> 1: recare is faster / smaller)."""
    full, peak = report["full_run"], report["peak_memory"]["gib"]
    out = {
        "reference_minutes": PERF_REFERENCE["minutes"], "recare_minutes": full["total_min"],
        "speedup_vs_reference": PERF_REFERENCE["minutes"] / full["total_min"],
        "speedup_vs_paper": PAPER["minutes"] / full["total_min"],
        "erase_speedup": PERF_REFERENCE["erase_s_per_it"] / report["erase"]["s_per_it_at_mean_stop"],
        "inversion_speedup": PERF_REFERENCE["inversion_s_per_step"] / report["inversion_s_per_step"],
        "stage2_speedup": PERF_REFERENCE["stage2_s_per_it"] / report["stage2"]["s_per_it_at_mean_stop"],
        "peak_gib": peak, "peak_kind": report["peak_memory"]["kind"], "reference_peak_gib": REFERENCE_PEAK_GIB,
        "peak_vs_reference": peak / REFERENCE_PEAK_GIB, "target_peak_gib": TARGETS["peak_gib"],
        "peak_vs_target": peak / TARGETS["peak_gib"], "target_minutes": TARGETS["minutes"],
        "meets_time_target": full["total_min"] <= TARGETS["minutes"],
        "meets_memory_target": peak <= TARGETS["peak_gib"],
    }
    return out


def end_to_end(components: SDComponents, device: torch.device, workdir: Path, steps: int) -> dict:
    """A complete `train` run (all phases, outputs, checkpoints) at `steps` per stage."""
    images = write_images(workdir / "e2e-images", 4, components.image_size)
    careset = CareSet.from_words("nudity", ["person", "woman", "man", "girl", "body", "skin"], "nudity")
    config = TrainConfig(method="recare", erase_iterations=steps, stage2_iterations=steps, checkpoint_every=steps,
                         inversion=InversionConfig(steps=steps, resolution=components.image_size))
    start = time.perf_counter()
    result = train(components, config, workdir / "e2e", careset=careset, images=images, device=device,
                   progress=False)
    return {"steps_per_stage": steps, "wall_s": time.perf_counter() - start, "timings_s": result.timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random SD (CPU check) instead of full size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per timed erase/stage-2 phase")
    parser.add_argument("--inversion-steps", type=int, nargs=2, default=(5, 15), help="two inversion lengths")
    parser.add_argument("--stops", type=int, nargs=2, default=(1, 9), help="two fixed stop indices")
    parser.add_argument("--e2e-steps", type=int, default=5, help="steps per stage of the end-to-end run (--tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", default=None,
                        help="TrainConfig.compile ('off', 'auto', a torch.compile mode); default: the config's")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    components = build_tiny(args.device) if args.tiny else build_sd14_random(args.device)
    built = time.perf_counter() - start
    name = "tiny random SD" if args.tiny else "SD v1.4 architecture, random weights"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name} on {card} (built in {built:.1f} s); torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        header = {"model": name, "device": card, "torch": torch.__version__}

        def save_partial(part: dict) -> None:
            if args.json:
                write_json_atomic(args.json, {**header, **part})

        report = benchmark(components, device, args.iterations, tuple(args.inversion_steps), tuple(args.stops),
                           Path(tmp), args.compile, save_partial)
        if args.tiny:
            report["end_to_end"] = end_to_end(build_tiny(args.device), device, Path(tmp), args.e2e_steps)
    full = report["full_run"]
    print(f"\nExtrapolated full run at paper defaults on {card} ({name}):")
    print(f"  stage-1 erase  2 x 200 its : {full['erase_min']:7.2f} min  "
          f"({report['erase']['s_per_it_at_mean_stop']:.3f} s/it at mean stop 24.5)")
    print(f"  inversion   2 x 3000 steps : {full['inversion_min']:7.2f} min  "
          f"({report['inversion_s_per_step']:.4f} s/step)")
    print(f"  stage 2          200 its   : {full['stage2_min']:7.2f} min  "
          f"({report['stage2']['s_per_it_at_mean_stop']:.3f} s/it)")
    print(f"  total                      : {full['total_min']:7.2f} min; peak memory "
          f"{report['peak_memory']['gib']:.2f} GiB ({report['peak_memory']['kind']})")
    print(f"  paper ({PAPER['card']}): {PAPER['minutes']} min, {PAPER['memory']}; reference code per PERF.md "
          f"({PERF_REFERENCE['card']}): {PERF_REFERENCE['minutes']} min, {PERF_REFERENCE['memory']} "
          f"(erase {PERF_REFERENCE['erase_s_per_it']} s/it, inversion {PERF_REFERENCE['inversion_s_per_step']} s/step, "
          f"stage 2 {PERF_REFERENCE['stage2_s_per_it']} s/it); goal <= 5 min, 16 GiB")
    plan = memory_plan()
    print(f"  device-memory plan of a full-size noxattn run (bf16 autocast, before activations): "
          f"{plan['total']:.2f} GiB = UNet {plan['unet_fp32']:.2f} + grads {plan['gradients_fp32']:.2f} + AdamW "
          f"{plan['adamw_states_fp32']:.2f} + teacher copy {plan['teacher_copy_bf16']:.2f} + text encoder/VAE "
          f"{plan['text_encoder_and_vae_fp32']:.2f} ({plan['trainable_parameters_M']:.1f}M trainable); a step also "
          f"holds {plan['autocast_weight_casts_bf16']:.2f} GiB of bf16 weight casts for its backward "
          f"({plan['step_total']:.2f} GiB)")
    report["memory_plan_full_size_gib"] = plan
    report["ratios"] = ratio = ratios(report)
    print(f"  compile {report['compile']['resolved']}: {ratio['speedup_vs_reference']:.2f}x the reference code's "
          f"speed ({ratio['reference_minutes']} / {ratio['recare_minutes']:.2f} min; erase "
          f"{ratio['erase_speedup']:.2f}x, inversion {ratio['inversion_speedup']:.2f}x, stage 2 "
          f"{ratio['stage2_speedup']:.2f}x); peak {ratio['peak_gib']:.2f} GiB = {ratio['peak_vs_reference']:.2f} x "
          f"{REFERENCE_PEAK_GIB} GiB, {ratio['peak_vs_target']:.2f} x the {TARGETS['peak_gib']:.0f} GiB target; "
          f"targets: time {'MET' if ratio['meets_time_target'] else 'NOT MET'}, memory "
          f"{'MET' if ratio['meets_memory_target'] else 'NOT MET'}")
    if "end_to_end" in report:
        e2e = report["end_to_end"]
        print(f"  end-to-end train() with {e2e['steps_per_stage']} steps per stage: {e2e['wall_s']:.1f} s "
              f"{ {k: round(v, 2) for k, v in e2e['timings_s'].items()} }")
    if args.json:
        write_json_atomic(args.json, {"model": name, "device": card, "torch": torch.__version__, **report,
                                      "partial": False})
    return 0


if __name__ == "__main__":
    sys.exit(main())
