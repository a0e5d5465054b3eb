"""`recare synthetic build`: train the world's detector, CLIP and text-to-image model from a seed.

Order: ground-truth detector -> CLIP -> (save, reload) -> UNet on the RELOADED CLIP's text tower
(the stored, fp16-rounded weights the T2I model will be used with) -> (save, reload) ->
measurements on the reloaded models. Everything goes into a temporary folder that replaces
`out` only when the build succeeds. Output layout:

    out/clip/        CLIPModel + CLIPProcessor     -> recare.models.load_image_text_model(out/"clip")
    out/sd/          diffusers SD pipeline folder  -> recare.models.load_sd(out/"sd")
    out/detector/    ground-truth classifier       -> recare.world.detectors.load_detector(out/"detector")
    out/build_report.json   configs, machine, times, measurements, SHA-256 of every weight file's tensors,
                            and under "world" what the demo reads: T, C, prompts, initializer, STEREO
                            anchors, CARE labels, rates (recare.world.definition)

The world's concepts come from `BuildConfig.spec`: any texture T and shape C of the renderer
(`recare synthetic build --target T --care C`); the committed world is T = "dotted", C = "circle".

Same seed, same machine, same thread count -> the same weights (CPU kernels are deterministic
for a fixed thread count; other thread counts or CPUs may round differently).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from recare.errors import RecareError
from recare.io import write_json_atomic
from recare.models.loading import parse_dtype, write_model_note
from recare.world.clip_train import ClipConfig, measure_clip, train_clip
from recare.world.definition import WORLD_SECTION, world_concepts
from recare.world.detectors import DetectorConfig, load_detector, measure_accuracy, save_detector, train_detector
from recare.world.render import (
    WorldSpec,
    caption_scenes,
    check_single_tokens,
    concept_labels,
    cooccurrence,
    curve_prompts,
    sample_scenes,
    vocabulary,
)
from recare.world.t2i_train import T2IConfig, assemble_sd, measure_t2i, time_unet_steps, train_unet

logger = logging.getLogger(__name__)

REPORT_NAME = "build_report.json"
REPORT_VERSION = 1


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on; written into the build report."""

    seed: int = 0  # base seed: detector seed+0, CLIP seed+1, UNet seed+2, measurements fixed
    spec: WorldSpec = field(default_factory=WorldSpec)  # the world
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # ground-truth classifier
    clip: ClipConfig = field(default_factory=ClipConfig)  # the world's CLIP
    t2i: T2IConfig = field(default_factory=T2IConfig)  # the world's text-to-image UNet
    eval_images: int = 2000  # fresh renders for the detector and CLIP measurements
    probe_images: int = 64  # generated images per probe prompt
    probe_steps: int = 50  # denoising steps of the probe generations (the pipeline's PNDM)
    probe_guidance: float = 7.5  # classifier-free guidance of the probe generations
    curve_every: int = 1000  # UNet steps between learning-curve probes (0: none)
    curve_images: int = 16  # generated images per prompt in a learning-curve probe
    curve_steps: int = 20  # denoising steps in a learning-curve probe
    threads: int = 1  # torch CPU threads (1 is fastest on a shared 2-core CPU)
    weights_dtype: str = "float16"  # storage dtype of CLIP, text encoder and UNet ("float16" or "float32")

    def seeded(self) -> "BuildConfig":
        """Sub-configs with seeds derived from `seed`."""
        return replace(self, detector=replace(self.detector, seed=self.seed),
                       clip=replace(self.clip, seed=self.seed + 1), t2i=replace(self.t2i, seed=self.seed + 2))

    @classmethod
    def fast(cls, seed: int = 0) -> "BuildConfig":
        """A few steps of everything: exercises the code path in seconds (models are untrained)."""
        return cls(seed=seed, detector=DetectorConfig(steps=5, batch_size=16),
                   clip=ClipConfig(steps=5, batch_size=16, warmup=2),
                   t2i=T2IConfig(steps=3, batch_size=4, warmup=1, compile=False), eval_images=64,
                   probe_images=2, probe_steps=3, curve_every=2, curve_images=2, curve_steps=2)


# ----------------------------------------------------------------------------- digests and machine


def tensor_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a safetensors file's tensors: sorted names, dtypes, shapes and raw bytes."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as handle:
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weight_digests(folder: str | os.PathLike) -> dict[str, str]:
    """tensor_digest of every .safetensors file under folder, keyed by its relative POSIX path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): tensor_digest(p) for p in sorted(folder.rglob("*.safetensors"))}


def machine_info() -> dict[str, Any]:
    """CPU, load, library versions and thread count: the context of the recorded times."""
    import diffusers
    import transformers

    from recare.provenance import cpu_model

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


def measure_grammar(spec: WorldSpec, n: int, seed: int) -> dict[str, Any]:
    """Co-occurrence rates and how often captions name the shape, with and without the target."""
    generator = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, generator, spec)
    captions = caption_scenes(scenes, generator, spec)
    is_target = [scenes.labels(i)["texture"] == spec.target for i in range(n)]
    names_shape = ["shape" in c.named for c in captions]
    names_target = ["texture" in c.named for c, t in zip(captions, is_target) if t]

    def share(flags: list[bool]) -> float:
        return sum(flags) / max(1, len(flags))

    return {"n": n, "seed": seed, **cooccurrence(scenes, spec),
            "shape_named_given_target": share([s for s, t in zip(names_shape, is_target) if t]),
            "shape_named_otherwise": share([s for s, t in zip(names_shape, is_target) if not t]),
            "target_named_given_target": share(names_target),
            "examples": [c.text for c in captions[:12]]}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- saving

WORLD_MODEL_NOTE = ("recare's synthetic-world model, trained on 16x16 procedural images, NOT Stable Diffusion: "
                    "the numbers hold in that world only.")
"""The note every results file and report of the world model carries (recare.models.MODEL_NOTE_FILE)."""


def save_clip(clip: Any, folder: Path, dtype: torch.dtype) -> None:
    """CLIPModel (in `dtype`) and its processor, readable by load_image_text_model."""
    model = copy.deepcopy(clip.model).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    clip.processor.save_pretrained(folder)


def save_sd_folder(components: Any, folder: Path, dtype: torch.dtype) -> None:
    """The SD pipeline folder: text encoder and UNet stored in `dtype`, the identity VAE in float32.

    The text encoder's config says float32 whatever the storage dtype, so that stock
    `StableDiffusionPipeline.from_pretrained(folder)` loads every component in float32 (transformers
    follows the config's dtype, diffusers upcasts to float32) and runs without a dtype argument.
    """
    stored = replace(components, text_encoder=copy.deepcopy(components.text_encoder).to(dtype),
                     unet=copy.deepcopy(components.unet).to(dtype))
    stored.pipeline().save_pretrained(folder, safe_serialization=True)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    write_json_atomic(config_path, config)
    write_model_note(folder, WORLD_MODEL_NOTE)


# ----------------------------------------------------------------------------- the build


def build_world(out: str | os.PathLike, config: BuildConfig = BuildConfig(), overwrite: bool = False) -> dict[str, Any]:
    """Train and measure everything, write `out` (see the module docstring); returns the report."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RecareError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    config = config.seeded()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        with torch_threads(config.threads):
            report = _build(work, config)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return report


def _build(work: Path, config: BuildConfig) -> dict[str, Any]:
    """The three stages into `work`, then digests, sizes and the report."""
    from recare.models.tokenizer import offline_clip_tokenizer

    spec = config.spec
    report: dict[str, Any] = {"format_version": REPORT_VERSION, "config": asdict(config),
                              "machine": machine_info(), "labels": concept_labels(),
                              "word_token_ids": check_single_tokens(offline_clip_tokenizer(), vocabulary(spec)),
                              "grammar": measure_grammar(spec, 20000, seed=7), "times_s": {},
                              WORLD_SECTION: asdict(world_concepts(spec))}
    start = time.perf_counter()
    detector = _detector_stage(work, config, report)
    clip = _clip_stage(work, config, report)
    _t2i_stage(work, config, report, clip, detector)
    report["times_s"]["total"] = time.perf_counter() - start
    report["sha256"] = weight_digests(work)
    report["sizes_bytes"] = {p.relative_to(work).as_posix(): p.stat().st_size
                             for p in sorted(work.rglob("*")) if p.is_file()}
    write_json_atomic(work / REPORT_NAME, report)
    return report


def _detector_stage(work: Path, config: BuildConfig, report: dict[str, Any]) -> Any:
    """Train, save, reload and measure the ground-truth classifier."""
    tick = time.perf_counter()
    detector = train_detector(config.detector, config.spec)
    report["times_s"]["detector_train"] = time.perf_counter() - tick
    save_detector(detector, work / "detector", config.detector, config.spec)
    detector = load_detector(work / "detector")
    report["detector"] = {"accuracy_clean": measure_accuracy(detector, config.eval_images, 11, config.spec),
                          "accuracy_augmented": measure_accuracy(detector, config.eval_images, 12, config.spec,
                                                                 config.detector),
                          "eval_images": config.eval_images, "eval_seeds": {"clean": 11, "augmented": 12},
                          "parameters": sum(p.numel() for p in detector.parameters())}
    logger.info("detector: %s", report["detector"]["accuracy_clean"])
    return detector


def _clip_stage(work: Path, config: BuildConfig, report: dict[str, Any]) -> Any:
    """Train the CLIP, save it in the storage dtype, reload it (the T2I trains on the stored weights)."""
    from recare.models.loading import load_image_text_model

    tick = time.perf_counter()
    clip = train_clip(config.clip, config.spec)
    report["times_s"]["clip_train"] = time.perf_counter() - tick
    save_clip(clip, work / "clip", parse_dtype(config.weights_dtype))
    clip = load_image_text_model(work / "clip")
    report["clip"] = {**measure_clip(clip, config.spec, n=config.eval_images, seed=13),
                      "parameters": sum(p.numel() for p in clip.model.parameters())}
    logger.info("CLIP zero-shot: %s", report["clip"]["zero_shot_raw"])
    return clip


def _t2i_stage(work: Path, config: BuildConfig, report: dict[str, Any], clip: Any, detector: Any) -> None:
    """Train the UNet (with learning-curve probes), save the SD folder, reload it and probe it."""
    from recare.models.loading import load_sd

    spec, curve = config.spec, []
    report["t2i_learning_curve"] = curve
    tick = time.perf_counter()
    probe = _curve_probe(clip, detector, spec, curve, config.curve_images, config.curve_steps)
    unet = train_unet(clip, config.t2i, spec, callback=probe, callback_every=config.curve_every or config.t2i.steps)
    report["times_s"]["unet_train"] = time.perf_counter() - tick
    save_sd_folder(assemble_sd(clip, unet, spec.image_size), work / "sd", parse_dtype(config.weights_dtype))
    components = load_sd(work / "sd")
    tick = time.perf_counter()
    report["t2i"] = {**measure_t2i(components, detector, spec, n=config.probe_images, seed=100,
                                   steps=config.probe_steps, guidance=config.probe_guidance),
                     "unet_parameters": sum(p.numel() for p in components.unet.parameters()),
                     "step_times_s": time_unet_steps(components)}
    report["times_s"]["t2i_measure"] = time.perf_counter() - tick


def _curve_probe(clip: Any, detector: Any, spec: WorldSpec, curve: list[dict[str, Any]], n: int, steps: int) -> Any:
    """A train_unet callback that appends detector rates of the EMA UNet (n images, `steps` steps)."""
    def probe(step: int, unet: Any) -> None:
        components = assemble_sd(clip, unet, spec.image_size)
        rates = measure_t2i(components, detector, spec, curve_prompts(spec), n=n, seed=100, steps=steps)["rates"]
        curve.append({"step": step, "rates": rates})
        logger.info("UNet step %d: %s", step, rates)

    return probe


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: times, accuracies, entanglement and probe rates."""
    text = report["clip"]["text_entanglement"]
    lines = [f"build time {report['times_s']['total']:.0f} s "
             f"(detector {report['times_s']['detector_train']:.0f}, CLIP {report['times_s']['clip_train']:.0f}, "
             f"UNet {report['times_s']['unet_train']:.0f})",
             f"detector accuracy (clean renders): {_fmt(report['detector']['accuracy_clean'])}",
             f"CLIP zero-shot (raw labels): {_fmt(report['clip']['zero_shot_raw'])}",
             f"CLIP retrieval: {_fmt(report['clip']['retrieval'])}",
             f"text entanglement cos(T,C) - cos(T,other shapes): {text['entanglement']:+.3f} "
             f"(controls {_fmt(text['control'])})",
             f"image entanglement (T word prefers T images on C, minus controls): "
             f"{report['clip']['image_entanglement']['entanglement']:+.3f}",
             "T2I probes (rate of T, rate of C):"]
    for prompt, rates in report["t2i"]["rates"].items():
        lines.append(f"  {prompt:<24} T {rates['target']:.2f}  C {rates['care']:.2f}")
    return "\n".join(lines)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())
