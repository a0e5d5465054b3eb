"""`train`: one erasure run from start to outputs, resumable (method §3, 4, 4b; see recare.train.trainer).

Checks the inputs before anything is written, decides what the output folder holds (a new run,
one to resume, a finished one), runs the trainer and writes unet.safetensors, lora.safetensors,
learned_embeds-k.safetensors, losses.csv, losses.png and run.json.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from recare.careset.artifact import CareSet, reference_key
from recare.errors import RecareError
from recare.interrupts import graceful_stop, stop_requested
from recare.io import check_images, read_json, remove_stale_temporaries
from recare.models.checkpoints import save_lora_weights, save_unet_state_dict, save_unet_weights
from recare.models.loading import SDComponents
from recare.models.params import lora_adapter, merged_state_dict
from recare.models.precision import autocast_context
from recare.provenance import environment
from recare.train.config import TrainConfig
from recare.train.outputs import (
    LORA_NAME,
    LOSSES_CSV,
    LOSSES_PNG,
    LOSSES_SVG,
    RUN_FORMAT,
    RUN_JSON,
    UNET_NAME,
    check_output_folder,
    peak_memory,
    plot_losses,
    versions,
    write_losses_csv,
    write_run_json,
)
from recare.train.state import STAGE1_NAME, load_state, remove_state, run_identity
from recare.train.steps import LORA_ADAPTER
from recare.train.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` returns."""

    out_dir: Path
    """The output folder."""
    complete: bool
    """False when the run stopped early (stop_after, or a signal) and can be resumed."""
    learned_tokens: list[str]
    """Placeholder tokens learned so far."""
    losses: list[list[Any]]
    """Loss rows [stage, round, step, loss, erase, retain]."""
    timings: dict[str, float]
    """Seconds per phase."""
    interrupted: bool = False
    """True when SIGINT/SIGTERM stopped the run (its state is saved; resume continues it)."""


def check_inputs(components: SDComponents, config: TrainConfig, careset: CareSet | None,
                 images: Sequence[str | os.PathLike] = ()) -> None:
    """Bad input before anything is written: CARE-set vs concept, initializer, placeholders, and
    every target image decoded (a corrupt one would otherwise surface rounds into training)."""
    method = config.method_spec
    if components.unet.dtype != torch.float32:
        raise RecareError(f"training needs the UNet's float32 master weights, got {components.unet.dtype}: load the "
                          "model in fp32 and set mixed_precision (bf16 autocast) for low-precision compute; saved "
                          "weights are never cast behind your back")
    if method.needs_images:
        if not images:
            raise RecareError(f"{method.display_name} training needs target images for textual inversion")
        check_images(images, "target image")
    if method.needs_careset:
        if careset is None:
            raise RecareError(f"{method.display_name} training needs a CARE-set (anchors and retain prompts)")
        if reference_key(careset.reference_word) != reference_key(config.concept):
            raise RecareError(f"the CARE-set is for {careset.reference_word!r}, not the concept {config.concept!r}")
        if not careset.anchors or not careset.retain_prompts:
            raise RecareError("the CARE-set has no anchors or no retain prompts")
    if not method.learns_tokens:
        return
    tokenizer = components.tokenizer
    vocab = tokenizer.get_vocab()
    for k in range(1, config.rounds + 1):
        if config.placeholder(k) in vocab:
            raise RecareError(f"placeholder {config.placeholder(k)!r} already exists in the tokenizer; "
                              "set placeholder_template to a new name")
    if config.inversion.initializer_mode == "word":
        ids = tokenizer.encode(config.initializer, add_special_tokens=False)
        if len(ids) != 1:
            raise RecareError(f"initializer {config.initializer!r} is {len(ids)} tokens "
                              f"{tokenizer.convert_ids_to_tokens(ids)}, not one whole word")
    elif tokenizer.convert_tokens_to_ids(config.initializer) in (None, tokenizer.unk_token_id):
        raise RecareError(f"initializer {config.initializer!r} is not an entry of the tokenizer vocabulary")


def train(components: SDComponents, config: TrainConfig, out_dir: str | os.PathLike, *,
          careset: CareSet | None = None, images: Sequence[str | os.PathLike] = (),
          device: str | torch.device | None = None, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, info: dict[str, Any] | None = None, unet_weights: str | None = None,
          progress: bool = True, stage1_from: str | os.PathLike | None = None) -> TrainResult:
    """Erase `config.concept` from `components` (modified in place) and write the outputs to `out_dir`.

    Args:
        components: SD components in float32 on `device` (the UNet is trained in place; with
            config.lora_rank > 0 it keeps the trained LoRA adapter "recare"; the tokenizer and text
            encoder get the learned tokens).
        config: TrainConfig.
        out_dir: output folder: unet.safetensors (the full UNet, LoRA merged), lora.safetensors
            (LoRA runs), learned_embeds-k.safetensors, run.json, losses.csv, losses.png, and
            train_state.safetensors while the run is unfinished.
        careset: the CARE-set (ReCARE; its reference word must match the concept).
        images: target images for textual inversion (ReCARE/STEREO), split into one slice per round.
        device: where training runs (default: the UNet's device).
        resume: continue the run saved in out_dir (a finished run is left as it is).
        overwrite: replace outputs of another run in out_dir.
        stop_after: stop (resumably) after this many erase/stage-2 steps in this call.
        info: extra facts recorded in run.json (e.g. file paths); not part of the run identity.
        unet_weights: the UNet weights file loaded into components, recorded in the identity.
        progress: tqdm bars.
        stage1_from: folder of a ReCARE or STEREO run with the same stage-1 settings and inputs: start
            at stage 2 with its learned tokens and generator state (module docstring); used only when
            this run starts from the beginning.
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else components.unet.device
    check_inputs(components, config, careset, images)
    autocast_context(config.mixed_precision, device)  # validates the mode for the device
    identity = run_identity(components, config, careset, images, unet_weights)
    trainer = Trainer(components, config, out_dir, device, careset, images, identity, info or {}, progress)
    decision = check_output_folder(out_dir, identity, resume, overwrite)
    if decision == "complete":
        logger.info("%s already holds this finished run; nothing to do", out_dir)
        run = read_json(out_dir / RUN_JSON, "run file")
        timings = {k: v for k, v in run.get("timings_s", {}).items() if k != "total"}
        return TrainResult(out_dir, True, list(run.get("learned_tokens", [])), [], timings)
    state = load_state(out_dir) if decision == "resume" else None
    if state is not None:
        trainer.restore(state)
    elif decision == "resume":
        logger.info("no training state in %s: starting from the beginning", out_dir)
    if state is None and stage1_from is not None:
        trainer.adopt_stage1(stage1_from)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    complete, interrupted = _run_recorded(trainer, stop_after)
    if complete:
        remove_state(out_dir)
    remove_stale_temporaries(out_dir)
    state = trainer.state
    return TrainResult(out_dir, complete, list(state.learned_tokens), state.losses, dict(state.timings),
                       interrupted=interrupted and not complete)


def _write_outputs(trainer: Trainer) -> None:
    config = trainer.config
    metadata = {"recare_method": config.method, "recare_concept": config.concept}
    if config.lora_rank == 0:
        save_unet_weights(trainer.unet, trainer.out_dir / UNET_NAME, metadata=metadata)
    else:
        save_unet_state_dict(merged_state_dict(trainer.unet, LORA_ADAPTER), trainer.out_dir / UNET_NAME, metadata)
        weights, lora_config = lora_adapter(trainer.unet, LORA_ADAPTER)
        modules = sorted({name.partition(".lora_")[0] for name in trainer.trainable})  # peft shortens its list
        save_lora_weights(weights, lora_config, trainer.out_dir / LORA_NAME,
                          metadata={**metadata, "recare_train_method": config.train_method,
                                    "recare_lora_rank": str(config.lora_rank),
                                    "recare_lora_alpha": str(config.effective_lora_alpha),
                                    "recare_lora_target_modules": json.dumps(modules)})
    write_losses_csv(trainer.out_dir / LOSSES_CSV, trainer.state.losses)
    title = f"{config.method}: {config.concept}"
    reused = Path(trainer.info["stage1_from"]).name if trainer.info.get("stage1_from") else None
    if reused:
        title += f" (stage 1 reused from {reused}: same recipe and seed)"
    plot_losses(trainer.out_dir / LOSSES_PNG, trainer.state.losses, title, svg_path=trainer.out_dir / LOSSES_SVG,
                stage1_from=reused)


def _run_recorded(trainer: Trainer, stop_after: int | None) -> tuple[bool, bool]:
    """Run the trainer (SIGINT/SIGTERM stop it gracefully) and write the outputs; run.json says
    "running", then "complete", "stopped", "interrupted" or "failed". Returns (complete, interrupted)."""
    _write_record(trainer, "running")
    try:
        with graceful_stop():
            complete = trainer.run(stop_after)
            interrupted = stop_requested()
        if complete:
            _write_outputs(trainer)
    except BaseException as err:  # a full disk, a bad loss, a second Ctrl-C: run.json must not say "running"
        _record_failure(trainer, err)
        raise
    _write_record(trainer, "complete" if complete else "interrupted" if interrupted else "stopped")
    return complete, interrupted


def _record_failure(trainer: Trainer, err: BaseException) -> None:
    """Mark run.json "failed" (or "interrupted") with the reason; never raises.

    The atomic write needs room for a second file; on a full disk it falls back to rewriting
    run.json in place with a short record.
    """
    status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
    reason = f"{type(err).__name__}: {err}"
    try:
        _write_record(trainer, status, error=reason)
        return
    except Exception:  # noqa: BLE001 - recording must not hide the original error
        pass
    path = trainer.out_dir / RUN_JSON
    try:
        with open(path, "r+", encoding="utf-8") as handle:
            handle.write(json.dumps({"format": RUN_FORMAT, "status": status, "error": reason,
                                     "identity": trainer.identity}))
            handle.truncate()
    except Exception:  # noqa: BLE001
        logger.error("could not record the failure in %s", path)


def _write_record(trainer: Trainer, status: str, error: str | None = None) -> None:
    state, config = trainer.state, trainer.config
    weights = [UNET_NAME, LORA_NAME] if config.lora_rank else [UNET_NAME]
    outputs = [*weights, LOSSES_CSV, LOSSES_PNG, LOSSES_SVG] if status == "complete" else []
    outputs += [f"learned_embeds-{k}.safetensors" for k in range(1, len(state.learned_tokens) + 1)]
    if (trainer.out_dir / STAGE1_NAME).is_file():
        outputs.append(STAGE1_NAME)
    write_run_json(trainer.out_dir, {
        "status": status, "identity": trainer.identity, "info": trainer.info,
        "seeds": {"seed": config.seed, "reseed_each_round": config.reseed_each_round},
        "versions": versions(), "environment": environment(), "device": str(trainer.device),
        "execution": {"compile": config.compile, "compile_mode": trainer.compile_mode or "off",
                      "mixed_precision": config.mixed_precision},
        "position": {"phase": state.phase, "step": state.step, "phases": [p.name for p in trainer.phases]},
        "timings_s": {**state.timings, "total": sum(state.timings.values())},
        "peak_memory": peak_memory(trainer.device), "learned_tokens": state.learned_tokens,
        "trainable": {"mode": config.train_method, "tensors": len(trainer.trainable),
                      "parameters": sum(p.numel() for p in trainer.trainable.values()),
                      "lora": {"rank": config.lora_rank, "alpha": config.effective_lora_alpha}
                      if config.lora_rank else None},
        "outputs": outputs, **({"error": error} if error is not None else {}),
    })
