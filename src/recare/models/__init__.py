"""Models: loading Stable Diffusion and CLIP-like models, weight files, the tokenizer, parameter selection.

Owns everything that turns a Hub id or folder into modules (`load_sd`, `load_image_text_model`),
strict safetensors checkpoints (UNet, text encoder, learned embeddings, LoRA), the offline CLIP
tokenizer, the choice of trained UNet parameters (ESD-u/x, LoRA) and tiny random builders for
tests. Algorithms receive these models; they never load them. May import: recare.io,
recare.errors, recare.config.
"""

from recare.models.loading import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_SD_MODEL,
    ImageTextModel,
    SDComponents,
    load_image_text_model,
    load_sd,
    parse_dtype,
    resolve_source,
)

__all__ = ["DEFAULT_CLIP_MODEL", "DEFAULT_SD_MODEL", "ImageTextModel", "SDComponents", "load_image_text_model",
           "load_sd", "parse_dtype", "resolve_source"]
