"""Loading models: Stable Diffusion components and CLIP-like image-text models.

This is the only module that reads model weights from the Hub or disk. Every algorithm in
recare receives the loaded components as arguments. Hub ids and local folders are both
accepted; with HF_HUB_OFFLINE=1 only the local Hugging Face cache is consulted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from recare.errors import RecareError
from recare.models.conditioning import PromptConditioner, is_sdxl_unet
from recare.models.preprocess import DEVICE_TYPES, TensorImageProcessor, log_once, tensor_processor_or_none

logger = logging.getLogger(__name__)

DEFAULT_SD_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
MODEL_NOTE_FILE = "recare_model_note.json"
"""Optional file of a model folder: {"note": "..."} says what the model is (e.g. "not Stable Diffusion");
recare.eval puts the note into every results file and report of that model."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map 'fp32'/'fp16'/'bf16' (or their long names) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise RecareError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_source(source: str | os.PathLike, what: str = "model") -> str:
    """Return a local folder path or a Hub id; raise RecareError for a path that does not exist."""
    text = str(source)
    if not text:
        raise RecareError(f"empty {what} id or path")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecareError(f"{what} path {path} is a file; give a model folder or a Hub id")
        return str(path)
    if not is_hub_id(text):
        raise RecareError(f"{what} path does not exist: {text}")
    return text


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a Hub repo id ("org/name" or "name"), not of a path."""
    return not (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text) and bool(_HUB_ID.match(text))


def _load_error(what: str, source: str, err: Exception) -> RecareError:
    hint = " (HF_HUB_OFFLINE=1: only the local Hugging Face cache is searched)" if hub_offline() else ""
    return RecareError(f"cannot load {what} from {source!r}{hint}: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- Stable Diffusion


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x/2.x or SDXL model that recare uses (no safety checker).

    SDXL models also have `tokenizer_2` / `text_encoder_2` (a CLIPTextModelWithProjection); the rest
    of recare reaches the text side through `conditioner()` (recare.models.conditioning), the one
    place that knows the families apart.
    """

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    source: str = "<in-memory>"
    revision: str | None = None
    note: str | None = None
    """What the model is, from the folder's recare_model_note.json (MODEL_NOTE_FILE); None: nothing said."""
    tokenizer_2: Any = None
    """SDXL: the second tokenizer (OpenCLIP bigG's); None for SD 1.x/2.x."""
    text_encoder_2: Any = None
    """SDXL: the second text encoder, with projection (its pooled output is the UNet's text_embeds)."""
    force_zeros_for_empty_prompt: bool = True
    """SDXL pipelines' setting (model_index.json): the negative branch of "" is all zeros."""

    @property
    def family(self) -> str:
        """'sdxl' when the UNet takes SDXL's added text/time conditioning, else 'sd' (SD 1.x/2.x)."""
        return "sdxl" if is_sdxl_unet(self.unet) else "sd"

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    def conditioner(self, image_size: int | None = None) -> PromptConditioner:
        """Token ids and packed UNet conditioning of prompts for this model (recare.models.conditioning).

        image_size: SDXL's original/target size in the time ids (default: the model's image size).
        """
        if self.family == "sdxl":
            if self.text_encoder_2 is None or self.tokenizer_2 is None:
                raise RecareError("this UNet takes SDXL conditioning but the model has no text_encoder_2/tokenizer_2")
            size = float(image_size or self.image_size)
            return PromptConditioner(self.tokenizers, self.text_encoders, "sdxl", (size, size, 0.0, 0.0, size, size),
                                     self.force_zeros_for_empty_prompt)
        return PromptConditioner((self.tokenizer,), (self.text_encoder,), "sd")

    @property
    def prediction_type(self) -> str:
        """'epsilon' or 'v_prediction', read from the scheduler config."""
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent, from the UNet config."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE down blocks - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Default image side in pixels (512 for SD v1.4, 1024 for SDXL base)."""
        return self.latent_shape[1] * self.vae_scale_factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SDComponents":
        """Move the networks in place (dtype only when given); returns self."""
        for module in (*self.text_encoders, self.vae, self.unet):
            module.to(device=device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    def pipeline(self, scheduler: Any | None = None):
        """A diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline) over these components,
        safety checker OFF (SDXL has none; its invisible watermark is off too).

        recare generates target images of unsafe concepts on purpose (method §1): with the
        safety checker on, most nudity images come back black.
        """
        scheduler = scheduler if scheduler is not None else self.scheduler
        if self.family == "sdxl":
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
            )
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_sd(
    source: str | os.PathLike = DEFAULT_SD_MODEL,
    revision: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    unet_weights: str | os.PathLike | None = None,
    learned_embeddings: Sequence[str | os.PathLike] = (),
    text_encoder_weights: str | os.PathLike | None = None,
) -> SDComponents:
    """Load the components of a diffusers SD 1.x/2.x or SDXL model (the family read from its model_index.json).

    Args:
        source: Hub id or local diffusers folder (SDXL: e.g. DEFAULT_SDXL_MODEL).
        revision: Hub revision (branch, tag or commit).
        dtype: weights dtype ('fp32', 'fp16', 'bf16' or a torch dtype).
        device: where the networks go.
        unet_weights: optional erased-UNet weights (safetensors), loaded strictly.
        learned_embeddings: textual-inversion files whose tokens are added to the tokenizer(s).
        text_encoder_weights: optional replacement text-encoder weights (e.g. AdvUnlearn's), strict (SD 1.x only).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src = resolve_source(source, "Stable Diffusion model")
    dtype = parse_dtype(dtype)
    kw = {"revision": revision} if revision else {}
    try:
        index = _model_index(src, kw)
        two_encoders = (index.get("text_encoder_2") or [None])[0] is not None
        if "text_encoder" in index and (index["text_encoder"] or [None])[0] is None:
            raise RecareError(f"{src} has no first text encoder (an SDXL refiner?): recare supports SD 1.x/2.x "
                              "and SDXL base models")
        if two_encoders and text_encoder_weights is not None:  # checked before any weight is read
            raise RecareError("replacement text-encoder weights are supported for SD 1.x/2.x models only")
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **kw)
        extra: dict[str, Any] = {}
        if two_encoders:
            extra = {"tokenizer_2": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw),
                     "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2",
                                                                                  dtype=dtype, **kw),
                     "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **kw)
        scheduler = _load_scheduler(src, kw)
    except RecareError:
        raise
    except Exception as err:  # diffusers/transformers raise many types (OSError, ValueError, HTTP errors)
        raise _load_error("Stable Diffusion model", src, err) from err
    components = SDComponents(tokenizer, text_encoder, vae, unet, scheduler, source=src, revision=revision,
                              note=read_model_note(src), **extra)
    for module in (*components.text_encoders, vae, unet):
        module.requires_grad_(False)
        module.eval()
    if unet_weights is not None:
        from recare.models.checkpoints import load_unet_weights

        load_unet_weights(unet, unet_weights)
    if text_encoder_weights is not None:
        from recare.models.checkpoints import load_text_encoder_weights

        load_text_encoder_weights(text_encoder, text_encoder_weights)
    for path in learned_embeddings:
        from recare.models.checkpoints import load_learned_embeddings

        load_learned_embeddings(components.conditioner(), path)
    return components.to(device=device)


def _model_index(src: str, kw: dict) -> dict[str, Any]:
    """The model's model_index.json (a local folder's, or the Hub's through the cache; HF_HUB_OFFLINE respected).

    A folder without one (components saved one by one) is read from its subfolders' presence.
    """
    path = Path(src) / "model_index.json"
    if Path(src).is_dir():
        if not path.is_file():
            return {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]} \
                if (Path(src) / "text_encoder_2").is_dir() else {}
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(src, "model_index.json", **kw))
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecareError(f"cannot read {path}: {err}") from err
    if not isinstance(index, dict):
        raise RecareError(f"{path} does not hold a JSON object")
    return index


def has_safety_checker(source: str | os.PathLike, revision: str | None = None) -> bool:
    """Whether the model's own pipeline has a safety checker (its model_index.json names one).

    A Hub id whose model_index.json is not in the local cache counts as having one (SD v1.4 has).
    """
    path = Path(source) / "model_index.json"
    if not Path(source).is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(source), "model_index.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a repo id (an in-memory test model): assume the worst
            return True
        if not isinstance(cached, str):
            return True
        path = Path(cached)
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get("safety_checker")
    except (OSError, ValueError, AttributeError):
        return True
    return bool(entry) and entry[0] is not None


def read_model_note(source: str | os.PathLike) -> str | None:
    """The note of a local model folder (MODEL_NOTE_FILE), or None (no file, or a Hub id)."""
    from recare.io import read_json

    path = Path(source) / MODEL_NOTE_FILE
    if not path.is_file():
        return None
    data = read_json(path, "model note")
    if not isinstance(data, dict) or not isinstance(data.get("note"), str) or not data["note"].strip():
        raise RecareError(f"{path} must hold a JSON object with a non-empty string 'note'")
    return data["note"]


def write_model_note(folder: str | os.PathLike, note: str) -> Path:
    """Write MODEL_NOTE_FILE into a model folder (atomically); returns its path."""
    from recare.io import write_json_atomic

    path = Path(folder) / MODEL_NOTE_FILE
    write_json_atomic(path, {"note": note})
    return path


def _load_scheduler(src: str, kw: dict) -> Any:
    """The pipeline's own scheduler class from scheduler/scheduler_config.json."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(src, subfolder="scheduler", **kw)
    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise RecareError(f"unknown scheduler class {name!r} in {src}/scheduler")
    return cls.from_config(config)


# ----------------------------------------------------------------------------- CLIP-like models


def _features(output: Any) -> torch.Tensor:
    """Projected features from get_text/image_features (a tensor, or an output object in transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find features in {type(output).__name__}")


class ImageTextModel:
    """A CLIP or SigLIP model with its processor, giving L2-normalised text and image features.

    CLIP's text tower is causal and pools at the end-of-text token, so a batch padded only to
    its longest sequence gives the same features as 77-token padding (`short_padding`).
    SigLIP pools the last position and was trained with max-length padding, so it always pads
    to the maximum length.

    Images are preprocessed with torch ops on the model's device (`preprocess="tensor"`, see
    recare.models.preprocess; equal to the processor's pixel values within its stated tolerance),
    or by the processor itself (`preprocess="processor"`), which the tensor path falls back to
    for settings or inputs it does not reproduce.
    """

    PREPROCESS_MODES = ("tensor", "processor")

    def __init__(self, model: Any, processor: Any, source: str = "<in-memory>", revision: str | None = None,
                 preprocess: str = "tensor"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.source = source
        self.revision = revision
        self.preprocess = preprocess
        self._fingerprint: str | None = None
        self._tensor_processor: tuple[Any, TensorImageProcessor | None] | None = None

    @property
    def preprocess(self) -> str:
        """'tensor' (torch ops on the model's device) or 'processor' (the transformers processor)."""
        return self._preprocess

    @preprocess.setter
    def preprocess(self, mode: str) -> None:
        if mode not in self.PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess {mode!r}; choose one of {self.PREPROCESS_MODES}")
        self._preprocess = mode

    @property
    def tensor_processor(self) -> TensorImageProcessor | None:
        """The tensor path for the current processor; None where it falls back to the processor."""
        if self._tensor_processor is None or self._tensor_processor[0] is not self.processor:
            self._tensor_processor = (self.processor, tensor_processor_or_none(self.processor))
        return self._tensor_processor[1]

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def short_padding(self) -> bool:
        """True when padding to the batch's longest sequence is exact (causal, EOS-pooled tower)."""
        return self.model_type == "clip"

    @property
    def max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """SHA-256 over the weights and the tokenizer vocabulary: a cache key that needs no revision."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            for token, index in sorted(self.tokenizer.get_vocab().items()):
                digest.update(f"{token}\t{index}\n".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def tokenize(self, texts: Sequence[str], padding: str = "auto") -> dict[str, torch.Tensor]:
        """Tokenise to tensors; padding 'auto' is 'longest' where exact, else 'max_length'."""
        if padding == "auto":
            padding = "longest" if self.short_padding else "max_length"
        if padding not in ("longest", "max_length"):
            raise ValueError(f"unknown padding {padding!r}")
        return self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256, padding: str = "auto") -> torch.Tensor:
        """L2-normalised float32 text features, (n, d), on the CPU."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start:start + batch_size], padding=padding)
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            if self.model_type != "clip":
                batch.pop("attention_mask", None)
            feats = _features(self.model.get_text_features(**batch)).float()
            chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, getattr(self.model.config, "projection_dim", 0))
        return torch.cat(chunks)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Float32 pixel values on the model's device, by the `preprocess` path."""
        tensor_processor = self.tensor_processor if self.preprocess == "tensor" else None
        if tensor_processor is not None:
            if self.device.type not in DEVICE_TYPES:
                log_once(f"image preprocessing falls back to the processor on {self.device.type} devices")
            elif not all(isinstance(image, Image.Image) for image in images):
                log_once("image preprocessing falls back to the processor for inputs that are not PIL images")
            else:
                return tensor_processor(images, self.device)
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised float32 image features, (n, d), on the CPU."""
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.pixel_values(list(images[start:start + batch_size]))
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.dtype))).float()
            chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
        return torch.cat(chunks)


def load_image_text_model(
    source: str | os.PathLike = DEFAULT_CLIP_MODEL,
    revision: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ImageTextModel:
    """Load a CLIP (default ViT-B/32) or SigLIP model and its processor by Hub id or folder."""
    from transformers import AutoModel, AutoProcessor

    src = resolve_source(source, "CLIP model")
    kw = {"revision": revision} if revision else {}
    try:
        model = AutoModel.from_pretrained(src, dtype=parse_dtype(dtype), **kw)
        processor = AutoProcessor.from_pretrained(src, **kw)
    except Exception as err:  # many error types from the Hub client and the config parsers
        raise _load_error("CLIP model", src, err) from err
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise RecareError(f"{src} is a {type(model).__name__}, not a CLIP-like image-text model")
    return ImageTextModel(model.to(device), processor, source=src, revision=revision)
