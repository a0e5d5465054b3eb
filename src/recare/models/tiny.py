"""Random-weight models built from configs, for tests, benchmarks and offline demos.

Nothing here is trained: any number measured with these models says nothing about the real
Stable Diffusion or CLIP, only about the code path and its cost.
All builders use the real CLIP BPE tokenizer (see recare.tokenizer), so token ids are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from recare.models.loading import ImageTextModel, SDComponents
from recare.models.tokenizer import CLIP_VOCAB_SIZE, offline_clip_tokenizer

BOS_ID, EOS_ID = 49406, 49407

# Scheduler settings of SD v1.4 (scheduler/scheduler_config.json).
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def _clip_text_config(hidden: int, layers: int, heads: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 4,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, **kw)


def build_tiny_sd(seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32,
                  prediction_type: str = "epsilon") -> SDComponents:
    """A tiny random SD 1.x-layout model: 16x16x4 latents, 32x32 images, PNDM scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 2)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(cross_attention_dim, 2, 4))
    scheduler = PNDMScheduler(prediction_type=prediction_type, **SD14_SCHEDULER)
    scheduler.register_to_config(clip_sample=False)  # SD v1.4's config carries it; DDIM built from it reads it
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval()
    return SDComponents(offline_clip_tokenizer(), text_encoder, vae, unet, scheduler, source="<tiny-random-sd>")


def save_sd(components: SDComponents, folder: str | os.PathLike) -> Path:
    """Save components as a diffusers StableDiffusionPipeline folder (safetensors)."""
    folder = Path(folder)
    components.pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_clip(seed: int = 0, hidden: int = 32, image_size: int = 32, patch_size: int = 8,
                    projection_dim: int = 16) -> ImageTextModel:
    """A tiny random transformers CLIPModel with the real BPE tokenizer and a matching processor."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=_clip_text_config(hidden, 2, 4).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=projection_dim)
    torch.manual_seed(seed)
    return ImageTextModel(CLIPModel(config), clip_processor(image_size), source="<tiny-random-clip>")


def build_clip_vit_b32(seed: int = 0) -> ImageTextModel:
    """A RANDOMLY initialised CLIP with the ViT-B/32 architecture (151M parameters), for benchmarks."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=_clip_text_config(512, 12, 8).to_dict(), projection_dim=512)
    torch.manual_seed(seed)
    return ImageTextModel(CLIPModel(config), clip_processor(224), source="<random-clip-vit-b-32>")


def clip_processor(image_size: int):
    """CLIPProcessor with OpenAI's normalisation, resizing to `image_size` and the offline tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=offline_clip_tokenizer())


def save_image_text_model(model: ImageTextModel, folder: str | os.PathLike) -> Path:
    """Save a CLIP-like model and its processor so that load_image_text_model(folder) reads it."""
    folder = Path(folder)
    model.model.save_pretrained(folder, safe_serialization=True)
    model.processor.save_pretrained(folder)
    return folder


def build_tiny_sdxl(seed: int = 0, sample_size: int = 16, prediction_type: str = "epsilon") -> SDComponents:
    """A tiny random SDXL-layout model: two text encoders (32 + 32 wide, the second with a 32-d projection),
    a UNet with SDXL's text_time added conditioning (cross-attention 64), Euler scheduler, 32x32 images.

    Sizes follow diffusers' own SDXL pipeline tests; the layout (penultimate hidden states of both
    encoders, pooled text_embeds, 6 time ids) is SDXL's, the widths are not.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 2, scaling_factor=0.13025)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(32, 2, 4))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, 2, 4, projection_dim=32))
    # SDXL base's scheduler config (scheduler/scheduler_config.json): Euler, scaled_linear, leading spacing.
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type, timestep_spacing="leading", **{
        k: v for k, v in SD14_SCHEDULER.items() if k in ("beta_start", "beta_end", "beta_schedule",
                                                         "num_train_timesteps", "steps_offset")})
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    for module in (text_encoder, text_encoder_2, vae, unet):
        module.requires_grad_(False).eval()
    return SDComponents(offline_clip_tokenizer(), text_encoder, vae, unet, scheduler, source="<tiny-random-sdxl>",
                        tokenizer_2=offline_clip_tokenizer(pad_token="!"), text_encoder_2=text_encoder_2)
