"""The tensor image preprocessing (recare.models.preprocess) equals the processors' pixel_values.

Tolerances, in normalised units, picked a little above what was measured on random-noise images
(the worst case for interpolation) of 512x512, 640x480, 480x640, 224x224, 16x16 (upscaled),
RGBA, L and P mode, and 60 random sizes from 20 to 1100 px per side:

* torchvision-backend processors (transformers 5's CLIPImageProcessor, SiglipImageProcessor),
  tensor path on the CPU: measured 0 -> max |diff| <= TORCHVISION_TOLERANCE = 1e-5;
* PIL-backend processors with bilinear resampling (SiglipImageProcessorPil, CLIPImageProcessorPil
  with resample=2): measured 1 uint8 level (0.015 for CLIP's std, 0.0078 for SigLIP's)
  -> max |diff| <= 3 levels + 1e-5 (3/255/min(image_std): 0.045 for CLIP, 0.024 for SigLIP);
  with bicubic the PIL backend is not reproduced (Pillow 13 picks its pass order by shape) and
  the tensor path refuses it, so the processor runs;
* the float resize that runs on a GPU, checked here on the CPU: measured 2 levels -> 3 levels.

Features of the tiny random CLIP from encode_images agree between the two paths: measured 0
with the torchvision processor (tolerance 1e-6), 3.5e-4 with the bilinear PIL one
(tolerance 1e-3).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from recare.models import preprocess
from recare.models.loading import ImageTextModel
from recare.models.preprocess import (
    TORCHVISION_TOLERANCE,
    UINT8_LEVELS_TOLERANCE,
    TensorImageProcessor,
    UnsupportedProcessor,
    resize_uint8_in_float,
)

# preprocessor_config.json of openai/clip-vit-base-patch32, as the Hub has it
OPENAI_CLIP_CONFIG = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                      "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
SIGLIP_LIKE_CONFIG = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 1 / 255,
                      "size": {"height": 224, "width": 224}}
PROCESSORS = {"clip": ("CLIPImageProcessor", OPENAI_CLIP_CONFIG),
              "clip-pil-bilinear": ("CLIPImageProcessorPil", {**OPENAI_CLIP_CONFIG, "resample": 2}),
              "siglip": ("SiglipImageProcessor", SIGLIP_LIKE_CONFIG),
              "siglip-bicubic": ("SiglipImageProcessor", {**SIGLIP_LIKE_CONFIG, "resample": 3}),
              "siglip-pil": ("SiglipImageProcessorPil", SIGLIP_LIKE_CONFIG)}
FEATURE_TOLERANCE = {"torchvision": 1e-6, "pil": 1e-3}


def image_processor(name: str, config: dict | None = None, **overrides):
    """A transformers image processor class by name, built from a config dict (no download)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls.from_dict({**(config or {}), **overrides})


def backend(processor) -> str:
    """'torchvision' or 'pil' (transformers 4's slow processors have no `backend`)."""
    name = getattr(processor, "backend", None) or ("torchvision" if type(processor).__name__.endswith("Fast") else "")
    return "torchvision" if name == "torchvision" else "pil"


def uint8_level(processor) -> float:
    """One uint8 level of the resized image in the processor's output units."""
    settings = TensorImageProcessor.from_processor(processor)
    return (settings.rescale_factor or 1.0) / (min(settings.image_std) if settings.image_std else 1.0)


def tolerance(processor) -> float:
    """Max |diff| allowed from this processor's pixel_values (module docstring)."""
    if backend(processor) == "torchvision":
        return TORCHVISION_TOLERANCE
    return UINT8_LEVELS_TOLERANCE * uint8_level(processor) + TORCHVISION_TOLERANCE


def pixel_values(processor, images) -> torch.Tensor:
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def test_images() -> dict[str, Image.Image]:
    """Random-noise images of several sizes and modes, and one smooth image."""
    rng = np.random.default_rng(0)
    noise = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:512, 0:512]
    smooth = np.stack([(xx / 2) % 256, (yy / 2) % 256, ((xx + yy) / 4) % 256], -1).astype(np.uint8)
    return {"512x512": Image.fromarray(noise(512, 512, 3)), "smooth-512x512": Image.fromarray(smooth),
            "640x480": Image.fromarray(noise(480, 640, 3)), "480x640": Image.fromarray(noise(640, 480, 3)),
            "224x224": Image.fromarray(noise(224, 224, 3)), "16x16": Image.fromarray(noise(16, 16, 3)),
            "RGBA-300x200": Image.fromarray(noise(200, 300, 4), "RGBA"),
            "L-256x256": Image.fromarray(noise(256, 256), "L"),
            "P-100x150": Image.fromarray(noise(150, 100, 3)).convert("P")}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_tensor_path_equals_processor(kind, test_images):
    processor = image_processor(*PROCESSORS[kind])
    tensor_processor = TensorImageProcessor.from_processor(processor)
    diffs = {}
    for name, image in test_images.items():
        expected = pixel_values(processor, [image])
        got = tensor_processor([image])
        assert got.shape == expected.shape == (1, 3, 224, 224) and got.dtype == torch.float32
        diffs[name] = (got - expected).abs().max().item()
    assert max(diffs.values()) <= tolerance(processor), diffs


def test_openai_config_is_read(test_images):
    """Every constant comes from the processor: the openai/clip-vit-base-patch32 settings."""
    tensor_processor = TensorImageProcessor.from_processor(image_processor("CLIPImageProcessor", OPENAI_CLIP_CONFIG))
    assert tensor_processor.shortest_edge == 224 and tensor_processor.resize_to is None
    assert tensor_processor.crop_size == (224, 224) and tensor_processor.interpolation.value == "bicubic"
    assert tensor_processor.image_mean == tuple(OPENAI_CLIP_CONFIG["image_mean"])
    assert tensor_processor.image_std == tuple(OPENAI_CLIP_CONFIG["image_std"])
    assert tensor_processor.rescale_factor == pytest.approx(1 / 255) and tensor_processor.convert_rgb
    assert tensor_processor.resized_size(480, 640) == (224, 298)


@pytest.mark.parametrize("overrides", [
    dict(size={"shortest_edge": 100}, crop_size={"height": 80, "width": 90}, image_mean=[0.2, 0.3, 0.4],
         image_std=[0.3, 0.2, 0.1], rescale_factor=1 / 127.5, resample=2),
    dict(do_normalize=False),
    dict(do_rescale=False, do_normalize=False),
    dict(do_center_crop=False, size={"height": 50, "width": 70}),
    dict(do_resize=False, crop_size={"height": 64, "width": 48}),  # crop larger than 16x16 and 224x224: zero padding
])
@pytest.mark.parametrize("name,resample", [("CLIPImageProcessor", 3), ("CLIPImageProcessorPil", 2)])
def test_other_settings_are_read(name, resample, overrides, test_images):
    processor = image_processor(name, OPENAI_CLIP_CONFIG, **{"resample": resample, **overrides})
    tensor_processor = TensorImageProcessor.from_processor(processor)
    names = ["16x16", "224x224"] if not overrides.get("do_resize", True) else list(test_images)
    for image_name in names:
        expected = pixel_values(processor, [test_images[image_name]])
        got = tensor_processor([test_images[image_name]])
        assert (got - expected).abs().max().item() <= tolerance(processor), image_name


@pytest.mark.parametrize("kind", ["clip", "siglip-bicubic", "siglip-pil"])
def test_random_sizes(kind):
    """Tall, wide, tiny and large images; palette noise (few, far-apart values) is the hardest case."""
    processor = image_processor(*PROCESSORS[kind])
    tensor_processor = TensorImageProcessor.from_processor(processor)
    rng = np.random.default_rng(5)
    for index in range(8):
        height, width = (int(side) for side in rng.integers(20, 1100, 2))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = image.convert("P").convert("RGB") if index % 2 else image
        diff = (tensor_processor([image]) - pixel_values(processor, [image])).abs().max().item()
        assert diff <= tolerance(processor), (height, width)


@pytest.mark.parametrize("group_by_size", [False, True])
def test_batch_of_mixed_sizes_keeps_order(group_by_size, test_images):
    processor = image_processor("CLIPImageProcessor", OPENAI_CLIP_CONFIG)
    names = ["512x512", "640x480", "16x16", "smooth-512x512", "640x480", "RGBA-300x200", "512x512"]
    batch = [test_images[name] for name in names]
    got = TensorImageProcessor.from_processor(processor)(batch, group_by_size=group_by_size)
    assert (got - pixel_values(processor, batch)).abs().max().item() <= TORCHVISION_TOLERANCE


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("shape,size", [((512, 512), (224, 224)), ((480, 640), (224, 298)), ((16, 16), (224, 224)),
                                        ((200, 300), (224, 336)), ((1046, 255), (918, 224)), ((1000, 300), (224, 224))])
def test_float_resize_equals_uint8_kernel(mode, shape, size):
    """The resize that runs on a GPU (float32), checked on the CPU against the uint8 kernel."""
    from torchvision.transforms.v2 import functional as tvF

    rng = np.random.default_rng(1)
    batch = torch.from_numpy(rng.integers(0, 256, (1, *shape, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    expected = tvF.resize(batch, list(size), interpolation=tvF.InterpolationMode(mode), antialias=True)
    got = resize_uint8_in_float(batch, size, mode)
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert (got.int() - expected.int()).abs().max().item() <= UINT8_LEVELS_TOLERANCE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_tensor_path_on_cuda_equals_processor_on_cpu(kind, test_images):
    processor = image_processor(*PROCESSORS[kind])
    tensor_processor = TensorImageProcessor.from_processor(processor)
    allowed = UINT8_LEVELS_TOLERANCE * uint8_level(processor) + TORCHVISION_TOLERANCE
    batch = list(test_images.values())
    got = tensor_processor(batch, "cuda")
    assert got.device.type == "cuda"
    assert (got.cpu() - pixel_values(processor, batch)).abs().max().item() <= allowed


@pytest.mark.parametrize("name,resample", [("CLIPImageProcessor", 3), ("CLIPImageProcessorPil", 2)])
def test_encode_images_paths_agree(name, resample, tiny_clip, test_images):
    processor = image_processor(name, OPENAI_CLIP_CONFIG, size={"shortest_edge": 32},
                                crop_size={"height": 32, "width": 32}, resample=resample)
    images = list(test_images.values())
    tensor_model = ImageTextModel(tiny_clip.model, processor)
    processor_model = ImageTextModel(tiny_clip.model, processor, preprocess="processor")
    assert tensor_model.preprocess == "tensor" and tensor_model.tensor_processor is not None
    got = tensor_model.encode_images(images, batch_size=4)
    expected = processor_model.encode_images(images, batch_size=4)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == expected.shape
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    assert (got - expected).abs().max().item() <= FEATURE_TOLERANCE[backend(processor)]


def test_tiny_clip_uses_tensor_path(tiny_clip, test_images):
    model = ImageTextModel(tiny_clip.model, tiny_clip.processor)
    assert model.tensor_processor is not None
    images = [test_images["640x480"], test_images["16x16"]]
    assert (model.pixel_values(images) - pixel_values(tiny_clip.processor, images)).abs().max() <= TORCHVISION_TOLERANCE


def test_unknown_preprocess_mode_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="preprocess"):
        ImageTextModel(tiny_clip.model, tiny_clip.processor, preprocess="gpu")


@pytest.mark.parametrize("name,overrides,reason", [
    ("CLIPImageProcessor", dict(resample=1), "resample"),  # LANCZOS
    ("CLIPImageProcessor", dict(resample=0), "resample"),  # NEAREST
    ("CLIPImageProcessor", dict(size={"shortest_edge": 224, "longest_edge": 300}), "size"),
    ("CLIPImageProcessor", dict(do_pad=True), "do_pad"),
    ("ViTImageProcessor", {}, "ViTImageProcessor"),
    ("CLIPImageProcessorPil", {}, "bicubic"),
])
def test_unsupported_settings_fall_back_to_processor(name, overrides, reason, tiny_clip, test_images, monkeypatch,
                                                     caplog):
    processor = image_processor(name, OPENAI_CLIP_CONFIG if name.startswith("CLIP") else {},
                                **overrides)
    with pytest.raises(UnsupportedProcessor, match=reason):
        TensorImageProcessor.from_processor(processor)
    monkeypatch.setattr(preprocess, "_logged", set())
    model = ImageTextModel(tiny_clip.model, processor)
    images = [test_images["512x512"], test_images["640x480"]]
    with caplog.at_level(logging.DEBUG, logger="recare.models.preprocess"):
        assert model.tensor_processor is None
        ImageTextModel(tiny_clip.model, processor).tensor_processor  # noqa: B018 - logged once only
    assert sum("falls back to the processor" in r.message for r in caplog.records) == 1
    assert torch.equal(model.pixel_values(images), pixel_values(processor, images))


def test_inputs_that_are_not_pil_fall_back_to_processor(tiny_clip, test_images):
    model = ImageTextModel(tiny_clip.model, tiny_clip.processor)
    arrays = [np.array(test_images["512x512"]), np.array(test_images["640x480"])]
    assert torch.equal(model.pixel_values(arrays), pixel_values(tiny_clip.processor, arrays))
