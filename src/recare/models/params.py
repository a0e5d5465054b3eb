"""Which UNet parameters the student trains (method §3: train_method), and an optional LoRA.

Modes follow the reference code (damilab/CARE, utils/utils.py FineTunedModel) and ESD's
diffusers script (rohitgandikota/erasing, esd_sd.py): only the weights and biases of
`nn.Linear` and `nn.Conv2d` modules are candidates; normalisation layers are never trained.
Module names are diffusers' UNet2DConditionModel names; "attn1" is self-attention, "attn2"
cross-attention (the text-conditioned projections).

- "noxattn" (ESD-u, reference default): every Linear/Conv2d whose name has no "attn2" part.
  As in the reference and esd_sd.py this INCLUDES time_embedding.*, conv_in and conv_out.
  (ESD's original CompVis script also excluded `time_embed` and the output block `out.` and
  trained normalisation layers; that variant is not offered.)
- "xattn" (ESD-x): Linear/Conv2d inside "attn2" (to_q, to_k, to_v, to_out.0).
- "xattn-strict": only attn2.to_k and attn2.to_v, as in esd_sd.py's esd-x-strict. (The
  reference's xattn-strict condition can never hold and selects nothing.)
- "selfattn": Linear/Conv2d inside "attn1".
- "full": every Linear/Conv2d (the reference's "full_unet", esd_sd.py's "esd-all").
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from recare.errors import RecareError

logger = logging.getLogger(__name__)

NamedParameters = list[tuple[str, nn.Parameter]]

_MODULE_FILTERS: dict[str, Callable[[list[str]], bool]] = {
    "noxattn": lambda parts: "attn2" not in parts,
    "xattn": lambda parts: "attn2" in parts,
    "xattn-strict": lambda parts: "attn2" in parts and parts[-1] in ("to_k", "to_v"),
    "selfattn": lambda parts: "attn1" in parts,
    "full": lambda parts: True,
}
TRAIN_MODES = tuple(_MODULE_FILTERS)


def select_modules(unet: nn.Module, mode: str) -> list[str]:
    """Names of the Linear/Conv2d modules of `unet` that `mode` trains (see module docstring)."""
    if mode not in _MODULE_FILTERS:
        raise ValueError(f"unknown train mode {mode!r}; choose one of {list(TRAIN_MODES)}")
    keep = _MODULE_FILTERS[mode]
    return [name for name, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and keep(name.split("."))]


def select_parameters(unet: nn.Module, mode: str) -> NamedParameters:
    """(name, parameter) pairs the student trains in `mode`, names as in unet.named_parameters().

    Raises:
        ValueError: unknown mode.
        RecareError: the mode selects nothing in this UNet.
    """
    modules = dict(unet.named_modules())
    selected = [(f"{name}.{pname}", param) for name in select_modules(unet, mode)
                for pname, param in modules[name].named_parameters(recurse=False)]
    if not selected:
        raise RecareError(f"train mode {mode!r} selects no parameters in this {type(unet).__name__}")
    return selected


def set_trainable(unet: nn.Module, mode: str) -> NamedParameters:
    """Freeze all of `unet`, unfreeze the parameters `mode` selects, and return them."""
    selected = select_parameters(unet, mode)
    unet.requires_grad_(False)
    for _, param in selected:
        param.requires_grad_(True)
    logger.info("train mode %s: %d tensors, %d parameters", mode, len(selected),
                sum(p.numel() for _, p in selected))
    return selected


def add_lora(unet: nn.Module, rank: int, alpha: float, target: str = "noxattn",
             adapter_name: str = "recare", generator: torch.Generator | None = None) -> list[str]:
    """Add a LoRA adapter (Hu et al. 2021) via peft to the modules `target` selects.

    The base weights are frozen; the LoRA B matrices start at zero, so the UNet's output is
    unchanged until training. diffusers' adapter API (`unet.disable_adapters()`) then gives the
    frozen teacher's predictions from the same module.

    Args:
        unet: a diffusers UNet2DConditionModel (needs peft installed).
        rank: LoRA rank r (>= 1).
        alpha: LoRA alpha; the update is scaled by alpha / rank.
        target: a train mode (TRAIN_MODES) naming the Linear/Conv2d modules that get LoRA.
        adapter_name: the peft adapter name.
        generator: draws the A matrices (peft's init, kaiming-uniform with a = sqrt(5)) when given,
            so that the same seed gives the same adapter; None: peft draws them from torch's global RNG.

    Returns:
        Names of the trainable (LoRA) parameters, as in unet.named_parameters().
    """
    from peft import LoraConfig

    if int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    modules = select_modules(unet, target)
    if not modules:
        raise RecareError(f"LoRA target {target!r} selects no modules in this {type(unet).__name__}")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=modules, init_lora_weights=True)
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=adapter_name)
    names = [name for name, param in unet.named_parameters() if param.requires_grad]
    if generator is not None:
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if param.requires_grad and f".lora_A.{adapter_name}." in name:
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
    logger.info("LoRA r=%d alpha=%g on %d modules (%s): %d trainable tensors", rank, alpha, len(modules), target,
                len(names))
    return names


def merged_state_dict(unet: nn.Module, adapter_name: str = "recare") -> dict[str, torch.Tensor]:
    """The state dict of the stock UNet with each LoRA update folded into its base weight.

    W' = W + (alpha / r) B A (peft's get_delta_weight; reshaped for Conv2d), under the stock key
    names (`<module>.base_layer.weight` -> `<module>.weight`); the adapter tensors are left out.
    The result loads with strict=True into a UNet without adapters.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {name: module for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)}
    merged = {}
    with torch.no_grad():
        for key, value in unet.state_dict().items():
            if ".lora_" in key:  # lora_A / lora_B of an adapter layer: no stock UNet key has "lora_"
                continue
            owner, wrapped, leaf = key.partition(".base_layer.")
            if wrapped:
                key = f"{owner}.{leaf}"
                if leaf == "weight":
                    value = value + tuners[owner].get_delta_weight(adapter_name).to(value.dtype)
            merged[key] = value.detach()
    return merged


def lora_adapter(unet: nn.Module, adapter_name: str = "recare") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's weights in peft's saved naming (no adapter name) and its LoraConfig as a JSON-ready dict."""
    from peft.utils import get_peft_model_state_dict

    weights = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    config = {key: sorted(value) if isinstance(value, (set, frozenset)) else value
              for key, value in unet.peft_config[adapter_name].to_dict().items()}
    return weights, config
