"""Adaptive projected guidance and prediction-type conversion (method §4, 4c).

Adaptive projected guidance (APG) is from Sadat et al. (2024), "Eliminating Oversaturation and
Artifacts of High Guidance Scales in Diffusion Models" (arXiv 2410.02416): the guidance update
d = cond - uncond is split into a part parallel to the conditional prediction and a part
orthogonal to it, and the parallel part is down-weighted by eta. ReCARE (reference code
damilab/CARE, utils/apg.py) uses it, with a *minus* sign, to build erase targets, and a
compositional form (positive and negative concepts averaged separately) for stage 2.

Scale convention (kept from the reference): the update is multiplied by (scale - 1), so the
reference passes 2.0 for "one unit" of guidance ("the value has to be +1 of the scale you
intend"). With eta = 1, orth + par == d up to rounding, so both guidance functions reduce to
linear combinations of the predictions:
    normalized_guidance(cond, uncond, 2)                  == uncond
    compositional_guidance(H with -g, [a] with +g, uncond) == uncond + (g-1) d_a - (g+1) mean_h d_h
(at g = 2: uncond + d_a - 3 mean_h d_h, method §4).

All tensors are (B, C, H, W) or any shape whose last three dimensions are (C, H, W): norms and
inner products are taken per item over the last three dimensions.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

_CHW = (-3, -2, -1)


def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split v0 into its components parallel and orthogonal to v1, per item over (C, H, W).

    v1n = v1 / ||v1||; parallel = <v0, v1n> v1n; orthogonal = v0 - parallel (Sadat et al. 2024,
    Eq. 5). Computed in float64 and returned in v0's dtype. A zero v1 gives parallel = 0.

    Returns:
        (parallel, orthogonal), each shaped like v0.
    """
    if v0.shape != v1.shape:
        raise ValueError(f"project needs equal shapes, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    if v0.dim() < 3:
        raise ValueError(f"project needs tensors with (C, H, W) as last dimensions, got {v0.dim()}-D")
    dtype = v0.dtype
    a, b = v0.double(), v1.double()
    b_unit = b / torch.linalg.vector_norm(b, dim=_CHW, keepdim=True).clamp_min(1e-12)  # (B, C, H, W)
    parallel = (a * b_unit).sum(dim=_CHW, keepdim=True) * b_unit
    orthogonal = a - parallel
    return parallel.to(dtype), orthogonal.to(dtype)


def apg_update(cond: torch.Tensor, uncond: torch.Tensor, eta: float = 1.0,
               norm_threshold: float = 0.0) -> torch.Tensor:
    """The APG update orth + eta * par of d = cond - uncond, projected against cond (method §4).

    norm_threshold > 0 first rescales d to at most that norm per item, d * min(1, r / ||d||)
    (Sadat et al. 2024, Eq. 7, the reference's `norm_threshold`; its training passes 0 = off).
    """
    if norm_threshold < 0:
        raise ValueError(f"norm_threshold must be >= 0 (0: off), got {norm_threshold}")
    difference = cond - uncond
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(difference.double(), dim=_CHW, keepdim=True)
        difference = difference * (norm_threshold / norm).clamp(max=1.0).to(difference.dtype)
    parallel, orthogonal = project(difference, cond)
    return orthogonal + eta * parallel


def normalized_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, eta: float = 1.0,
                        norm_threshold: float = 0.0) -> torch.Tensor:
    """APG with the reference's sign: cond - (scale - 1) * (orth + eta * par) (method §4).

    Args:
        cond: conditional prediction eps(z, c), (B, C, H, W).
        uncond: unconditional prediction eps(z, ""), same shape.
        scale: guidance scale, "+1 of the scale you intend" (2.0: one unit, away from c).
        eta: weight of the component of d parallel to cond (1: plain difference).
        norm_threshold: clip ||d|| to this first (0: off, the reference's training); see apg_update.

    Returns:
        The guided prediction, cond's shape and dtype. At scale 2, eta 1 it equals uncond
        (within float rounding, ~4e-7 in fp32).
    """
    return cond - (scale - 1) * apg_update(cond, uncond, eta, norm_threshold)


def compositional_guidance(conds: Sequence[torch.Tensor], uncond: torch.Tensor, scales: Sequence[float],
                           eta: float = 1.0, norm_threshold: float = 0.0) -> torch.Tensor:
    """Compositional APG over several concepts (method §4; reference normalized_compositional_guidance).

    For each (cond_k, s_k): u_k = orth_k + eta * par_k of (cond_k - uncond) against cond_k.
    Concepts with s_k > 0 add (s_k - 1) u_k into P, the others (s_k <= 0, as in the reference,
    which tests `scale > 0`) add (s_k - 1) u_k into Q; P and Q are each divided by their count.

    Args:
        conds: predictions eps(z, c_k), each (B, C, H, W).
        uncond: eps(z, ""), same shape.
        scales: one scale per cond; e.g. -2.0 for an erased concept (factor -3), +2.0 for an
            anchor (factor +1).
        eta: weight of the parallel components.
        norm_threshold: clip each ||cond_k - uncond|| to this first (0: off); see apg_update.

    Returns:
        uncond + P + Q, uncond's shape and dtype.
    """
    if len(conds) == 0:
        raise ValueError("compositional_guidance needs at least one conditional prediction")
    if len(conds) != len(scales):
        raise ValueError(f"got {len(conds)} predictions but {len(scales)} scales")
    positive = torch.zeros_like(uncond)
    negative = torch.zeros_like(uncond)
    n_positive = n_negative = 0
    for cond, scale in zip(conds, scales):
        update = (scale - 1) * apg_update(cond, uncond, eta, norm_threshold)
        if scale > 0:
            positive, n_positive = positive + update, n_positive + 1
        else:
            negative, n_negative = negative + update, n_negative + 1
    return uncond + positive / max(n_positive, 1) + negative / max(n_negative, 1)


def to_epsilon(model_output: torch.Tensor, sample: torch.Tensor, timesteps: int | torch.Tensor,
               scheduler: Any) -> torch.Tensor:
    """Convert a UNet output to an epsilon prediction (method §4c).

    For v-prediction (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 and App. D):
    x_t = alpha_t x_0 + sigma_t eps and v = alpha_t eps - sigma_t x_0 give
    eps = alpha_t v + sigma_t x_t, with alpha_t = sqrt(alphas_cumprod[t]) and
    sigma_t = sqrt(1 - alphas_cumprod[t]). Epsilon outputs are returned unchanged.

    Args:
        model_output: the UNet output, (B, C, H, W).
        sample: the noisy latent x_t it was computed from, same shape.
        timesteps: the training-schedule timestep, an int, a 0-d tensor or one per item (B,).
        scheduler: a diffusers scheduler with `config.prediction_type` and `alphas_cumprod`.
    """
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return model_output
    if prediction_type != "v_prediction":
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose 'epsilon' or 'v_prediction'")
    # non_blocking: a host-to-device copy that does not wait for the GPU (the tables are small)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=model_output.device, dtype=torch.float64, non_blocking=True)
    if not isinstance(timesteps, torch.Tensor) or timesteps.device.type == "cpu":  # no check that waits on a GPU
        held = torch.as_tensor(timesteps).reshape(-1)
        if held.numel() and (held.min() < 0 or held.max() >= len(alphas_cumprod)):
            raise ValueError(f"timesteps {held.tolist()} outside the training schedule [0, {len(alphas_cumprod) - 1}]")
    t = torch.as_tensor(timesteps)
    t = t.to(model_output.device, non_blocking=True).long().reshape(-1)
    abar = alphas_cumprod[t].reshape(-1, *([1] * (model_output.dim() - 1)))  # (B or 1, 1, 1, 1)
    eps = abar.sqrt() * model_output.double() + (1 - abar).sqrt() * sample.double()
    return eps.to(model_output.dtype)
