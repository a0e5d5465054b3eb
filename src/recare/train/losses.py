"""Erasure loss targets as pure functions of noise predictions (method §3, 4, 4b).

Every function takes epsilon predictions (convert v-prediction outputs first with
recare.guidance.to_epsilon) of shape (B, C, H, W) computed at the same noisy latent z and
timestep t. Targets come from the frozen teacher theta*; predictions from the student theta.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from recare.train.guidance import compositional_guidance, normalized_guidance


def esd_target(eps_from: torch.Tensor, eps_concept: torch.Tensor, eps_uncond: torch.Tensor,
               negative_guidance: float = 2.0) -> torch.Tensor:
    """ESD target as in esd_sd.py of Gandikota et al. (2023), "Erasing Concepts from Diffusion Models" (method §4b).

    eps*(z, c_from) - eta * (eps*(z, c) - eps*(z, "")) with eta = negative_guidance. With
    c_from = c this is eps_c - eta (eps_c - eps_u): at eta = 2, 2 eps_u - eps_c, which is the
    paper's target eps_u - eta' (eps_c - eps_u) at eta' = 1. (The original CompVis script
    used eps_u as the base: pass eps_from = eps_uncond for that form.)
    """
    return eps_from - negative_guidance * (eps_concept - eps_uncond)


def stage1_erase_target(eps_concept: torch.Tensor, eps_uncond: torch.Tensor, scale: float = 2.0,
                        eta: float = 1.0) -> torch.Tensor:
    """ReCARE stage-1 erase target (method §3a): normalized_guidance(eps*(z,c), eps*(z,""), scale, eta).

    At the reference default scale 2, eta 1 it is exactly eps*(z, "") (up to rounding): the
    concept is mapped to the unconditional prediction, unlike ESD's 2 eps_u - eps_c.
    """
    return normalized_guidance(eps_concept, eps_uncond, scale, eta)


def recare_erase_target(eps_erase: Sequence[torch.Tensor], eps_anchor: torch.Tensor | Sequence[torch.Tensor],
                        eps_uncond: torch.Tensor, guidance: float = 2.0, eta: float = 1.0) -> torch.Tensor:
    """ReCARE stage-2 erase target E (method §3, stage 2).

    compositional_guidance of the erase set H with scale -guidance each and the anchor(s) with
    scale +guidance, around eps*(z, ""). At guidance 2, eta 1:
    E = eps_u + d_a - 3 mean_h d_h with d = eps*(z, .) - eps_u.

    Args:
        eps_erase: teacher predictions for every erase concept h in H (target + learned tokens).
        eps_anchor: teacher prediction for the anchor a (or a list of anchors, averaged).
        eps_uncond: teacher prediction for "".
        guidance: g, the compositional guidance scale.
        eta: APG weight of the parallel components.
    """
    anchors = [eps_anchor] if isinstance(eps_anchor, torch.Tensor) else list(eps_anchor)
    erase = list(eps_erase)
    if not erase or not anchors:
        raise ValueError(f"need at least one erase and one anchor prediction, got {len(erase)} and {len(anchors)}")
    scales = [-guidance] * len(erase) + [guidance] * len(anchors)
    return compositional_guidance(erase + anchors, eps_uncond, scales, eta)


def retain_target(eps_teacher_retain: torch.Tensor) -> torch.Tensor:
    """CARE retain target (method §3, stage 2): the teacher's prediction eps*(z, r), detached."""
    return eps_teacher_retain.detach()


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (fp16/bf16 predictions are upcast), target detached."""
    return F.mse_loss(prediction.float(), target.detach().float(), reduction="mean")


def recare_loss(pred_erase: torch.Tensor, target_erase: torch.Tensor, pred_retain: torch.Tensor,
                target_retain: torch.Tensor, retain_weight: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = L_erase + lambda * L_retain with mean-squared errors (method §3, stage 2).

    Returns:
        (total, erase, retain) scalar tensors; gradients flow only through the predictions.
    """
    erase = mse(pred_erase, target_erase)
    retain = mse(pred_retain, target_retain)
    return erase + retain_weight * retain, erase, retain
