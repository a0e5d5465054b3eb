"""The method table: one declaration per erasure method of what it needs and its defaults.

Every place that used to compare method strings asks this table instead (the trainer's phases,
the losses of an erase step, the inputs the CLI and the pipeline check, the defaults of
TrainConfig). Adding a method means one `ErasureMethod` entry plus its loss functions.

- ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models"; esd_sd.py of
  rohitgandikota/erasing): one erase phase, target eps*_c - s (eps*_c - eps*_u), Adam 5e-5.
- STEREO (Srivatsan et al. 2024): stage 1 (iterative erase + textual inversion, AdamW 0.5e-5),
  then the compositional erase of the target and the learned tokens anchored to STEREO's
  anchor prompts, no retain loss (method §4b).
- ReCARE (ICLR 2026): the same stage 1, then the compositional erase anchored to the CARE-set's
  words plus the retain loss on the CARE prompts (method §3 stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from recare.errors import RecareError
from recare.train.losses import esd_target, stage1_erase_target

EraseTarget = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
"""(eps*(z, c), eps*(z, ""), scale s, eta) -> the target of the erase step of stage 1 / ESD."""

ANCHORS_FROM_CARESET = "careset"
ANCHORS_FROM_CONFIG = "config"


def esd_erase_target(eps_concept: torch.Tensor, eps_uncond: torch.Tensor, scale: float, eta: float) -> torch.Tensor:
    """ESD's target eps*_c - s (eps*_c - eps*_u) (Gandikota et al. 2023, eq. 4; eta unused)."""
    return esd_target(eps_concept, eps_concept, eps_uncond, scale)


def apg_erase_target(eps_concept: torch.Tensor, eps_uncond: torch.Tensor, scale: float, eta: float) -> torch.Tensor:
    """Stage 1's target normalized_guidance(eps*_c, eps*_u, s) with APG weight eta (method §3a)."""
    return stage1_erase_target(eps_concept, eps_uncond, scale, eta)


@dataclass(frozen=True)
class ErasureMethod:
    """What one erasure method needs and does; consulted wherever the method matters."""

    name: str
    """Key used in configs and on the command line ("esd")."""
    display_name: str
    """Name in reports ("ESD")."""
    reference: str
    """Where the method comes from."""
    erase_target: EraseTarget
    """Target of the erase step (the ESD phase, or each stage-1 erase round)."""
    erase_lr: float
    """Default learning rate of the erase step."""
    erase_optimizer: str
    """Default optimizer of the erase step ('adam' or 'adamw', torch defaults)."""
    learns_tokens: bool
    """True: stage 1 of erase + textual-inversion rounds (needs target images), then stage 2.
    False: one erase phase (named 'esd') and nothing else."""
    stage2_anchors: str | None = None
    """Where stage 2's anchor prompts come from: 'careset' (the CARE-set's words), 'config'
    (TrainConfig.anchors, STEREO's list); None: no stage 2."""
    retain_loss: bool = False
    """Stage 2 adds lambda * the retain loss on the CARE-set's retain prompts."""

    @property
    def needs_images(self) -> bool:
        """Target images are needed (textual inversion of stage 1)."""
        return self.learns_tokens

    @property
    def needs_careset(self) -> bool:
        """A CARE-set is needed (anchors or retain prompts of stage 2)."""
        return self.stage2_anchors == ANCHORS_FROM_CARESET or self.retain_loss

    @property
    def needs_config_anchors(self) -> bool:
        """Stage 2 anchors to TrainConfig.anchors (a concept without defaults needs stereo_anchors)."""
        return self.stage2_anchors == ANCHORS_FROM_CONFIG

    @property
    def has_stage1(self) -> bool:
        """Stage 1 exists, so its state can be kept and shared with another method's run."""
        return self.learns_tokens


METHODS: dict[str, ErasureMethod] = {
    "esd": ErasureMethod(
        name="esd", display_name="ESD", reference="Gandikota et al. 2023 (ESD-u; esd_sd.py)",
        erase_target=esd_erase_target, erase_lr=5e-5, erase_optimizer="adam", learns_tokens=False),
    "stereo": ErasureMethod(
        name="stereo", display_name="STEREO", reference="Srivatsan et al. 2024 (method §4b)",
        erase_target=apg_erase_target, erase_lr=0.5e-5, erase_optimizer="adamw", learns_tokens=True,
        stage2_anchors=ANCHORS_FROM_CONFIG, retain_loss=False),
    "recare": ErasureMethod(
        name="recare", display_name="ReCARE", reference="ReCARE, ICLR 2026 (method §3)",
        erase_target=apg_erase_target, erase_lr=0.5e-5, erase_optimizer="adamw", learns_tokens=True,
        stage2_anchors=ANCHORS_FROM_CARESET, retain_loss=True),
}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> ErasureMethod:
    """The table entry of `name`; RecareError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise RecareError(f"unknown method {name!r}; choose one of {list(METHODS)}") from None
