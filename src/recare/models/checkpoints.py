"""Reading and writing weights: safetensors only, loaded strictly.

Formats:
- Erased UNet: a safetensors file of UNet parameters in diffusers naming. Metadata key
  `recare_params` = "full" (every parameter; loads with strict=True into a stock
  UNet2DConditionModel) or "subset" (only the trained parameters; every key must exist in the
  UNet with the same shape). A diffusers folder (`unet/diffusion_pytorch_model.safetensors`)
  is read as "full". A released `.pt` state dict is read only with torch.load(weights_only=True)
  (no unpickling of arbitrary objects) and can be converted once with `convert_pt_to_safetensors`.
- Learned tokens: the layout diffusers' `load_textual_inversion` reads: {token: (dim,) tensor};
  SDXL: {"clip_l": (1, 768), "clip_g": (1, 1280)} with the token in the metadata (one per file).
- LoRA adapter (training with lora_rank > 0): the layout diffusers' pipeline
  `load_lora_weights(folder, weight_name=...)` reads: keys "unet.<module>.lora_A.weight" /
  "...lora_B.weight", metadata `lora_adapter_metadata` = JSON {"unet.<LoraConfig field>": value}
  (rank r, lora_alpha, target_modules, ...), plus any extra string metadata.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from recare.errors import RecareError
from recare.io import atomic_path

logger = logging.getLogger(__name__)

TRAIN_RECORD = "run.json"
"""The record `recare train` keeps beside its outputs; its "status" is "complete" once they are final."""


def check_finished_run(path: str | os.PathLike) -> None:
    """Refuse weights that sit beside the record of an unfinished training run (RecareError).

    A run killed between writing unet.safetensors and recording itself complete leaves a file
    that looks final; its run.json still says "running" (or "failed", "stopped", ...).
    """
    record_path = Path(path).parent / TRAIN_RECORD
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a recare record
    if not isinstance(record, dict) or not str(record.get("format", "")).startswith("recare-train/"):
        return
    status = record.get("status")
    if status != "complete":
        raise RecareError(f"{path} belongs to an unfinished training run ({record_path} says status {status!r}); "
                          "finish it with `recare train ... --resume` before using its weights")


def _read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.is_dir():
        weights_name = "diffusion_pytorch_model.safetensors"
        for candidate in (path / "unet" / weights_name, path / weights_name):
            if candidate.is_file():
                return load_file(candidate), {"recare_params": "full"}
        raise RecareError(f"no diffusion_pytorch_model.safetensors in {path} or {path / 'unet'}")
    if not path.is_file():
        raise RecareError(f"weights file not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors of many kinds; weights_only refuses arbitrary objects
            raise RecareError(f"cannot read {path} as a plain state dict (weights_only=True): {err}") from err
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RecareError(f"{path} does not hold a flat tensor state dict")
        return dict(state), {"recare_params": "full"}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise RecareError(f"cannot read {path} as safetensors: {err}") from err


def _copy_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 what: str, full: bool = True) -> None:
    """Copy `state` into `module`; a mismatch raises RecareError naming missing, unexpected or reshaped keys."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(set(own) - set(state)) if full else []
    if unexpected or reshaped or missing:
        parts = []
        for label, keys in (("unexpected", unexpected), ("wrong shape", reshaped), ("missing", missing)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise RecareError(f"checkpoint {path} does not match this {what}: " + "; ".join(parts))
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))
    logger.info("loaded %d %s tensors from %s", len(state), what, path)


def load_unet_weights(unet: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load erased-UNet weights strictly; a mismatch names the missing, unexpected or reshaped keys.

    Weights of an unfinished `recare train` run are refused (check_finished_run).
    """
    if Path(path).is_file():
        check_finished_run(path)
    state, metadata = _read_state_dict(path)
    _copy_strict(unet, state, path, "UNet", full=metadata.get("recare_params", "full") == "full")


def load_text_encoder_weights(text_encoder: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a whole replacement text encoder strictly (e.g. AdvUnlearn's released CLIP text encoder).

    `path` is a state-dict file (.safetensors, or .pt/.bin read with weights_only=True), a
    transformers CLIPTextModel folder (model.safetensors), or a diffusers pipeline folder
    (text_encoder/model.safetensors). Keys with or without the "text_model." prefix are accepted
    (transformers 4 and 5 save them differently); every parameter must be present.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "text_encoder" / "model.safetensors"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise RecareError(f"no model.safetensors in {path} or {path / 'text_encoder'}")
        path = found
    state, _ = _read_state_dict(path)
    own = text_encoder.state_dict()
    prefix = "text_model."
    if not any(k in own for k in state):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        else:
            state = {prefix + k: v for k, v in state.items()}
    # position_ids is a buffer some versions save and others do not: take ours when it is absent.
    state = dict(state)
    for name in own:
        if name.endswith("position_ids") and name not in state:
            state[name] = own[name]
    _copy_strict(text_encoder, state, path, "text encoder")


def save_unet_weights(unet: torch.nn.Module, path: str | os.PathLike, names: list[str] | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Save all UNet parameters (names=None) or the named subset as safetensors, atomically."""
    from safetensors.torch import save_file

    own = unet.state_dict()
    keys = list(own) if names is None else list(names)
    unknown = [k for k in keys if k not in own]
    if unknown:
        raise RecareError(f"not UNet parameters: {unknown[:3]}")
    meta = {"recare_params": "full" if names is None else "subset", **dict(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({k: own[k].detach().contiguous().cpu() for k in keys}, str(tmp), metadata=meta)


def save_unet_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                         metadata: Mapping[str, str] | None = None) -> None:
    """Save a FULL UNet state dict given as tensors (e.g. LoRA merged into the base), atomically."""
    from safetensors.torch import save_file

    meta = {"recare_params": "full", **dict(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=meta)


def save_lora_weights(weights: Mapping[str, torch.Tensor], lora_config: Mapping[str, object],
                      path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a UNet LoRA adapter (peft naming, no adapter name) in diffusers' pipeline layout, atomically.

    `lora_config`: the adapter's LoraConfig as a JSON-ready dict (see the module docstring).
    """
    import json

    from safetensors.torch import save_file

    adapter = json.dumps({f"unet.{k}": v for k, v in lora_config.items()}, sort_keys=True)
    meta = {"format": "pt", "lora_adapter_metadata": adapter, **dict(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({f"unet.{k}": v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp), metadata=meta)


def convert_pt_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Convert a released .pt UNet state dict (read with weights_only=True) to safetensors once."""
    from safetensors.torch import save_file

    state, _ = _read_state_dict(src)
    with atomic_path(dst) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"recare_params": "full"})


def save_learned_embeddings(embeddings: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            row_widths: Sequence[int] = ()) -> None:
    """Save learned tokens in the layout diffusers' `load_textual_inversion` reads, atomically.

    One text encoder (row_widths of length <= 1): {token: (dim,) embedding}. Two (SDXL, `row_widths`
    = (768, 1280)): ONE token per file, its concatenated row split into {"clip_l": (1, 768),
    "clip_g": (1, 1280)}, the token in the metadata ("token"), as SDXL embeddings are shared; a stock
    SDXL pipeline loads it with `load_textual_inversion(state["clip_l"], token=..., text_encoder=
    pipe.text_encoder, tokenizer=pipe.tokenizer)` and the same for clip_g / text_encoder_2.
    """
    from safetensors.torch import save_file

    metadata = None
    if len(row_widths) > 1:
        if len(embeddings) != 1 or len(row_widths) != len(SDXL_EMBEDDING_KEYS):
            raise RecareError(f"an SDXL embedding file holds one token for {len(SDXL_EMBEDDING_KEYS)} text encoders")
        (token, row), = embeddings.items()
        parts = row.detach().float().reshape(-1).split(list(row_widths))
        tensors = {key: part.reshape(1, -1) for key, part in zip(SDXL_EMBEDDING_KEYS, parts)}
        metadata = {"token": token}
    else:
        tensors = {k: v.detach().float().reshape(-1) for k, v in embeddings.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
"""Keys of an SDXL textual-inversion file: the rows of text_encoder and of text_encoder_2."""


def read_learned_embeddings(path: str | os.PathLike, row_widths: Sequence[int]) -> dict[str, torch.Tensor]:
    """{token: concatenated (sum(row_widths),) row} of a learned-embedding file (save_learned_embeddings)."""
    state, metadata = _read_state_dict(path)
    if not state:
        raise RecareError(f"{path} holds no embeddings")
    if len(row_widths) > 1:
        token = metadata.get("token")
        if set(state) != set(SDXL_EMBEDDING_KEYS) or not token:
            raise RecareError(f"{path} is not an SDXL embedding file: it needs tensors {list(SDXL_EMBEDDING_KEYS)} "
                              f"and a 'token' in its metadata (found {sorted(state)})")
        state = {token: torch.cat([state[k].reshape(-1) for k in SDXL_EMBEDDING_KEYS])}
    width = sum(row_widths)
    for token, vector in state.items():
        if vector.numel() != width:
            raise RecareError(f"embedding of {token!r} in {path} has {vector.numel()} values; "
                              f"this model needs {width}")
    return {token: vector.reshape(-1) for token, vector in state.items()}


def load_learned_embeddings(conditioner, path: str | os.PathLike) -> list[str]:
    """Add the tokens of a textual-inversion safetensors file to the model's tokenizer(s) and text encoder(s).

    `conditioner`: the model's PromptConditioner (SDComponents.conditioner()). Raises RecareError when
    a token already exists or the embedding width does not match. Returns the added tokens.
    """
    state = read_learned_embeddings(path, conditioner.row_widths)
    for token in state:
        if token in conditioner.tokenizer.get_vocab():
            raise RecareError(f"token {token!r} from {path} already exists in the tokenizer")
    for tokenizer, encoder in zip(conditioner.tokenizers, conditioner.text_encoders):
        tokenizer.add_tokens(list(state))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
    for token, vector in state.items():
        conditioner.set_token_row(conditioner.tokenizer.convert_tokens_to_ids(token), vector)
    logger.info("added learned tokens %s from %s", list(state), path)
    return list(state)
