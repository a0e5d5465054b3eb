"""Partial DDIM trajectories and the training timestep (method §3a).

Each erasure iteration (ESD, ReCARE stages 1 and 2) draws a stop index i in [1, 48], runs i
steps of a 50-step DDIM schedule from fresh noise with classifier-free guidance 3 using the
current student, and then queries teacher and student at that latent.

The timestep quirk of the reference (damilab/CARE, utils/recare.py), kept on purpose: the
predictions are taken at the 1000-step DDIM timestep t = timesteps_1000[int(i * 1000 / 50)].
With SD v1.4's DDIM config ("leading" spacing, steps_offset 1):
    timesteps_50   = [981, 961, ..., 21, 1]    -> the latent after i steps sits at 981 - 20 i
    timesteps_1000 = [1000, 999, ..., 2, 1]    -> the prediction timestep is 1000 - 20 i
e.g. i = 1: latent at t = 961, predictions at t = 980; i = 48: latent at 21, predictions at 40.
So the UNet is queried 19 timesteps noisier than the latent really is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from recare.models.acceleration import to_device
from recare.models.conditioning import unet_condition
from recare.train.guidance import to_epsilon

logger = logging.getLogger(__name__)


def make_ddim_scheduler(scheduler: Any, num_steps: int = 50) -> Any:
    """A DDIMScheduler from another scheduler's config (method §3: the reference trains with DDIM).

    Keys that DDIM reads and the source config holds (betas, steps_offset, prediction_type,
    clip_sample, ...) carry over, as in the reference's DDIMScheduler.from_pretrained of the
    model's scheduler folder. The schedule is set to `num_steps` steps.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    return ddim


def training_timestep(ddim_scheduler: Any, stop_index: int, num_steps: int = 50) -> int:
    """The 1000-step timestep at which predictions are taken after `stop_index` DDIM steps.

    As the reference does: a DDIM schedule of num_train_timesteps steps, indexed at
    int(stop_index * num_train_timesteps / num_steps). With SD v1.4's config this is
    1000 - 20 * stop_index, while the latent sits at 981 - 20 * stop_index (module docstring).
    Uses a copy of the scheduler; `ddim_scheduler` itself is not changed.
    """
    from diffusers import DDIMScheduler

    num_train = int(ddim_scheduler.config.num_train_timesteps)
    _check_stop_index(stop_index, num_steps)
    fine = DDIMScheduler.from_config(ddim_scheduler.config)
    fine.set_timesteps(num_train)
    return int(fine.timesteps[int(stop_index / num_steps * num_train)])


def sample_stop_index(generator: torch.Generator | None = None, low: int = 1, high: int = 48) -> int:
    """A uniform stop index in [low, high], both inclusive (method §3a: [1, 48] for 50 steps)."""
    if low > high:
        raise ValueError(f"empty stop-index range [{low}, {high}]")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=device).item())


def initial_latents(unet: Any, ddim_scheduler: Any, batch_size: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh noise N(0, I) * init_noise_sigma of the UNet's latent shape, (B, C, H, W).

    Drawn on the generator's device (as diffusers' randn_tensor does) and moved to the UNet's
    without a host synchronisation (recare.models.acceleration.to_device).
    """
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet.config.in_channels, height, width)
    where = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=where, dtype=unet.dtype)
    return to_device(noise, unet.device) * ddim_scheduler.init_noise_sigma


class DDIMSchedule:
    """The deterministic (eta 0) DDIM steps of a `num_steps` schedule, precomputed (Song et al. 2021, Eq. 12).

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps,
    with the coefficients computed once, as 0-d float32 host tensors, by the same operations as
    diffusers' DDIMScheduler.step (so the result is bit-identical to it on the CPU), and the
    timesteps once on the device: a step reads no scheduler state and makes no host
    synchronisation (diffusers' step indexes a host table with a device timestep and branches on
    it). Schedulers that clip or threshold x0 are stepped by diffusers itself.
    """

    def __init__(self, ddim_scheduler: Any, num_steps: int, device: Any):
        ddim_scheduler.set_timesteps(num_steps, device=device)
        self.scheduler, self.num_steps = ddim_scheduler, num_steps
        self.timesteps = ddim_scheduler.timesteps  # (num_steps,) on the device
        self.stepper = _epsilon_stepper(ddim_scheduler, num_steps, device)
        config = ddim_scheduler.config
        self.exact = not (config.get("thresholding", False) or config.get("clip_sample", False))
        alphas, final = ddim_scheduler.alphas_cumprod, ddim_scheduler.final_alpha_cumprod
        stride = config.num_train_timesteps // num_steps
        self.coefficients = []
        for t in self.timesteps.cpu().tolist():
            prev = t - stride
            alpha, alpha_prev = alphas[t], alphas[prev] if prev >= 0 else final
            std = 0.0 * ddim_scheduler._get_variance(t, prev) ** 0.5  # eta 0, as diffusers computes it
            self.coefficients.append(((1 - alpha) ** 0.5, alpha ** 0.5, alpha_prev ** 0.5,
                                      (1 - alpha_prev - std ** 2) ** 0.5))

    def step(self, eps: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        """The latent after DDIM step `index` (0-based) from `latents` with the epsilon prediction `eps`."""
        if not self.exact:
            return self.stepper.step(eps, self.timesteps[index], latents, eta=0.0).prev_sample
        sqrt_beta, sqrt_alpha, sqrt_alpha_prev, direction = self.coefficients[index]
        original = (latents - sqrt_beta * eps) / sqrt_alpha
        return sqrt_alpha_prev * original + direction * eps


@torch.no_grad()
def sample_partial_trajectory(unet: Any, ddim_scheduler: Any, cond_emb: torch.Tensor, uncond_emb: torch.Tensor,
                              stop_index: int, guidance_scale: float = 3.0,
                              generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                              num_steps: int = 50, schedule: DDIMSchedule | None = None) -> torch.Tensor:
    """Run DDIM steps 0 .. stop_index - 1 with classifier-free guidance; return the latent.

    Each step makes ONE UNet call on the batch [uncond; cond] (only cond when guidance_scale
    is 1). Outputs are converted to epsilon (recare.guidance.to_epsilon) before guidance, and
    the DDIM update (eta 0, deterministic) is taken in epsilon space, so v-prediction models
    follow the same trajectory as with diffusers' v-prediction DDIM step.

    Args:
        unet: the UNet that drives the trajectory (the current student in the reference).
        ddim_scheduler: a DDIMScheduler (make_ddim_scheduler); its timesteps are reset to
            `num_steps` here unless `schedule` is given.
        cond_emb: text embeddings of the prompts, (B, L, D).
        uncond_emb: embeddings of "", (1, L, D) or (B, L, D).
        stop_index: number of DDIM steps to run, 0 .. num_steps (0 returns the initial noise).
        guidance_scale: classifier-free guidance scale (reference: 3).
        generator: seeds the initial noise when `latents` is None.
        latents: optional initial noise, (B, C, H, W); drawn from `generator` otherwise.
        num_steps: length of the DDIM schedule (reference: 50).
        schedule: the precomputed DDIMSchedule of `ddim_scheduler` (loops build it once).

    Returns:
        The latent z after `stop_index` steps, (B, C, H, W), which sits at timestep
        ddim_scheduler.timesteps[stop_index] (981 - 20 i for SD v1.4).
    """
    _check_stop_index(stop_index, num_steps)
    batch = cond_emb.shape[0]
    if uncond_emb.shape[0] not in (1, batch):
        raise ValueError(f"uncond_emb batch {uncond_emb.shape[0]} must be 1 or match cond_emb's {batch}")
    if schedule is None:
        schedule = DDIMSchedule(ddim_scheduler, num_steps, unet.device)
    elif schedule.num_steps != num_steps:
        raise ValueError(f"schedule has {schedule.num_steps} steps, num_steps is {num_steps}")
    if latents is None:
        latents = initial_latents(unet, ddim_scheduler, batch, generator)
    elif latents.shape[0] != batch:
        raise ValueError(f"latents batch {latents.shape[0]} does not match cond_emb's {batch}")
    embeddings = cond_emb
    if guidance_scale != 1:
        embeddings = torch.cat([uncond_emb.expand(batch, *uncond_emb.shape[1:]), cond_emb])  # (2B, L, D)
    for index in range(stop_index):
        eps = guided_epsilon(unet, ddim_scheduler, latents, schedule.timesteps[index], embeddings, guidance_scale)
        latents = schedule.step(eps, index, latents)
    return latents


def guided_epsilon(unet: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                   guidance_scale: float) -> torch.Tensor:
    """eps_u + s (eps_c - eps_u) from one UNet call; `embeddings` is [uncond; cond] unless s == 1.

    Outputs are converted to epsilon with the scheduler's prediction_type before guidance.
    """
    latents_in = latents if guidance_scale == 1 else torch.cat([latents, latents])  # (B or 2B, C, H, W)
    output = unet(scheduler.scale_model_input(latents_in, t), t, **unet_condition(unet, embeddings)).sample
    eps = to_epsilon(output, latents_in, t, scheduler)
    if guidance_scale == 1:
        return eps
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _epsilon_stepper(ddim_scheduler: Any, num_steps: int, device: Any) -> Any:
    """The DDIM scheduler itself, or for v-prediction a copy told that its input is epsilon."""
    if ddim_scheduler.config.get("prediction_type", "epsilon") == "epsilon":
        return ddim_scheduler
    stepper = type(ddim_scheduler).from_config(ddim_scheduler.config, prediction_type="epsilon")
    stepper.set_timesteps(num_steps, device=device)
    return stepper


def _check_stop_index(stop_index: int, num_steps: int) -> None:
    if not 0 <= stop_index <= num_steps:
        raise ValueError(f"stop_index {stop_index} outside [0, {num_steps}]")
