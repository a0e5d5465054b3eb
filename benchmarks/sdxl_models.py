"""The full-size SDXL base architecture with RANDOM weights, for the benchmarks (nothing is downloaded).

Configs copied from stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/, text_encoder_2/, vae/,
scheduler/ config.json): UNet 2.57B parameters (128x128 latents, 1024 px), CLIP ViT-L/14 text tower, OpenCLIP
bigG text tower with its 1280-d projection, SD's VAE with SDXL's scaling factor, Euler scheduler. Costs do not
depend on the weights; outputs mean nothing.

    from sdxl_models import build_sdxl_random, build_sdxl_meta
"""

from __future__ import annotations

import torch

from recare.models.loading import SDComponents

# unet/config.json (values that differ from diffusers' UNet2DConditionModel defaults, and the layout ones).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
_CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)
# text_encoder/config.json: CLIP ViT-L/14's text tower (as SD v1.4's).
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768, **_CLIP_IDS)
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower, a CLIPTextModelWithProjection.
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, **_CLIP_IDS)
# vae/config.json: SD's VAE layout; SDXL's scaling factor; fp16 overflows in it (force_upcast).
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      prediction_type="epsilon", use_karras_sigmas=False)
SDXL_UNET_PARAMETERS = 2_567_463_684
"""Parameters of SDXL base's UNet (unet/diffusion_pytorch_model.safetensors), checked by build_sdxl_meta."""


def sdxl_modules():
    """(unet, vae, text_encoder, text_encoder_2), randomly initialised on torch's current default device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**SDXL_UNET)
    vae = AutoencoderKL(**SDXL_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    return unet, vae, text_encoder, text_encoder_2


def _components(unet, vae, text_encoder, text_encoder_2, source: str) -> SDComponents:
    from diffusers import EulerDiscreteScheduler

    from recare.models.tokenizer import offline_clip_tokenizer

    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)  # as recare.models.tiny's SDXL
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.requires_grad_(False).eval()
    # tokenizer_2: the same CLIP BPE, padded with "!" as SDXL base's tokenizer_2/ is.
    return SDComponents(offline_clip_tokenizer(), text_encoder, vae, unet, scheduler, source=source,
                        tokenizer_2=offline_clip_tokenizer(pad_token="!"), text_encoder_2=text_encoder_2)


def build_sdxl_random(device: str, seed: int = 0) -> SDComponents:
    """Full-size SDXL base architecture with random weights, built directly on `device` (fp32: ~13 GiB)."""
    torch.manual_seed(seed)
    with torch.device(device):
        modules = sdxl_modules()
    return _components(*modules, source="<random-sdxl-base>")


def build_sdxl_meta() -> SDComponents:
    """The same architecture on the meta device (shapes only, no memory), for counting; checks the UNet's size."""
    with torch.device("meta"):
        modules = sdxl_modules()
    components = _components(*modules, source="<meta-sdxl-base>")
    count = sum(p.numel() for p in components.unet.parameters())
    if count != SDXL_UNET_PARAMETERS:
        raise RuntimeError(f"the SDXL UNet built from SDXL_UNET has {count} parameters, not SDXL base's "
                           f"{SDXL_UNET_PARAMETERS}: the config copy is wrong")
    return components
