"""Textual (concept) inversion of a new token against a given, possibly erased, UNet (method §3b, 5).

Used by stage 1 of ReCARE/STEREO (invert the target against the model erased so far) and by
the CCE attack (invert the target against the final erased model). The objective is the
textual-inversion loss of Gal et al. (2022), "An Image is Worth One Word", eq. 2:

    v* = argmin_v E_{z ~ E(x), y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c_theta(y(v))) ||^2

with everything frozen except the embedding v of one new token (v-prediction models use the
velocity target of Salimans & Ho (2022) instead of eps).

Differences from the reference implementation (damilab/CARE, diffusers' textual-inversion
example), all documented on the functions below:
- Only ONE row is trained: a float32 copy of the placeholder's embedding row is substituted
  into the embedding output by a forward hook, and AdamW updates that row alone. AdamW is
  element-wise, so this is the same update the reference gets by training the whole table and
  restoring every other row after each step (tested), without the optimizer state for the
  whole table, and with a float32 row even when the text encoder is float16. The table itself
  is written once, at the end.
- Each image is encoded by the VAE once per run (unflipped and flipped); every step samples
  a fresh latent from the cached posterior mean and std, which is the same distribution the
  reference's per-step `latent_dist.sample()` draws from (tested).
- Images are visited in reshuffled passes (every image equally often); the reference draws
  from a shuffled list of 100 copies of each image. Templates, flips and all noise come from
  the torch.Generator passed in (the reference uses Python's `random` for templates).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from recare.config import check_fields, option
from recare.errors import RecareError
from recare.interrupts import Interrupted, stop_requested
from recare.io import load_image_rgb, write_json_atomic
from recare.models import precision
from recare.models.acceleration import mark_step, to_device
from recare.models.checkpoints import save_learned_embeddings
from recare.models.conditioning import PromptConditioner, unet_condition
from recare.models.embeddings import INITIALIZER_MODES
from recare.models.loading import SDComponents
from recare.models.precision import MIXED_PRECISION_MODES

logger = logging.getLogger(__name__)

LOSS_LOG_EVERY = 10  # inversion steps between host syncs (losses stay on the device in between)


# Prompt templates in the manner of diffusers' textual-inversion example (written for recare).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a blurry photo of a {}",
    "a good photo of the {}",
    "an image of a {}",
    "a snapshot of the {}",
    "a photograph of one {}",
    "a low-resolution photo of the {}",
    "a high-quality photo of a {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a detailed photo of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "an artwork in the style of {}",
    "a picture in the style of {}",
    "a rendering in the style of {}",
    "a drawing in the style of {}",
    "a cropped painting in the style of {}",
    "a close-up painting in the style of {}",
    "a detailed painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an illustration in the style of {}",
    "a canvas in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class InversionConfig:
    """Textual-inversion settings; defaults are the reference's (method §3b)."""

    steps: int = 3000
    """Optimisation steps."""
    learning_rate: float = 5e-3
    """Base AdamW learning rate (constant schedule)."""
    scale_lr_by_batch: bool = True
    """Multiply the learning rate by batch_size (the reference's scale_lr=True)."""
    batch_size: int = 1
    """Images per step."""
    resolution: int | None = 512
    """Square image side in pixels; None = the model's image size (components.image_size)."""
    flip_p: float = 0.5
    """Probability of a horizontal flip per drawn image."""
    templates: str | tuple[str, ...] = "object"
    """'object' ("a photo of a {}", ...), 'style' ("a painting in the style of {}", ...), explicit
    templates, each with one '{}' for the placeholder, or the path of a text file of templates (one
    per line, '#' comments), read when the config is made (the config then holds its templates)."""
    initializer_mode: str = option("word", choices=INITIALIZER_MODES)
    """'word' (whole-word token, diffusers) or 'reference' (raw vocabulary entry); see add_placeholder_token."""
    timestep_range: tuple[int, int] | None = None
    """Half-open [low, high) range of training timesteps; None = [0, num_train_timesteps - 1)
    as in the reference (randint(0, 999) for 1000 steps)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch defaults, as the reference)."""
    adam_weight_decay: float = 1e-2
    """AdamW weight decay (torch default, as the reference)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (torch default)."""
    mixed_precision: str = option("auto", choices=MIXED_PRECISION_MODES)
    """'auto' (CUDA: bf16 where supported, else fp16; other devices: fp32), 'no', 'fp16', 'bf16'
    (fp16 needs CUDA; bf16 also runs under the CPU's autocast). The trained row stays float32 in every mode."""
    encode_batch_size: int = 8
    """Images per VAE call when the latent cache is built."""

    def __post_init__(self):
        check_fields(self, "inversion config")
        if isinstance(self.templates, str) and self.templates not in TEMPLATE_SETS:
            object.__setattr__(self, "templates", read_templates(self.templates))
        self.template_list()  # a template without its '{}' is refused now, not at training time
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.resolution is None or self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}"),
            (0.0 <= self.flip_p <= 1.0, f"flip_p must be in [0, 1], got {self.flip_p}"),
            (self.encode_batch_size >= 1, f"encode_batch_size must be >= 1, got {self.encode_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecareError(message)
        self.template_list()
        if self.timestep_range is not None and not 0 <= self.timestep_range[0] < self.timestep_range[1]:
            raise RecareError(f"timestep_range must be [low, high) with 0 <= low < high, got {self.timestep_range}")

    @property
    def effective_learning_rate(self) -> float:
        """learning_rate, times batch_size when scale_lr_by_batch."""
        return self.learning_rate * (self.batch_size if self.scale_lr_by_batch else 1)

    def template_list(self) -> tuple[str, ...]:
        """The prompt templates; RecareError for an unknown set name or a template without one '{}'."""
        if isinstance(self.templates, str):
            if self.templates not in TEMPLATE_SETS:
                raise RecareError(f"unknown template set {self.templates!r}; choose one of {sorted(TEMPLATE_SETS)} "
                                  "or give templates with '{}'")
            return TEMPLATE_SETS[self.templates]
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise RecareError("each template needs exactly one '{}' for the placeholder")
        return tuple(self.templates)

    def to_dict(self) -> dict:
        """A JSON-ready copy of the settings."""
        return asdict(self)


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Templates from a text file: one per line, blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise RecareError(f"unknown template set {str(path)!r}: neither {sorted(TEMPLATE_SETS)} nor a template file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RecareError(f"cannot read template file {path}: {err}") from err
    templates = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not templates:
        raise RecareError(f"template file {path} holds no templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise RecareError(f"template file {path}: each template needs exactly one '{{}}', not {bad[0]!r}")
    return templates


# ----------------------------------------------------------------------------- images and latents


def image_slices(paths: Sequence[str | os.PathLike], n_rounds: int) -> list[list[str | os.PathLike]]:
    """Split the sorted image list into n_rounds contiguous slices, one per stage-1 round (method §3b).

    As in the reference, every slice holds len(paths) // n_rounds images (round k gets
    sorted[k * size:(k + 1) * size]); the len(paths) % n_rounds last images are not used.
    """
    if n_rounds < 1:
        raise RecareError(f"n_rounds must be >= 1, got {n_rounds}")
    if len(paths) < n_rounds:
        raise RecareError(f"{len(paths)} images cannot be split into {n_rounds} rounds (need at least one per round)")
    ordered = sorted(paths, key=lambda p: Path(p))
    size = len(ordered) // n_rounds
    if len(ordered) % n_rounds:
        logger.info("image_slices: %d images unused (%d rounds of %d)", len(ordered) % n_rounds, n_rounds, size)
    return [ordered[k * size:(k + 1) * size] for k in range(n_rounds)]


def load_images(images: Sequence[Image.Image | str | os.PathLike]) -> list[Image.Image]:
    """RGB PIL images; paths are read with recare.io.load_image_rgb (RecareError when corrupt)."""
    return [img.convert("RGB") if isinstance(img, Image.Image) else load_image_rgb(img) for img in images]


def images_to_pixels(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Resize (bicubic) to resolution x resolution and scale to [-1, 1]: (n, 3, r, r) float32.

    Like the reference: no crop (the aspect ratio is not kept), x / 127.5 - 1 on uint8 values.
    """
    arrays = [np.asarray(img.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC), dtype=np.uint8)
              for img in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (n, 3, r, r)
    return pixels / 127.5 - 1.0


@dataclass(frozen=True)
class LatentCache:
    """Posterior mean and std of each image's VAE encoding, unflipped (index 0) and flipped (1).

    Sampling mean + std * noise draws from the same Gaussian as the reference's per-step
    `vae.encode(x).latent_dist.sample()` (method §3b), without re-running the encoder.
    """

    mean: torch.Tensor
    """(2, n, c, h, w) float32 posterior means."""
    std: torch.Tensor
    """(2, n, c, h, w) float32 posterior standard deviations."""
    scaling_factor: float
    """vae.config.scaling_factor (0.18215 for SD v1.x)."""

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, pixels: torch.Tensor, batch_size: int = 8) -> "LatentCache":
        """Encode (n, 3, r, r) pixels in [-1, 1] and their horizontal flips, in the VAE's dtype."""
        device = vae.device
        means, stds = [], []
        with precision.vae_encode_precision(vae) as dtype:  # SDXL's VAE: float32 even for fp16 weights
            for flipped in (pixels, torch.flip(pixels, dims=[-1])):
                for start in range(0, len(flipped), batch_size):
                    dist = vae.encode(flipped[start:start + batch_size].to(device, dtype)).latent_dist
                    means.append(dist.mean.float())
                    stds.append(dist.std.float())
        n = len(pixels)
        mean = torch.cat(means).reshape(2, n, *means[0].shape[1:])
        std = torch.cat(stds).reshape(2, n, *stds[0].shape[1:])
        return cls(mean, std, float(vae.config.scaling_factor))

    def __len__(self) -> int:
        return self.mean.shape[1]

    def sample(self, indices: torch.Tensor, flips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents (b, c, h, w) of images `indices`, flipped where `flips` is True."""
        which = to_device(flips.long(), self.mean.device)
        idx = to_device(indices.long(), self.mean.device)
        mean, std = self.mean[which, idx], self.std[which, idx]  # (b, c, h, w)
        noise = _randn(mean.shape, generator, mean.device)
        return (mean + std * noise) * self.scaling_factor


def _randn(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device, then moved to `device` (no host sync)."""
    return to_device(torch.randn(shape, generator=generator, device=generator.device), device)


def _image_order(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless image indices: reshuffled passes over range(n)."""
    while True:
        yield from torch.randperm(n, generator=generator, device=generator.device).tolist()


# ----------------------------------------------------------------------------- training


@dataclass
class LearnedEmbedding:
    """The result of one inversion: a token and its learned embedding (one row; SDXL: both encoders' rows)."""

    token: str
    """The placeholder string, now in the tokenizer."""
    embedding: torch.Tensor
    """(dim,) float32 CPU tensor (SDXL: the concatenated rows of both encoders, 768 + 1280); also written into
    the text encoders' tables."""
    losses: list[float] = field(default_factory=list)
    """Loss of every step."""
    token_id: int = -1
    """Id of the token in the tokenizer it was added to."""
    initializer: str = ""
    """The initializer string."""
    initializer_id: int = -1
    """Id of the initializer token."""
    row_widths: tuple[int, ...] = ()
    """Width of each text encoder's part of `embedding` (SDXL: (768, 1280)); () = one encoder."""

    def save(self, path: str | os.PathLike, config: InversionConfig | None = None) -> None:
        """Write {token: embedding} as safetensors (diffusers' load_textual_inversion layout) and,
        next to it, a .json with the token, initializer, settings and loss summary."""
        path = Path(path)
        save_learned_embeddings({self.token: self.embedding}, path, self.row_widths)
        tail = self.losses[-100:]
        write_json_atomic(path.with_suffix(".json"), {
            "token": self.token, "token_id": self.token_id, "initializer": self.initializer,
            "initializer_id": self.initializer_id, "steps": len(self.losses),
            "mean_loss_last_100": sum(tail) / len(tail) if tail else None,
            "config": config.to_dict() if config is not None else None,
        })


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad False for the modules; their flags are restored afterwards."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        for module in modules:
            module.eval().requires_grad_(False)
        yield
    finally:
        for module, training, flags in saved:
            module.train(training)
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)


def denoising_loss(unet, conditioner: PromptConditioner, noise_scheduler, latents: torch.Tensor,
                   input_ids: Sequence[torch.Tensor], timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (eps, or velocity for v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise RecareError(f"textual inversion supports epsilon and v_prediction models, not {prediction_type!r}")
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (b, c, h, w)
    packed = conditioner.encode_ids(input_ids)  # (b, seq, dim), gradients reach the overridden row
    pred = unet(noisy.to(unet.dtype), timesteps, **unet_condition(unet, packed, unet.dtype)).sample
    return F.mse_loss(pred.float(), target.float())


def _check_device(device: torch.device, **modules: torch.nn.Module) -> None:
    for name, module in modules.items():
        where = next(module.parameters()).device
        if where.type != device.type or (device.index is not None and where.index != device.index):
            raise RecareError(f"{name} is on {where}, training runs on {device}; move the components first")


def _check_call(components: SDComponents, images: Sequence[Any], config: InversionConfig, generator: Any,
                device: str | torch.device | None, unet: torch.nn.Module | None
                ) -> tuple[torch.nn.Module, torch.device, int]:
    """(unet, device, resolution) of a train_textual_inversion call, its arguments checked."""
    if not isinstance(generator, torch.Generator):
        raise RecareError("train_textual_inversion needs a torch.Generator for its randomness")
    if len(images) == 0:
        raise RecareError("textual inversion needs at least one image")
    unet = components.unet if unet is None else unet
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    _check_device(device, unet=unet, vae=components.vae,
                  **dict(zip(("text_encoder", "text_encoder_2"), components.text_encoders)))
    resolution = config.resolution or components.image_size
    if resolution % components.vae_scale_factor:
        raise RecareError(f"resolution {resolution} is not a multiple of the VAE factor {components.vae_scale_factor}")
    return unet, device, resolution


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward through the (possibly scaled) loss and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _fit_row(row: torch.Tensor, unet: torch.nn.Module, conditioner: PromptConditioner, noise_scheduler: Any,
             cache: LatentCache, prompts: Sequence[str], config: InversionConfig, timestep_range: tuple[int, int],
             generator: torch.Generator, device: torch.device, bar_name: str, progress: bool) -> list[float]:
    """AdamW on the token's embedding `row` for config.steps steps of the denoising loss; the losses."""
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel, step counter on the device
    optimizer = torch.optim.AdamW([row], lr=config.effective_learning_rate, betas=config.adam_betas,
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, **fused)
    autocast_dtype = precision.autocast_dtype(config.mixed_precision, device, fp16_ok=True)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    losses = _LossLog()
    order = _image_order(len(cache), generator)
    prompt_ids = conditioner.token_ids(prompts)  # per tokenizer (templates, L), tokenized once
    bar = tqdm(range(config.steps), desc=bar_name, disable=not progress)
    for step in bar:
        if stop_requested():
            raise Interrupted(f"textual inversion stopped at step {step} by a signal")
        mark_step()
        latents, input_ids, timesteps, noise = _draw_batch(cache, order, prompt_ids, config, timestep_range,
                                                           generator, device)
        with precision.autocast_context(config.mixed_precision, device, fp16_ok=True):
            loss = denoising_loss(unet, conditioner, noise_scheduler, latents, input_ids, timesteps, noise)
        losses.append(loss.detach())
        _optimizer_step(loss, optimizer, scaler)
        if (step + 1) % LOSS_LOG_EVERY == 0 or step + 1 == config.steps:
            bar.set_postfix(loss=f"{losses.flush():.4f}", refresh=False)
    return losses.values


class _LossLog:
    """Step losses kept on the device and moved to the host every LOSS_LOG_EVERY steps (one sync), checked there."""

    def __init__(self):
        self.values: list[float] = []
        self._pending: list[torch.Tensor] = []

    def append(self, loss: torch.Tensor) -> None:
        self._pending.append(loss)

    def flush(self) -> float:
        """Move the pending losses to the host; RecareError at the first that is not finite; the last value."""
        for value in torch.stack(self._pending).float().cpu().tolist():
            self.values.append(value)
            if not math.isfinite(value):
                raise RecareError(f"textual inversion loss is {value} at step {len(self.values)}")
        self._pending = []
        return self.values[-1]


def _noise_schedule(components: SDComponents, config: InversionConfig) -> tuple[Any, tuple[int, int]]:
    """The DDPM training scheduler of the model's noise schedule and the [low, high) timestep range."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    num_train = noise_scheduler.config.num_train_timesteps
    low, high = config.timestep_range or (0, num_train - 1)
    if high > num_train:
        raise RecareError(f"timestep_range {config.timestep_range} exceeds the {num_train} training timesteps")
    return noise_scheduler, (low, high)


def _draw_batch(cache: LatentCache, order: Iterator[int], prompt_ids: Sequence[torch.Tensor],
                config: InversionConfig, timestep_range: tuple[int, int], generator: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """One step's (latents, input_ids, timesteps, noise), drawn from `generator` in a fixed order:
    images, flips, prompts, latent samples, timesteps, noise. `prompt_ids`: every template's token ids
    on the device, (templates, L) per tokenizer; draws are moved there without a host sync."""
    indices = torch.tensor([next(order) for _ in range(config.batch_size)])
    flips = torch.rand(config.batch_size, generator=generator, device=generator.device) < config.flip_p
    chosen = torch.randint(len(prompt_ids[0]), (config.batch_size,), generator=generator,
                           device=generator.device).tolist()
    input_ids = tuple(torch.cat([ids[i:i + 1] for i in chosen]) for ids in prompt_ids)  # (b, L): host indices
    latents = cache.sample(indices, flips, generator)
    timesteps = to_device(torch.randint(*timestep_range, (config.batch_size,), generator=generator,
                                        device=generator.device), device)
    return latents, input_ids, timesteps, _randn(latents.shape, generator, device)


def train_textual_inversion(
    components: SDComponents,
    images: Sequence[Image.Image | str | os.PathLike],
    placeholder: str,
    initializer: str,
    config: InversionConfig,
    generator: torch.Generator,
    device: str | torch.device | None = None,
    unet: torch.nn.Module | None = None,
    progress: bool = True,
) -> LearnedEmbedding:
    """Learn the embedding of a new token `placeholder` from `images` against a frozen UNet (method §3b).

    Adds `placeholder` to the components' tokenizer(s) / text encoder(s) (initialised from `initializer`,
    see add_placeholder_token; SDXL: in both encoders, one concatenated row is learned) and leaves the
    learned embedding in the table(s), so the
    components can use the token afterwards. Only that row of the table changes. UNet
    (default components.unet; pass the erased UNet for stage 1 / CCE), VAE and text encoder
    are frozen during the call and their requires_grad/train flags restored afterwards.

    Args:
        components: tokenizer, text encoder, VAE, scheduler (its config gives the noise schedule
            and prediction type).
        images: PIL images or image paths.
        placeholder: the new token string, e.g. "<nudity-0>".
        initializer: the word whose embedding starts the search, e.g. "person".
        config: InversionConfig.
        generator: the only source of randomness (image order, flips, templates, noise, timesteps).
        device: where training runs; the networks must already be there (default: the UNet's device).
        unet: the UNet to invert against (default components.unet).
        progress: show a tqdm bar.
    """
    unet, device, resolution = _check_call(components, images, config, generator, device, unet)
    templates = config.template_list()
    autocast_dtype = precision.autocast_dtype(config.mixed_precision, device, fp16_ok=True)
    noise_scheduler, (low, high) = _noise_schedule(components, config)
    pixels = images_to_pixels(load_images(images), resolution)

    conditioner = components.conditioner(resolution)  # SDXL: time ids of the training resolution
    token_id, initializer_id = conditioner.add_placeholder(placeholder, initializer, config.initializer_mode)
    row = conditioner.token_row(token_id).detach().float().clone().requires_grad_(True)  # (dim,): the only trained one
    logger.info("textual inversion of %r: %d images at %d px, %d steps, batch %d, lr %g, timesteps [%d, %d), %s",
                placeholder, len(pixels), resolution, config.steps, config.batch_size, config.effective_learning_rate,
                low, high, f"autocast {autocast_dtype}" if autocast_dtype else "fp32")
    prompts = [t.format(placeholder) for t in templates]
    with frozen(unet, components.vae, *conditioner.text_encoders), conditioner.row_override(token_id, row):
        cache = LatentCache.encode(components.vae, pixels, config.encode_batch_size)
        losses = _fit_row(row, unet, conditioner, noise_scheduler, cache, prompts, config, (low, high),
                          generator, device, bar_name=f"inversion {placeholder}", progress=progress)
    conditioner.set_token_row(token_id, row.detach())
    tail = losses[-100:]
    logger.info("textual inversion of %r done: mean loss of the last %d steps %.4f", placeholder, len(tail),
                sum(tail) / len(tail))
    return LearnedEmbedding(placeholder, row.detach().float().cpu().clone(), losses, token_id, initializer,
                            initializer_id, conditioner.row_widths if len(conditioner.row_widths) > 1 else ())
