"""The world's CLIP: a small transformers CLIPModel trained contrastively on rendered captions.

It uses CLIP's real BPE tokenizer and the full 49,408-entry token table, so recare's vocabulary
pipeline (recare.vocab) runs over the true vocabulary; rows of words the grammar never uses keep
their random initialisation (no weight decay on embeddings), like the rare tokens of a real CLIP.
Loss: CLIP's symmetric cross-entropy over image-caption similarities (Radford et al. 2021),
computed by transformers' `CLIPModel(return_loss=True)`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from recare.models.loading import ImageTextModel
from recare.models.tiny import clip_processor
from recare.models.tokenizer import CLIP_VOCAB_SIZE
from recare.world.render import (
    SHAPES,
    TEXTURES,
    WorldSpec,
    caption_scenes,
    concept_labels,
    full_caption,
    render_batch,
    to_pil,
)

logger = logging.getLogger(__name__)

BOS_ID, EOS_ID = 49406, 49407
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipConfig:
    """Architecture and training of the world's CLIP."""

    text_width: int = 48  # text hidden size (= the T2I UNet's cross_attention_dim); the table is 49,408 x this
    text_layers: int = 2  # text transformer layers
    text_heads: int = 4  # text attention heads
    vision_width: int = 96  # ViT hidden size
    vision_layers: int = 4  # ViT layers
    vision_heads: int = 4  # ViT attention heads
    patch_size: int = 4  # ViT patch side in pixels (16x16 images -> 16 patches)
    projection_dim: int = 64  # joint embedding size
    max_positions: int = 77  # text positions, as CLIP's (the SD pipeline pads prompts to this)
    steps: int = 2000  # training steps (fresh renders and captions every step)
    batch_size: int = 128  # image-caption pairs per step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.05  # on weight matrices only (not embeddings, norms, biases)
    seed: int = 0  # initialisation and data seed


def build_clip(config: ClipConfig, image_size: int) -> ImageTextModel:
    """A randomly initialised CLIPModel of this architecture with the offline tokenizer's processor."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=config.text_width, intermediate_size=4 * config.text_width,
                num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                max_position_embeddings=config.max_positions, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                pad_token_id=EOS_ID)
    vision = dict(hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
                  num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                  image_size=image_size, patch_size=config.patch_size)
    torch.manual_seed(config.seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))
    return ImageTextModel(model, clip_processor(image_size), source="<world-clip>")


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1] -> CLIP pixel values, as the processor computes them from uint8 PNGs."""
    quantised = (images.clamp(0, 1) * 255).round() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[None, :, None, None]
    return (quantised - mean) / std


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_clip(config: ClipConfig = ClipConfig(), spec: WorldSpec = WorldSpec()) -> ImageTextModel:
    """Train the world's CLIP on fresh renders and grammar captions (one generator, `config.seed`)."""
    clip = build_clip(config, spec.image_size)
    model = clip.model.train().requires_grad_(True)
    tokenizer = clip.tokenizer
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, config.warmup, config.steps))
    progress = tqdm(range(config.steps), desc="world CLIP", mininterval=10)
    for _ in progress:
        scenes, images = render_batch(config.batch_size, generator, spec)
        captions = [c.text for c in caption_scenes(scenes, generator, spec)]
        tokens = tokenizer(captions, padding="longest", return_tensors="pt")
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    pixel_values=clip_pixels(images), return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{out.loss.item():.3f}", refresh=False)
    clip.model = model.eval().requires_grad_(False)
    clip._fingerprint = None
    return clip


# ----------------------------------------------------------------------------- measurements


def zero_shot_accuracy(clip: ImageTextModel, images: list, scenes, template: str = "{}") -> dict[str, float]:
    """Per family: how often the image's true concept has the highest cosine among the family's labels."""
    features = clip.encode_images(images)
    labels = scenes.label_tensor()
    result = {}
    for column, (family, words) in enumerate(concept_labels().items()):
        text = clip.encode_text([template.format(w) for w in words])
        result[family] = float(((features @ text.T).argmax(-1) == labels[:, column]).float().mean())
    return result


def retrieval_accuracy(clip: ImageTextModel, images: list, scenes) -> dict[str, float]:
    """Image->caption and caption->image top-1 with full captions; a hit when all four concepts match.

    chance: the expected hit rate of a random pick (captions of identical scenes count as hits).
    """
    captions = [full_caption(scenes.labels(i)) for i in range(len(scenes))]
    sims = clip.encode_images(images) @ clip.encode_text(captions).T  # (n images, n captions)
    same = torch.tensor([[a == b for b in captions] for a in captions])
    rows = torch.arange(len(captions))
    return {"image_to_caption": float(same[rows, sims.argmax(1)].float().mean()),
            "caption_to_image": float(same[sims.argmax(0), rows].float().mean()),
            "chance": float(same.float().mean())}


def text_entanglement(clip: ImageTextModel, spec: WorldSpec = WorldSpec(), template: str = "{}") -> dict[str, Any]:
    """Cosine of text embeddings between each texture word and each shape word.

    entanglement = cos(T, C) - mean cos(T, other shapes); `control` is the same margin for the
    other textures (their captions name their shapes, so it should be near 0).
    """
    textures = clip.encode_text([template.format(t) for t in TEXTURES])
    shapes = clip.encode_text([template.format(s) for s in SHAPES])
    cos = textures @ shapes.T  # (textures, shapes)
    care = SHAPES.index(spec.care)
    others = [i for i in range(len(SHAPES)) if i != care]
    margin = cos[:, care] - cos[:, others].mean(1)
    target = TEXTURES.index(spec.target)
    return {"template": template, "cosine": {t: dict(zip(SHAPES, map(float, cos[i]))) for i, t in enumerate(TEXTURES)},
            "entanglement": float(margin[target]),
            "control": {t: float(margin[i]) for i, t in enumerate(TEXTURES) if i != target}}


def image_entanglement(clip: ImageTextModel, spec: WorldSpec = WorldSpec(), n: int = 96, seed: int = 4321,
                       template: str = "a {} thing") -> dict[str, Any]:
    """Does a texture word prefer that texture's images WITH the care shape? ("a nude" -> a person.)

    margin[x] = mean cos(text(x), images of x on C) - mean cos(text(x), images of x on other shapes);
    entanglement = margin[T] - mean margin of the other textures (the controls).
    """
    margins = {}
    for texture in TEXTURES:
        generator = torch.Generator().manual_seed(seed)
        text = clip.encode_text([template.format(texture)])[0]
        _, with_care = render_batch(n, generator, spec, texture=texture, shape=spec.care)
        others = [render_batch(n // 3, generator, spec, texture=texture, shape=s)[1] for s in SHAPES if s != spec.care]
        cos_care = clip.encode_images(to_pil(with_care)) @ text
        cos_other = clip.encode_images(to_pil(torch.cat(others))) @ text
        margins[texture] = float(cos_care.mean() - cos_other.mean())
    controls = [m for t, m in margins.items() if t != spec.target]
    return {"template": template, "margin": margins,
            "entanglement": margins[spec.target] - sum(controls) / len(controls)}


def measure_clip(clip: ImageTextModel, spec: WorldSpec = WorldSpec(), n: int = 512, seed: int = 1234) -> dict[str, Any]:
    """Zero-shot accuracy (raw words, 'a photo of a {}'), retrieval and text entanglement on fresh renders."""
    generator = torch.Generator().manual_seed(seed)
    scenes, images = render_batch(n, generator, spec)
    pil = to_pil(images)
    return {"n_images": n, "seed": seed,
            "zero_shot_raw": zero_shot_accuracy(clip, pil, scenes),
            "zero_shot_photo": zero_shot_accuracy(clip, pil, scenes, "a photo of a {}"),
            "retrieval": retrieval_accuracy(clip, pil[:256], _head(scenes, 256)),
            "text_entanglement": text_entanglement(clip, spec),
            "text_entanglement_photo": text_entanglement(clip, spec, "a photo of a {}"),
            "image_entanglement": image_entanglement(clip, spec)}


def _head(scenes, n: int):
    from dataclasses import fields, replace

    return replace(scenes, **{f.name: getattr(scenes, f.name)[:n] for f in fields(scenes)})

