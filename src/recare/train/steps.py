"""The building blocks of an erasure iteration (method §3): parameter selection, teacher/student
predictions, the stage-1 and stage-2 losses of one batch, autocast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.func import functional_call

from recare.errors import RecareError
from recare.models.conditioning import PromptConditioner, unet_condition
from recare.models.params import add_lora, set_trainable
from recare.train.config import TrainConfig
from recare.train.guidance import to_epsilon
from recare.train.losses import mse, recare_erase_target, recare_loss
from recare.train.sampling import (
    initial_latents,
    sample_stop_index,
)

logger = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between host syncs for loss logging (no per-step .item())
LORA_ADAPTER = "recare"  # peft adapter name of the LoRA student

Params = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- building blocks


def balanced_schedule(items: Sequence[Any], n: int, generator: torch.Generator) -> list[Any]:
    """n draws in which every item appears about equally often (method §3 stage 2).

    As the reference builds its erase/anchor/retain lists: each item repeated floor(n / len)
    times and the whole list shuffled once, then the n mod len remaining draws taken WITHOUT
    replacement from the items and appended unshuffled. Randomness from `generator` only.
    """
    if not items:
        raise RecareError("balanced_schedule needs at least one item")
    repeats, remainder = divmod(n, len(items))
    base = [item for item in items for _ in range(repeats)]
    order = torch.randperm(len(base), generator=generator).tolist()
    extra = torch.randperm(len(items), generator=generator)[:remainder].tolist()
    return [base[i] for i in order] + [items[i] for i in extra]


class PromptEmbeddings:
    """Packed prompt conditionings (recare.models.conditioning), computed once per prompt.

    Each prompt is encoded ALONE: a prompt's conditioning then never depends on which other prompts
    were missing from the cache at the time (a linear layer on one row and on several rows may round
    differently, e.g. SDXL's pooled projection), so a resumed run rebuilds exactly the same table.
    """

    def __init__(self, conditioner: PromptConditioner):
        self.conditioner = conditioner
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), L, D) float32 conditionings on the encoders' device (SDXL: L + 1 rows)."""
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[prompt] = self.conditioner.encode([prompt])
        return torch.cat([self._cache[p] for p in prompts])


def trainable_parameters(unet, config: TrainConfig) -> Params:
    """The student's trainable tensors by name (everything else in `unet` is frozen).

    lora_rank 0: the parameters `train_method` selects (recare.params.set_trainable). lora_rank r > 0:
    the parameters of a new LoRA adapter on the modules `train_method` selects; its A matrices are
    drawn from a generator seeded with config.seed (same seed, same adapter; B = 0).
    """
    if config.lora_rank == 0:
        return dict(set_trainable(unet, config.train_method))
    if getattr(unet, "peft_config", None):
        raise RecareError(f"the UNet already carries adapters {sorted(unet.peft_config)}; LoRA training needs a "
                          "UNet without adapters")
    names = add_lora(unet, config.lora_rank, config.effective_lora_alpha, target=config.train_method,
                     adapter_name=LORA_ADAPTER, generator=torch.Generator().manual_seed(config.seed))
    params = dict(unet.named_parameters())
    return {name: params[name] for name in names}


def teacher_copy(params: Params, dtype: torch.dtype | None) -> Params:
    """Frozen copies of trainable parameters for teacher calls, stored in `dtype` (None: as they are).

    The trainable tensors are weights and biases of Linear/Conv2d layers only (recare.params; the
    LoRA A/B matrices are Linear/Conv2d weights too), and bf16 autocast casts exactly those to
    bf16 before every matmul/convolution; so a bf16 copy gives bit-identical teacher predictions
    under bf16 autocast at half the memory.
    """
    return {name: p.detach().to(dtype=dtype or p.dtype, copy=True) for name, p in params.items()}


def draw_start(generator: torch.Generator, unet, ddim, config: TrainConfig) -> tuple[int, torch.Tensor]:
    """The random inputs of one iteration: a stop index i ~ U[stop_range] and fresh noise (1, C, H, W)."""
    stop = sample_stop_index(generator, *config.stop_range)
    return stop, initial_latents(unet, ddim, 1, generator)


def teacher_epsilon(unet, teacher: Params, scheduler, z: torch.Tensor, t: torch.Tensor,
                    emb: torch.Tensor) -> torch.Tensor:
    """eps*(z, t, p) for every prompt embedding in `emb` (n, L, D): ONE no-grad UNet call.

    The teacher is `unet` with the values `teacher` swapped in for its trainable parameters.
    Returns (n, C, H, W) float32 epsilon predictions.
    """
    latents = z.expand(emb.shape[0], -1, -1, -1)  # (n, C, H, W)
    with torch.no_grad():
        out = functional_call(unet, teacher, (scheduler.scale_model_input(latents, t), t),
                              unet_condition(unet, emb)).sample
    return to_epsilon(out, latents, t, scheduler).float()


def student_epsilon(unet, scheduler, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """eps_theta(z, t, p) for every prompt embedding in `emb`, with gradients: one UNet call."""
    latents = z.expand(emb.shape[0], -1, -1, -1)
    out = unet(scheduler.scale_model_input(latents, t), t, **unet_condition(unet, emb)).sample
    return to_epsilon(out, latents, t, scheduler)


def stage1_loss(unet, teacher: Params, scheduler, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """MSE(eps_theta(z, c), target) with the method's erase target (recare.train.methods).

    ReCARE/STEREO: normalized_guidance(eps*(z,c), eps*(z,""), s); ESD: eps*_c - s (eps*_c - eps*_u).
    cond/uncond: (1, L, D).
    """
    eps = teacher_epsilon(unet, teacher, scheduler, z, t, torch.cat([uncond, cond]))
    eps_uncond, eps_concept = eps[:1], eps[1:]
    target = config.method_spec.erase_target(eps_concept, eps_uncond, config.negative_guidance, config.eta)
    return mse(student_epsilon(unet, scheduler, z, t, cond), target)


def table_rows(table: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """table[indices] for host integers, as slices: no index tensor to copy to the device (no host sync)."""
    return torch.cat([table[i:i + 1] for i in indices])


@dataclass(frozen=True)
class Stage2Rows:
    """Rows of the prompt-embedding table used by one stage-2 iteration."""

    uncond: int
    """Row of ""."""
    erase_set: tuple[int, ...]
    """Rows of H = [target] + learned tokens."""
    concept: int
    """Row of this iteration's erase concept h (one of erase_set)."""
    anchor: int
    """Row of the anchor a."""
    retain: int | None
    """Row of the retain prompt r; None for STEREO (no retain loss)."""


def stage2_loss(unet, teacher: Params, scheduler, z: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                rows: Stage2Rows, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """L = MSE(eps_theta(z,h), E) + lambda MSE(eps_theta(z,r), eps*(z,r)) (method §3 stage 2).

    E = recare_erase_target({eps*(z,h')}_H, eps*(z,a), eps*(z,"")). One teacher call on
    ["", H..., a, r] and one student call on [h, r]. Without a retain row (STEREO) L = L_erase.

    Returns:
        (total, erase, retain or None) scalar tensors.
    """
    retain = [] if rows.retain is None else [rows.retain]
    eps = teacher_epsilon(unet, teacher, scheduler, z, t, table_rows(table, [rows.uncond, *rows.erase_set, rows.anchor,
                                                                          *retain]))
    n_erase = len(rows.erase_set)
    eps_erase, eps_anchor = eps[1:1 + n_erase], eps[1 + n_erase:2 + n_erase]
    target = recare_erase_target(list(eps_erase.split(1)), eps_anchor, eps[:1], config.stage2_guidance, config.eta)
    pred = student_epsilon(unet, scheduler, z, t, table_rows(table, [rows.concept, *retain]))
    if rows.retain is None:
        erase = mse(pred, target)
        return erase, erase, None
    return recare_loss(pred[:1], target, pred[1:], eps[-1:], config.retain_weight)


