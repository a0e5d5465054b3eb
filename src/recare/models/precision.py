"""Precision policy, once for every command: the weights dtype of 'auto' and the autocast dtype of a mode.

- Weights ('auto'): fp16 on CUDA (the reference's generation dtype), fp32 elsewhere. Training
  always loads fp32 master weights.
- Autocast (`mixed_precision`): 'no' = none; 'auto' = bf16 on CUDA (fp16 where the card has no
  bf16 and the caller scales its gradients), none on the CPU; 'bf16' explicitly on CUDA or the CPU
  (torch's CPU autocast: the code path a GPU takes, testable without one); 'fp16' on CUDA only.
"""

from __future__ import annotations

import contextlib

import torch

from recare.errors import RecareError

WEIGHT_DTYPES = ("auto", "fp32", "fp16", "bf16")
MIXED_PRECISION_MODES = ("auto", "no", "fp16", "bf16")


def resolve_weights_dtype(name: str, device: str | torch.device) -> str:
    """`name`, or for 'auto' fp16 on CUDA and fp32 elsewhere."""
    if name != "auto":
        return name
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def autocast_dtype(mode: str, device: torch.device, fp16_ok: bool = False) -> torch.dtype | None:
    """The autocast dtype of `mode` on `device`; None = plain fp32/native weights.

    fp16_ok: the caller scales gradients (GradScaler), so 'auto' may fall back to fp16 on a CUDA
    card without bf16 and 'fp16' is allowed.
    """
    if mode not in MIXED_PRECISION_MODES:
        raise RecareError(f"unknown mixed_precision {mode!r}; choose one of {list(MIXED_PRECISION_MODES)}")
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16" and device.type == "cpu":
        return torch.bfloat16
    if device.type != "cuda":
        raise RecareError(f"mixed_precision={mode!r} needs a CUDA device (bf16 also runs on the CPU), got {device}")
    if mode == "fp16" and not fp16_ok:
        raise RecareError("mixed_precision='fp16' is not offered here (no gradient scaling); use 'bf16' or 'no'")
    if mode == "auto":
        return torch.float16 if fp16_ok and not torch.cuda.is_bf16_supported() else torch.bfloat16
    return torch.float16 if mode == "fp16" else torch.bfloat16


def autocast_context(mode: str, device: torch.device,
                     fp16_ok: bool = False) -> contextlib.AbstractContextManager:
    """torch.autocast with autocast_dtype(mode, device, fp16_ok), or nothing."""
    dtype = autocast_dtype(mode, device, fp16_ok)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists on this machine; RecareError naming the problem otherwise.

    Accepts cpu, cuda, cuda:N (N below the visible GPU count) and mps where torch offers it.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise RecareError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RecareError(f"device {str(device)!r}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise RecareError(f"device {str(device)!r}: this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
    elif resolved.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RecareError(f"device {str(device)!r}: MPS is not available on this machine")
    elif resolved.type != "cpu":
        raise RecareError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return resolved


@contextlib.contextmanager
def vae_encode_precision(vae: torch.nn.Module):
    """Run the VAE in float32 while active when its config asks for it (`force_upcast`, SDXL's VAE) and its
    weights are float16: SDXL's VAE overflows in fp16, as diffusers' SDXL pipelines know (they upcast it
    to decode). Weights go back to float16 afterwards. Yields the dtype to feed it."""
    upcast = bool(getattr(vae.config, "force_upcast", False)) and vae.dtype == torch.float16
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
