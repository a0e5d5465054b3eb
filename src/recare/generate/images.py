"""Image generation with resume and a manifest (method §1 target images, method §5 evaluation images).

Every image has its own `torch.Generator` seeded with its job's seed; a pipeline call gets one
generator per image, so the images do not depend on the batch size or on which images were
already made. The safety checker is OFF (method §1).

Output folder layout:
    out_dir/<job.name>.png ...   one file per job
    out_dir/manifest.json        what made them (see `build_manifest`)

Resume: a job is skipped when its file exists AND manifest.json lists it with the same prompt,
seed and guidance. A file that the manifest does not list (an interrupted run) is made again.
A manifest whose model or settings differ from the current ones raises RecareError: the folder
holds another run, and mixing the two would be silent corruption.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from recare.config import option
from recare.errors import RecareError
from recare.generate.prompts import PromptJob
from recare.io import IMAGE_EXTENSIONS, json_ready, read_json, save_image_atomic, write_json_atomic
from recare.models.acceleration import COMPILE_MODES, compiled, resolve_compile_mode
from recare.models.loading import SDComponents, has_safety_checker

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "recare-images/1"
SCHEDULERS = ("default", "ddim")
IMAGE_FORMATS = ("png", "jpg")
MANIFEST_SAVE_INTERVAL_S = 30.0  # rewrite manifest.json at most this often during a run (and at the end)

_safety_warning_given = False


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings; defaults are the reference's (method §1 and 5)."""

    num_inference_steps: int = 50  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance, for jobs without their own guidance
    batch_size: int = 4  # images per pipeline call (halved on running out of device memory); images do not change
    height: int | None = None  # pixels; None = the model's default (unet sample_size * VAE factor, 512 for SD v1.4)
    width: int | None = None  # pixels; None = the model's default
    scheduler: str = option("default", choices=SCHEDULERS)
    """"default" = the model's own scheduler (PNDM for SD v1.4), or "ddim" (eta 0)."""
    image_format: str = option("png", choices=IMAGE_FORMATS)
    """File extension of the images: "png" (lossless, default) or "jpg"."""
    compile: str = option("auto", choices=COMPILE_MODES)
    """torch.compile of the UNet while sampling: 'auto' ('reduce-overhead' on CUDA, off elsewhere), 'off', or a
    torch.compile mode (recare.models.acceleration). Compiled kernels may differ from eager ones in the last bits."""

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise RecareError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise RecareError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.scheduler not in SCHEDULERS:
            raise RecareError(f"unknown scheduler {self.scheduler!r}; choose one of {SCHEDULERS}")
        if self.compile not in COMPILE_MODES:
            raise RecareError(f"unknown compile mode {self.compile!r}; choose one of {list(COMPILE_MODES)}")
        if self.image_format not in IMAGE_FORMATS:
            raise RecareError(f"unknown image format {self.image_format!r}; choose one of {IMAGE_FORMATS}")
        for side in (self.height, self.width):
            if side is not None and side < 1:
                raise RecareError(f"height and width must be positive, got {self.height}x{self.width}")


def generate_images(
    components: SDComponents,
    jobs: Sequence[PromptJob],
    out_dir: str | os.PathLike,
    config: GenerationConfig = GenerationConfig(),
    device: str | torch.device | None = None,
    model_info: dict[str, Any] | None = None,
) -> list[Path]:
    """Generate one image per job into out_dir, skipping those already made; returns all paths in job order.

    Args:
        components: the Stable Diffusion model, already on `device` in the dtype to sample in.
        jobs: the images to make (file stems must be unique).
        out_dir: output folder, created if needed.
        config: sampling settings.
        device: where generators and latents live; None = the UNet's device.
        model_info: extra JSON-able facts identifying the model (e.g. erased-UNet weights path),
            stored in the manifest's "model" block and compared on resume.
    """
    _check_unique_names(jobs)
    if not jobs:
        return []
    device = torch.device(device) if device is not None else components.unet.device
    out_dir = Path(out_dir)
    paths = [out_dir / f"{job.name}.{config.image_format}" for job in jobs]
    manifest = build_manifest(components, config, device, model_info)
    manifest["images"] = _existing_entries(out_dir, manifest)
    pending = _pending_jobs(jobs, paths, manifest["images"], config)
    logger.info("%d of %d images already in %s; generating %d", len(jobs) - len(pending), len(jobs), out_dir,
                len(pending))
    if pending:
        if has_safety_checker(components.source, components.revision):
            _warn_safety_checker_off()
        _save_manifest(out_dir, manifest)
        _run_jobs(components, pending, out_dir, config, device, manifest, total=len(jobs))
    return paths


def build_manifest(components: SDComponents, config: GenerationConfig, device: torch.device,
                   model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest header: format, model block and settings block (no images yet).

    Layout of manifest.json:
        {"format": "recare-images/1",
         "model": {"source", "revision", "dtype", **model_info},
         "settings": {"num_inference_steps", "guidance_scale", "height", "width", "scheduler",
                      "scheduler_class", "image_format", "generator_device", "safety_checker": false},
         "execution": {"compile"},     # how the last invocation ran; not compared on resume

         "images": [{"file", "prompt", "seed", "guidance", "case_id"}, ...]}   # sorted by file
    batch_size is not recorded: it does not change the images. The compile mode is recorded but not compared:
    compiled kernels round differently from eager ones, so pixels may differ slightly between the two.
    """
    height, width = _image_size(components, config)
    model = {"source": components.source, "revision": components.revision,
             "dtype": str(components.unet.dtype).removeprefix("torch."), **(model_info or {})}
    settings = {
        "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
        "height": height, "width": width, "scheduler": config.scheduler,
        "scheduler_class": type(make_scheduler(components, config.scheduler)).__name__,
        "image_format": config.image_format, "generator_device": device.type, "safety_checker": False,
    }
    execution = {"compile": resolve_compile_mode(config.compile, device) or "off"}
    return _json_roundtrip({"format": MANIFEST_FORMAT, "model": model, "settings": settings, "execution": execution})


def make_scheduler(components: SDComponents, name: str) -> Any:
    """A fresh scheduler: the model's own class ("default") or DDIM, from the model's scheduler config."""
    from diffusers import DDIMScheduler

    if name == "default":
        return type(components.scheduler).from_config(components.scheduler.config)
    if name == "ddim":
        return DDIMScheduler.from_config(components.scheduler.config)
    raise RecareError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest.json of an image folder (RecareError when missing or malformed)."""
    return read_json(Path(out_dir) / MANIFEST_NAME, "image manifest")


# ----------------------------------------------------------------------------- helpers


def _image_size(components: SDComponents, config: GenerationConfig) -> tuple[int, int]:
    """(height, width) in pixels; must be a multiple of 8 (the pipeline's requirement)."""
    height = config.height or components.image_size
    width = config.width or components.image_size
    if height % 8 or width % 8:
        raise RecareError(f"height and width must be multiples of 8, got {height}x{width}")
    return height, width


def _json_roundtrip(obj: Any) -> Any:
    """obj as it will read back from JSON (tuples -> lists), so that comparisons with a saved manifest are exact."""
    try:
        return json_ready(obj)
    except TypeError as err:
        raise RecareError(f"model_info must be JSON-serialisable: {err}") from err


def _check_unique_names(jobs: Sequence[PromptJob]) -> None:
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise RecareError(f"two jobs write the same file {job.name!r}")
        seen.add(job.name)


def _existing_entries(out_dir: Path, manifest: dict[str, Any]) -> dict[str, dict]:
    """Image entries of an existing manifest with the same model and settings, keyed by file name."""
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        if out_dir.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in out_dir.iterdir()):
            raise RecareError(f"{out_dir} holds images but no {MANIFEST_NAME}: it is not a recare output folder "
                              "(or its manifest was deleted); use an empty folder")
        return {}
    old = read_manifest(out_dir)
    for block in ("format", "model", "settings"):
        if old.get(block) != manifest[block]:
            raise RecareError(f"{out_dir} holds images of another run ({block} differs: saved {old.get(block)!r}, "
                              f"now {manifest[block]!r}); use another folder")
    return {entry["file"]: entry for entry in old.get("images", [])}


def _entry(job: PromptJob, path: Path, config: GenerationConfig) -> dict[str, Any]:
    return {"file": path.name, "prompt": job.prompt, "seed": job.seed, "guidance": _guidance(job, config),
            "case_id": job.case_id}


def _guidance(job: PromptJob, config: GenerationConfig) -> float:
    return float(job.guidance if job.guidance is not None else config.guidance_scale)


def _pending_jobs(jobs: Sequence[PromptJob], paths: Sequence[Path], entries: dict[str, dict],
                  config: GenerationConfig) -> list[tuple[PromptJob, Path]]:
    """Jobs still to run; RecareError when the manifest lists a job's file for a different image."""
    pending = []
    for job, path in zip(jobs, paths):
        old = entries.get(path.name)
        new = _entry(job, path, config)
        if old is not None and any(old.get(k) != new[k] for k in ("prompt", "seed", "guidance")):
            raise RecareError(f"{path} was made from another job (saved prompt/seed/guidance "
                              f"{old.get('prompt')!r}/{old.get('seed')}/{old.get('guidance')}, now "
                              f"{job.prompt!r}/{job.seed}/{new['guidance']}); use another folder")
        if old is None or not path.is_file():
            pending.append((job, path))
    return pending


def _batches(pending: list[tuple[PromptJob, Path]], config: GenerationConfig) -> Iterator[list[tuple[PromptJob, Path]]]:
    """Batches of at most batch_size jobs sharing one guidance scale, in job order within each scale."""
    groups: dict[float, list[tuple[PromptJob, Path]]] = {}
    for item in pending:
        groups.setdefault(_guidance(item[0], config), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), config.batch_size):
            yield group[start:start + config.batch_size]


def _run_jobs(components: SDComponents, pending: list[tuple[PromptJob, Path]], out_dir: Path,
              config: GenerationConfig, device: torch.device, manifest: dict[str, Any], total: int) -> None:
    """Generate the pending images batch by batch, keeping manifest.json up to date."""
    pipe = components.pipeline(scheduler=make_scheduler(components, config.scheduler))
    height, width = manifest["settings"]["height"], manifest["settings"]["width"]
    last_save = time.monotonic()
    try:
        with compiled(components.unet, resolve_compile_mode(config.compile, device)), \
                tqdm(total=total, initial=total - len(pending), desc="images", unit="img") as bar:
            fits = config.batch_size  # lowered when the device runs out of memory
            for batch in _batches(pending, config):
                images, fits = _sample_fitting(pipe, [job for job, _ in batch], config, device, (height, width), fits)
                for (job, path), image in zip(batch, images):
                    save_image_atomic(image, path)
                    manifest["images"][path.name] = _entry(job, path, config)
                bar.update(len(batch))
                if time.monotonic() - last_save > MANIFEST_SAVE_INTERVAL_S:
                    _save_manifest(out_dir, manifest)
                    last_save = time.monotonic()
    finally:
        _save_manifest(out_dir, manifest)


def _sample_fitting(pipe, jobs: list[PromptJob], config: GenerationConfig, device: torch.device,
                    size: tuple[int, int], fits: int) -> tuple[list, int]:
    """The images of `jobs`, in pipeline calls of at most `fits` images; on running out of device memory the
    calls are halved (down to one image) and the smaller size is returned for the next batches. Each image has its
    own seeded generator, so splitting a batch does not change which image a job gets."""
    images: list = []
    start = 0
    while start < len(jobs):
        chunk = jobs[start:start + fits]
        try:
            generators = [torch.Generator(device).manual_seed(job.seed) for job in chunk]
            images += pipe(prompt=[job.prompt for job in chunk], generator=generators, height=size[0], width=size[1],
                           num_inference_steps=config.num_inference_steps,
                           guidance_scale=_guidance(chunk[0], config), output_type="pil").images
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since torch 2.5; the same class
            if len(chunk) == 1:
                raise
            fits = max(1, len(chunk) // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning("out of device memory at %d images per call; continuing with %d", len(chunk), fits)
            continue
        start += len(chunk)
    return images, fits


def _save_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically with the image entries as a list sorted by file name."""
    entries = manifest["images"]
    write_json_atomic(out_dir / MANIFEST_NAME, {**manifest, "images": [entries[k] for k in sorted(entries)]})


def _warn_safety_checker_off() -> None:
    """Warn once per process that images are generated without the safety checker (method §1)."""
    global _safety_warning_given
    if not _safety_warning_given:
        logger.warning("The Stable Diffusion safety checker is DISABLED: generated images are not filtered "
                       "(method §1; with it on, most nudity images come back black).")
        _safety_warning_given = True
