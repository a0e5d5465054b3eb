"""Model loading: local folders, Hub ids offline, CLIP-like wrapper, errors."""

import pytest
import torch

from recare.errors import RecareError
from recare.models.loading import load_image_text_model, load_sd, parse_dtype, resolve_source


def test_resolve_source(tmp_path):
    assert resolve_source(tmp_path) == str(tmp_path)
    assert resolve_source("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    with pytest.raises(RecareError, match="does not exist"):
        resolve_source("./no/such/model")
    with pytest.raises(RecareError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(RecareError, match="empty"):
        resolve_source("")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(RecareError, match="is a file"):
        resolve_source(tmp_path / "file.bin")


def test_parse_dtype():
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(RecareError, match="unknown dtype"):
        parse_dtype("fp8")


def test_load_sd_from_folder_round_trip(tiny_sd_dir, tiny_sd):
    loaded = load_sd(tiny_sd_dir)
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    assert loaded.prediction_type == "epsilon"
    assert loaded.latent_shape == (4, 16, 16) and loaded.image_size == 32
    for a, b in zip(loaded.unet.state_dict().values(), tiny_sd.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_load_sd_v_prediction(tmp_path):
    from recare.models.tiny import build_tiny_sd, save_sd

    folder = save_sd(build_tiny_sd(prediction_type="v_prediction"), tmp_path / "v")
    assert load_sd(folder).prediction_type == "v_prediction"


def test_load_sd_offline_hub_id_fails_clearly():
    with pytest.raises(RecareError, match="cannot load Stable Diffusion model .*HF_HUB_OFFLINE"):
        load_sd("nobody/not-a-real-model-xyz")


def test_load_sd_missing_path():
    with pytest.raises(RecareError, match="does not exist"):
        load_sd("/no/such/folder")


def test_clip_short_padding_matches_77(tiny_clip_dir):
    clip = load_image_text_model(tiny_clip_dir)
    texts = ["a", "a photo of a person", "an oil painting of a starry night over a quiet village"]
    short = clip.encode_text(texts, padding="longest")
    full = clip.encode_text(texts, padding="max_length")
    assert short.shape == (3, 16)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short.norm(dim=-1), torch.ones(3))


def test_clip_fingerprint_depends_on_weights(tiny_clip):
    from recare.models.tiny import build_tiny_clip

    assert tiny_clip.fingerprint() == build_tiny_clip(seed=0).fingerprint()
    assert tiny_clip.fingerprint() != build_tiny_clip(seed=1).fingerprint()


def test_load_image_text_model_rejects_non_clip(tiny_sd_dir):
    with pytest.raises(RecareError):
        load_image_text_model(tiny_sd_dir / "unet")


def test_siglip_model_is_accepted(tmp_path, clip_tokenizer):
    """A SigLIP model loads through the same interface and pads to max length."""
    from transformers import SiglipConfig, SiglipModel

    from recare.models.loading import ImageTextModel
    from recare.models.tiny import clip_processor

    config = SiglipConfig(
        text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    model = ImageTextModel(SiglipModel(config), clip_processor(32))
    assert not model.short_padding
    feats = model.encode_text(["a photo of a cat", "a dog"])
    assert feats.shape == (2, 16)
    from PIL import Image

    assert model.encode_images([Image.new("RGB", (40, 40), "red")]).shape == (1, 16)


def test_has_safety_checker_reads_model_index(tmp_path, tiny_sd_dir, monkeypatch):
    import json

    from recare.models.loading import has_safety_checker

    assert has_safety_checker(tiny_sd_dir) is False  # saved without one
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"safety_checker": ["stable_diffusion",
                                                                            "StableDiffusionSafetyChecker"]}))
    assert has_safety_checker(folder) is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert has_safety_checker("CompVis/stable-diffusion-v1-4") is True  # not cached: assume it has one


def test_loaded_unet_attends_with_pytorch_sdpa(tiny_sd_dir):
    """Every attention of a loaded UNet runs through torch's scaled_dot_product_attention (diffusers'
    AttnProcessor2_0), the fused kernel on a GPU; nothing in recare swaps in a slower processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = load_sd(tiny_sd_dir).unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
