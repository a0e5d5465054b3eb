"""The world's text-to-image model: a pixel-space diffusion model in the Stable Diffusion layout.

Components (diffusers/transformers classes, so StableDiffusionPipeline.from_pretrained and
recare.models.load_sd read the saved folder):
- tokenizer: CLIP's BPE (recare.tokenizer); text encoder: the world CLIP's text tower, frozen;
- VAE: a hand-set AutoencoderKL that is the identity on [-1, 1] pixels (`identity_vae`), so the
  "latents" are the 16x16x3 images and the VAE scale factor is 1;
- UNet2DConditionModel trained with the epsilon objective of DDPM (Ho et al. 2020) on SD v1.4's
  noise schedule, with min-SNR-gamma loss weights (Hang et al. 2023), classifier-free-guidance
  caption dropout (Ho & Salimans 2022) and an EMA of the weights;
- scheduler: PNDM with SD v1.4's settings (the pipeline's default, as for SD v1.4).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from recare.models.loading import ImageTextModel, SDComponents
from recare.models.tiny import SD14_SCHEDULER
from recare.world.clip_train import warmup_cosine
from recare.world.render import WorldSpec, caption_scenes, probe_prompts, render_batch

logger = logging.getLogger(__name__)

VAE_CHANNELS = 8  # x (3), -x (3), +anchor, -anchor
VAE_ANCHOR = 256.0  # constant channel value that fixes the GroupNorm statistics (exact in fp16)


@dataclass(frozen=True)
class T2IConfig:
    """UNet architecture and diffusion training."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths at 16x16, 8x8, 4x4
    attention_heads: int = 2  # heads of each cross-attention transformer (diffusers' attention_head_dim)
    layers_per_block: int = 1  # resnets per UNet block
    steps: int = 3000  # training steps (fresh renders every step)
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # AdamW peak learning rate (weight decay 0.01, torch's default)
    grad_clip: float = 1.0  # max gradient norm
    warmup: int = 200  # linear warm-up steps, then cosine decay to 0
    caption_dropout: float = 0.1  # P(caption replaced by "") for classifier-free guidance
    min_snr_gamma: float = 5.0  # min-SNR loss weight cap; 0 disables the weighting
    ema_decay: float = 0.999  # EMA of the UNet weights (the saved model); warm-up (1+s)/(10+s)
    seed: int = 0  # initialisation, data and noise seed
    compile: bool = True  # torch.compile the training forward (as the committed build did; measured no faster here)


# ----------------------------------------------------------------------------- components


def identity_vae(image_size: int) -> Any:
    """An AutoencoderKL whose encoder mean and decoder are the identity on pixels (scaling factor 1).

    Every resnet's second conv is zero (so the block is its skip connection). conv_in writes
    (x, -x, +A, -A) into 8 channels; with one GroupNorm group their mean is exactly 0 and their
    variance A^2/4 + mean(x^2)/4, so GroupNorm with weight A/2 returns x up to a relative error
    mean(x^2)/(2 A^2) < 1e-5 (A = 256). silu(x) - silu(-x) = x restores x after the activation.
    The encoder's log-variance is -30 (std 3e-7): sampling the posterior returns its mean.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(VAE_CHANNELS,),
                        layers_per_block=1, norm_num_groups=1, scaling_factor=1.0, sample_size=image_size,
                        mid_block_add_attention=False)
    with torch.no_grad():
        for param in vae.parameters():
            param.zero_()
        eye = torch.eye(3)
        for coder in (vae.encoder, vae.decoder):
            coder.conv_in.weight[:3, :, 1, 1] = eye
            coder.conv_in.weight[3:6, :, 1, 1] = -eye
            coder.conv_in.bias[6:] = torch.tensor([VAE_ANCHOR, -VAE_ANCHOR])
            for module in coder.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    module.weight.fill_(1.0)
            coder.conv_norm_out.weight.fill_(VAE_ANCHOR / 2)
        vae.encoder.conv_out.weight[:3, :3, 1, 1] = eye  # mean = silu(x) - silu(-x) = x
        vae.encoder.conv_out.weight[:3, 3:6, 1, 1] = -eye
        vae.encoder.conv_out.bias[3:] = -30.0  # log-variance
        vae.decoder.conv_out.weight[:, :3, 1, 1] = eye
        vae.decoder.conv_out.weight[:, 3:6, 1, 1] = -eye
        vae.quant_conv.weight[:, :, 0, 0] = torch.eye(6)
        vae.post_quant_conv.weight[:, :, 0, 0] = eye
    return vae.requires_grad_(False).eval()


def build_unet(config: T2IConfig, image_size: int, cross_attention_dim: int) -> Any:
    """A UNet2DConditionModel on 16x16x3 pixels: plain block at full size, cross-attention below."""
    from diffusers import UNet2DConditionModel

    levels = len(config.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    torch.manual_seed(config.seed)
    return UNet2DConditionModel(sample_size=image_size, in_channels=3, out_channels=3,
                                layers_per_block=config.layers_per_block,
                                block_out_channels=tuple(config.block_out_channels), down_block_types=down,
                                up_block_types=up, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=config.attention_heads, norm_num_groups=8)


def world_scheduler() -> Any:
    """PNDM with SD v1.4's noise schedule and settings (clip_sample False, as in its config)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**SD14_SCHEDULER)
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def assemble_sd(clip: ImageTextModel, unet: Any, image_size: int) -> SDComponents:
    """SD components: the world CLIP's tokenizer and text tower, the identity VAE, the UNet, PNDM."""
    text_encoder = copy.deepcopy(clip.model.text_model).eval().requires_grad_(False)
    components = SDComponents(clip.tokenizer, text_encoder, identity_vae(image_size),
                              unet.eval().requires_grad_(False), world_scheduler(), source="<world-sd>")
    return components


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeddings exactly as StableDiffusionPipeline makes them: max-length padding, no mask."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]  # (b, 77, width)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Epsilon-loss weights min(SNR, gamma) / SNR with SNR = a / (1 - a) (Hang et al. 2023, eq. 8)."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    if gamma <= 0:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=gamma) / snr


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """ema <- d ema + (1 - d) model, with d = min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def diffusion_loss(unet: Any, text_encoder: Any, tokenizer: Any, alphas_cumprod: torch.Tensor, images: torch.Tensor,
                   captions: Sequence[str], generator: torch.Generator, config: T2IConfig) -> torch.Tensor:
    """Weighted epsilon-prediction MSE for a batch of images in [0, 1] and their captions."""
    n = images.shape[0]
    keep = torch.rand(n, generator=generator) >= config.caption_dropout
    prompts = [c if k else "" for c, k in zip(captions, keep.tolist())]
    context = encode_prompts(tokenizer, text_encoder, prompts)
    x0 = images * 2 - 1  # the identity VAE's latents, scaling factor 1
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas_cumprod[t].view(n, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = unet(xt, t, encoder_hidden_states=context).sample  # (n, 3, H, W)
    per_image = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    return (per_image * min_snr_weights(alphas_cumprod, t, config.min_snr_gamma)).mean()


def train_unet(clip: ImageTextModel, config: T2IConfig = T2IConfig(), spec: WorldSpec = WorldSpec(),
               callback: Callable[[int, Any], None] | None = None, callback_every: int = 500) -> Any:
    """Train the UNet on fresh renders with the frozen world CLIP text tower; returns the EMA UNet.

    callback(step, ema_unet) runs every `callback_every` steps (e.g. to measure progress).
    """
    from diffusers import DDPMScheduler

    text_encoder, tokenizer = clip.model.text_model, clip.tokenizer
    unet = build_unet(config, spec.image_size, text_encoder.config.hidden_size).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    alphas_cumprod = DDPMScheduler(**{k: v for k, v in SD14_SCHEDULER.items() if k in (
        "beta_start", "beta_end", "beta_schedule", "num_train_timesteps")}).alphas_cumprod
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    forward = torch.compile(unet) if config.compile else unet  # shares unet's parameters
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, config.warmup, config.steps))
    progress = tqdm(range(config.steps), desc="world UNet", mininterval=10)
    for step in progress:
        scenes, images = render_batch(config.batch_size, generator, spec)
        captions = [c.text for c in caption_scenes(scenes, generator, spec)]
        loss = diffusion_loss(forward, text_encoder, tokenizer, alphas_cumprod, images, captions, generator, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        update_ema(ema, unet, step, config.ema_decay)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if callback is not None and (step + 1) % callback_every == 0 and step + 1 < config.steps:
            callback(step + 1, ema.eval())
            ema.train()
    return ema.eval()


# ----------------------------------------------------------------------------- sampling and measurement


@torch.no_grad()
def generate(components: SDComponents, prompt: str, seeds: Sequence[int], steps: int = 50,
             guidance: float = 7.5) -> torch.Tensor:
    """Images (n, 3, H, W) in [0, 1] for one prompt, one CPU generator per seed, the default scheduler."""
    pipe = components.pipeline()
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(prompt=[prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
               generator=generators, output_type="pt")
    return out.images.float().clamp(0, 1)


def measure_t2i(components: SDComponents, detector: Any, spec: WorldSpec = WorldSpec(),
                prompts: Sequence[str] | None = None, n: int = 32, seed: int = 0, steps: int = 50,
                guidance: float = 7.5) -> dict[str, Any]:
    """Per prompt (default: the spec's probe prompts, recare.world.render.probe_prompts): how often the
    ground-truth detector finds T (texture = target) and C (shape = care)."""
    from recare.world.detectors import concept_present, predict

    rates = {}
    for prompt in probe_prompts(spec) if prompts is None else prompts:
        images = generate(components, prompt, range(seed, seed + n), steps, guidance)
        probs = predict(detector, images)
        rates[prompt] = {"target": float(concept_present(probs, spec.target).float().mean()),
                         "care": float(concept_present(probs, spec.care).float().mean())}
    return {"n_per_prompt": n, "seed": seed, "steps": steps, "guidance": guidance, "rates": rates}


def time_unet_steps(components: SDComponents, train_batch: int = 64, denoise_images: int = 16,
                    repeats: int = 3) -> dict[str, float]:
    """Seconds per UNet training step (forward + backward, batch `train_batch`) and per guided
    denoising step for `denoise_images` images (a batch of 2x that), median of `repeats`."""
    import statistics
    import time

    unet = copy.deepcopy(components.unet).float().train().requires_grad_(True)
    c, h, w = components.latent_shape
    width = components.text_encoder.config.hidden_size
    length = components.tokenizer.model_max_length
    x, context = torch.randn(train_batch, c, h, w), torch.randn(train_batch, length, width)
    t = torch.randint(0, 1000, (train_batch,))
    train, denoise = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        unet(x, t, encoder_hidden_states=context).sample.pow(2).mean().backward()
        train.append(time.perf_counter() - tick)
    unet.eval()
    xd, cd = torch.randn(2 * denoise_images, c, h, w), torch.randn(2 * denoise_images, length, width)
    with torch.no_grad():
        for _ in range(repeats):
            tick = time.perf_counter()
            unet(xd, torch.full((2 * denoise_images,), 500), encoder_hidden_states=cd)
            denoise.append(time.perf_counter() - tick)
    return {f"train_step_batch{train_batch}": statistics.median(train),
            f"guided_denoise_step_{denoise_images}_images": statistics.median(denoise)}
