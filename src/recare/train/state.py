"""Resumable training state: one safetensors file, written atomically (no pickles).

`train_state.safetensors` in the output folder holds
- tensors: `param.<name>` (the student's trainable parameters), `teacher.<name>` (the frozen
  teacher's values of those parameters when it is not the original model, i.e. stage-1 rounds
  >= 2), `optim.<name>.<key>` (optimizer state: exp_avg, exp_avg_sq, step), `rng.<name>`
  (torch.Generator.get_state(), uint8), `embed.<token>` (learned embeddings so far);
- metadata key `recare_state`: JSON with the position (phase index, step within the phase),
  the run identity, loss rows, timings, learned tokens and the stage-2 schedules.
Resuming from it reproduces an uninterrupted run bit for bit on the CPU (tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from recare.careset.artifact import CareSet
from recare.errors import RecareError
from recare.io import atomic_path
from recare.models.loading import SDComponents
from recare.train.config import TrainConfig

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.safetensors"
STAGE1_NAME = "stage1_state.safetensors"  # the state at the end of stage 1, kept (recare.train: stage1_from)
STATE_FORMAT = "recare-train-state/1"
_META_KEY = "recare_state"


@dataclass
class TrainState:
    """Where a run stands; `tensors` are CPU tensors keyed as in the module docstring."""

    identity: dict[str, Any]
    """The run identity (config and inputs) the state belongs to."""
    phase: int = 0
    """Index of the current phase in the run's phase plan."""
    step: int = 0
    """Steps of the current phase already done."""
    losses: list[list[Any]] = field(default_factory=list)
    """Loss rows [stage, round, step, loss, erase, retain]."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per phase name ("erase-1", "inversion-1", "stage2", ...)."""
    learned_tokens: list[str] = field(default_factory=list)
    """Learned placeholder tokens so far, in round order."""
    schedules: dict[str, list[int]] = field(default_factory=dict)
    """Stage-2 schedules as indices into the erase, anchor and retain lists."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Parameters, teacher values, optimizer state, RNG states, embeddings."""

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose key starts with `prefix.`, with the prefix removed."""
        start = len(prefix) + 1
        return {k[start:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def set_group(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the `prefix.` tensors (detached CPU copies)."""
        self.tensors = {k: v for k, v in self.tensors.items() if not k.startswith(prefix + ".")}
        self.tensors.update({f"{prefix}.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})


def save_state(state: TrainState, folder: str | os.PathLike, name: str = STATE_NAME) -> Path:
    """Write `folder`/`name` (train_state.safetensors) atomically."""
    from safetensors.torch import save_file

    meta = {"format": STATE_FORMAT, "identity": state.identity, "phase": state.phase, "step": state.step,
            "losses": state.losses, "timings": state.timings, "learned_tokens": state.learned_tokens,
            "schedules": state.schedules}
    path = Path(folder) / name
    with atomic_path(path) as tmp:
        save_file(state.tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    logger.info("training state saved: phase %d step %d", state.phase, state.step)
    return path


def load_state(folder: str | os.PathLike, name: str = STATE_NAME) -> TrainState | None:
    """Read `folder`/`name` (train_state.safetensors); None when there is none. RecareError when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META_KEY])
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise RecareError(f"cannot read training state {path}: {err}") from err
    if meta.get("format") != STATE_FORMAT:
        raise RecareError(f"{path} is not a recare training state ({meta.get('format')!r})")
    return TrainState(identity=meta["identity"], phase=meta["phase"], step=meta["step"], losses=meta["losses"],
                      timings=meta["timings"], learned_tokens=meta["learned_tokens"], schedules=meta["schedules"],
                      tensors=tensors)


def remove_state(folder: str | os.PathLike) -> None:
    """Delete the training state (after a completed run)."""
    (Path(folder) / STATE_NAME).unlink(missing_ok=True)


def check_parameters(saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], what: str) -> None:
    """RecareError unless `saved` has exactly the names and shapes of `current` (another architecture)."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = sorted(k for k in saved if k in current and tuple(saved[k].shape) != tuple(current[k].shape))
    if missing or unexpected or reshaped:
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:2])})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
                 if keys]
        raise RecareError(f"{what} does not match this UNet (another architecture or train_method?): "
                          + "; ".join(parts))


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as {"<param name>.<key>": tensor} (one param group)."""
    state = optimizer.state_dict()["state"]
    out = {}
    for index, entries in state.items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise RecareError(f"optimizer state {key!r} is not a tensor; cannot store it in safetensors")
            out[f"{names[index]}.{key}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str],
                           tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore state written by `optimizer_tensors` into a fresh optimizer over the same parameters."""
    by_param: dict[int, dict[str, torch.Tensor]] = {}
    index = {name: i for i, name in enumerate(names)}
    for key, value in tensors.items():
        name, _, entry = key.rpartition(".")
        if name not in index:
            raise RecareError(f"optimizer state for unknown parameter {name!r}")
        by_param.setdefault(index[name], {})[entry] = value.clone()
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": by_param, "param_groups": current["param_groups"]})


STAGE2_FIELDS = ("method", "stage2_iterations", "stage2_lr", "stage2_guidance", "retain_weight", "erase_set_tokens",
                 "stereo_anchors", "checkpoint_every")
"""TrainConfig fields that stage 1 does not read (checkpoint_every changes no number: resumes are exact)."""


EXECUTION_FIELDS = ("compile",)
"""TrainConfig fields that say how a run executes, not what it computes: not part of its identity, so a run
started compiled may be resumed eagerly (compiled kernels round differently: resumes are bit-identical only
under the same setting)."""


def run_identity(components: SDComponents, config: TrainConfig, careset: CareSet | None,
                 images: Sequence[str | os.PathLike], unet_weights: str | None = None) -> dict[str, Any]:
    """What makes two runs the same run: the config and the inputs (not paths of moved files)."""
    careset_digest = None
    if careset is not None and config.method_spec.needs_careset:
        blob = json.dumps([careset.reference_word, careset.anchors, careset.retain_prompts]).encode()
        careset_digest = hashlib.sha256(blob).hexdigest()
    settings = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}
    return {"config": settings, "model": components.source, "revision": components.revision,
            "unet_weights": unet_weights, "careset_sha256": careset_digest,
            "images": sorted(Path(p).name for p in images) if config.method_spec.needs_images else []}


def stage1_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The part of a run identity that determines stage 1 (no stage-2 settings, no CARE-set)."""
    config = {k: v for k, v in identity["config"].items() if k not in STAGE2_FIELDS}
    return {**{k: v for k, v in identity.items() if k != "careset_sha256"}, "config": config}
