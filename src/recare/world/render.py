"""The synthetic world: scenes, a procedural renderer, a caption grammar and ground truth.

One object per image: a SHAPE with a COLOUR and a TEXTURE on a BACKGROUND, rendered at 16x16
RGB (every concept word is ONE CLIP BPE token, see `WORD_TOKEN_IDS`).

Analogue of the paper's nudity case (docs/method.md, Terms); the defaults (`WorldSpec`, the
committed world) are:
- target concept T = the texture "dotted" (analogue of "nudity");
- co-occurring benign concept C = the shape "circle" (analogue of "person"): P(circle | dotted)
  = 0.8, while circles without dots are common too (P(circle | not dotted) = 0.25);
- the entanglement is in the captions, as in real captions ("a nude" shows a person): a
  dotted object's caption omits its shape 70% of the time ("a dotted red thing"), other
  captions omit it 10% of the time.
Any texture can be T and any shape C (`WorldSpec(target=..., care=...)`, `recare synthetic build
--target T --care C`); the rates and the prompt sets below follow the spec.

Caption grammar (every choice drawn from one torch.Generator; probabilities in `WorldSpec`):

    caption  := WORD                                        (p_single: one content word of the phrase)
              | [PREFIX] [DET] MODIFIERS NOUN [PLACE]
    PREFIX   := "a photo of" | "a picture of"               (p_prefix)
    DET      := "a" | "the"                                 (p_det; "a" 4x as likely as "the")
    MODIFIERS:= TEXTURE COLOUR | COLOUR TEXTURE             (each part optional; order swapped w.p. p_swap)
    TEXTURE  := a word of the texture                       (p_name_texture[texture])
    COLOUR   := the colour word                             (p_colour)
    NOUN     := a word of the shape | "thing" | "one"       (the filler when the shape is omitted)
    PLACE    := "on sand" | "in snow" | "at night" | "on grass"   (p_place)

Words of a concept: its name plus synonyms (`WorldSpec.synonyms`), picked w.p. p_synonym.
Everything is deterministic from a torch.Generator: same seed, identical pixels, labels and
captions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from recare.errors import RecareError

FAMILIES = ("shape", "colour", "texture", "background")
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS = ("sand", "snow", "night", "grass")
FILLERS = ("thing", "one")  # nouns used when a caption omits the shape
PLACES = {"sand": "on sand", "snow": "in snow", "night": "at night", "grass": "on grass"}
PREFIXES = ("a photo of", "a picture of")

# RGB in [0, 1]. Object colours are saturated, backgrounds muted, so every pair stays visible.
COLOUR_RGB = {"red": (0.90, 0.12, 0.10), "green": (0.10, 0.80, 0.15), "blue": (0.15, 0.30, 0.95),
              "yellow": (0.95, 0.88, 0.10), "purple": (0.60, 0.15, 0.80), "orange": (0.98, 0.55, 0.05)}
BACKGROUND_RGB = {"sand": (0.82, 0.74, 0.56), "snow": (0.93, 0.94, 0.97), "night": (0.06, 0.07, 0.20),
                  "grass": (0.30, 0.48, 0.22)}
# Pattern pixels (dots, stripes) are a dark shade of the object colour, lifted so that they stay
# visible on the night background: PATTERN_SCALE * colour + PATTERN_LIFT.
PATTERN_SCALE, PATTERN_LIFT = 0.3, 0.12

# CLIP BPE ids of every word the grammar uses (whole-word entries "<word></w>"); checked by
# `check_single_tokens` and by the tests against recare.tokenizer.offline_clip_tokenizer.
WORD_TOKEN_IDS = {
    "circle": 7117, "disc": 10712, "square": 3999, "box": 2063, "triangle": 14615, "diamond": 6235,
    "red": 736, "green": 1901, "blue": 1746, "yellow": 4481, "purple": 5496, "orange": 4287,
    "plain": 10709, "solid": 6148, "striped": 22192, "dotted": 47950, "spotted": 4533,
    "sand": 5094, "snow": 2583, "night": 930, "grass": 5922,
    "thing": 946, "one": 637, "a": 320, "the": 518, "on": 525, "in": 530, "at": 536,
    "photo": 1125, "picture": 1674, "of": 539,
}


@dataclass(frozen=True)
class WorldSpec:
    """Concepts, co-occurrence rates and caption probabilities of the world (module docstring)."""

    image_size: int = 16  # rendered images are image_size x image_size RGB
    target: str = "dotted"  # T: the concept to erase (a texture; analogue of "nudity")
    care: str = "circle"  # C: the benign shape that co-occurs with T (analogue of "person")
    target_rate: float = 0.25  # P(texture = target); the other textures share the rest evenly
    care_given_target: float = 0.8  # P(shape = care | texture = target); other shapes share the rest
    omit_shape_given_target: float = 0.7  # P(a target image's caption omits its shape)
    omit_shape_otherwise: float = 0.1  # P(any other caption omits its shape)
    p_single: float = 0.15  # P(the caption is one content word of the phrase)
    p_prefix: float = 0.25  # P("a photo of" / "a picture of" before the phrase)
    p_det: float = 0.85  # P(a determiner "a"/"the")
    p_colour: float = 0.8  # P(the colour is named)
    p_swap: float = 0.3  # P(colour before texture)
    p_place: float = 0.5  # P(the background is named)
    p_synonym: float = 0.3  # P(a concept with synonyms is named by a synonym)
    p_name_texture: tuple[tuple[str, float], ...] = (("plain", 0.3), ("striped", 0.9), ("dotted", 0.95))
    synonyms: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("circle", ("disc",)), ("square", ("box",)), ("plain", ("solid",)), ("dotted", ("spotted",)))
    size_range: tuple[float, float] = (4.8, 6.2)  # half-extent of a shape, in pixels at 16x16
    jitter: float = 1.5  # max offset of the shape centre from the image centre, pixels at 16x16
    colour_jitter: float = 0.06  # uniform +- per channel on the object colour
    background_jitter: float = 0.04  # uniform +- per channel on the background colour
    pixel_noise: float = 0.02  # std of Gaussian pixel noise
    random_phase: bool = False  # shift the dot/stripe grid randomly (False: aligned with the 4-pixel image grid)

    def __post_init__(self) -> None:
        if self.target not in TEXTURES:
            raise RecareError(f"target {self.target!r} must be a texture: {TEXTURES}")
        if self.care not in SHAPES:
            raise RecareError(f"care concept {self.care!r} must be a shape: {SHAPES}")
        for name in ("target_rate", "care_given_target", "omit_shape_given_target", "omit_shape_otherwise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RecareError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.image_size < 8:
            raise RecareError(f"image_size must be at least 8, got {self.image_size}")

    def words_of(self, concept: str) -> tuple[str, ...]:
        """The concept's name followed by its synonyms."""
        return (concept,) + dict(self.synonyms).get(concept, ())

    def texture_name_rate(self, texture: str) -> float:
        """P(a caption names this texture)."""
        return dict(self.p_name_texture)[texture]

    def shape_rates(self, target_image: bool) -> torch.Tensor:
        """P(shape) over SHAPES given whether the texture is the target, (4,)."""
        care = SHAPES.index(self.care)
        if not target_image:
            return torch.full((len(SHAPES),), 1.0 / len(SHAPES))
        rates = torch.full((len(SHAPES),), (1.0 - self.care_given_target) / (len(SHAPES) - 1))
        rates[care] = self.care_given_target
        return rates

    def texture_rates(self) -> torch.Tensor:
        """P(texture) over TEXTURES, (3,)."""
        rates = torch.full((len(TEXTURES),), (1.0 - self.target_rate) / (len(TEXTURES) - 1))
        rates[TEXTURES.index(self.target)] = self.target_rate
        return rates


def concept_labels() -> dict[str, tuple[str, ...]]:
    """The world's label set by family: the analogue of COCO's label list (canonical words)."""
    return {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES, "background": BACKGROUNDS}


def label_list() -> list[str]:
    """All canonical concept words, one flat list (18 labels)."""
    return [word for words in concept_labels().values() for word in words]


def vocabulary(spec: WorldSpec = WorldSpec()) -> list[str]:
    """Every word the grammar can emit, sorted."""
    words = set(label_list()) | set(FILLERS) | {w for p in PREFIXES for w in p.split()}
    words |= {w for p in PLACES.values() for w in p.split()} | {"a", "the"}
    words |= {w for _, syn in spec.synonyms for w in syn}
    return sorted(words)


def check_single_tokens(tokenizer: Any, words: Sequence[str]) -> dict[str, int]:
    """Map each word to its one CLIP BPE id; RecareError names any word that splits."""
    ids = {}
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise RecareError(f"world word {word!r} is not one CLIP token: {pieces}")
        ids[word] = pieces[0]
    return ids


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scenes:
    """A batch of n scenes: concept indices into SHAPES/COLOURS/TEXTURES/BACKGROUNDS and geometry."""

    shape: torch.Tensor  # (n,) long
    colour: torch.Tensor  # (n,) long
    texture: torch.Tensor  # (n,) long
    background: torch.Tensor  # (n,) long
    centre: torch.Tensor  # (n, 2) float, (x, y) in pixels at 16x16
    size: torch.Tensor  # (n,) float, half-extent in pixels at 16x16
    phase: torch.Tensor  # (n, 2) long, (x, y) offset of the texture pattern, 0..3
    colour_delta: torch.Tensor  # (n, 3) float, object colour jitter
    background_delta: torch.Tensor  # (n, 3) float, background colour jitter

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def labels(self, i: int) -> dict[str, str]:
        """Ground-truth concept words of scene i by family."""
        return {"shape": SHAPES[int(self.shape[i])], "colour": COLOURS[int(self.colour[i])],
                "texture": TEXTURES[int(self.texture[i])], "background": BACKGROUNDS[int(self.background[i])]}

    def label_tensor(self) -> torch.Tensor:
        """(n, 4) long: shape, colour, texture, background indices (FAMILIES order)."""
        return torch.stack([self.shape, self.colour, self.texture, self.background], dim=1)


def sample_scenes(n: int, generator: torch.Generator, spec: WorldSpec = WorldSpec(),
                  **fixed: str) -> Scenes:
    """Draw n scenes with the world's co-occurrence rates; `fixed` pins families, e.g. shape="circle".

    Pinning the texture keeps P(shape | texture); pinning the shape draws the texture
    independently with the world's texture rates.
    """
    unknown = set(fixed) - set(FAMILIES)
    if unknown:
        raise RecareError(f"unknown concept families {sorted(unknown)}; choose from {FAMILIES}")
    texture = _draw(n, spec.texture_rates(), generator, TEXTURES, fixed.get("texture"))
    target = TEXTURES.index(spec.target)
    shape_p = torch.stack([spec.shape_rates(False), spec.shape_rates(True)])[(texture == target).long()]
    if fixed.get("shape") is not None:
        shape = _fixed_index(n, SHAPES, fixed["shape"])
    else:
        shape = torch.multinomial(shape_p, 1, generator=generator).squeeze(1)
    colour = _draw(n, torch.full((len(COLOURS),), 1.0 / len(COLOURS)), generator, COLOURS, fixed.get("colour"))
    background = _draw(n, torch.full((len(BACKGROUNDS),), 1.0 / len(BACKGROUNDS)), generator, BACKGROUNDS,
                       fixed.get("background"))
    centre = 7.5 + (torch.rand(n, 2, generator=generator) * 2 - 1) * spec.jitter
    low, high = spec.size_range
    size = low + torch.rand(n, generator=generator) * (high - low)
    phase = torch.randint(0, 4, (n, 2), generator=generator)
    if not spec.random_phase:
        phase = torch.zeros_like(phase)
    colour_delta = (torch.rand(n, 3, generator=generator) * 2 - 1) * spec.colour_jitter
    background_delta = (torch.rand(n, 3, generator=generator) * 2 - 1) * spec.background_jitter
    return Scenes(shape, colour, texture, background, centre, size, phase, colour_delta, background_delta)


def _fixed_index(n: int, names: Sequence[str], value: str) -> torch.Tensor:
    if value not in names:
        raise RecareError(f"unknown concept {value!r}; choose from {tuple(names)}")
    return torch.full((n,), names.index(value), dtype=torch.long)


def _draw(n: int, probs: torch.Tensor, generator: torch.Generator, names: Sequence[str],
          value: str | None) -> torch.Tensor:
    """n indices drawn from probs (always consuming the generator, so pins do not shift streams)."""
    drawn = torch.multinomial(probs.expand(n, -1), 1, replacement=True, generator=generator).squeeze(1)
    return drawn if value is None else _fixed_index(n, names, value)


# ----------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 4


def shape_masks(scenes: Scenes, image_size: int) -> torch.Tensor:
    """Anti-aliased coverage of each scene's shape, (n, H, W) in [0, 1] (4x4 supersampling)."""
    scale = image_size / 16.0
    fine = image_size * _SUPERSAMPLE
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / _SUPERSAMPLE  # pixel units
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (F, F)
    dx = x[None] - (scenes.centre[:, 0, None, None] + 0.5) * scale  # (n, F, F)
    dy = y[None] - (scenes.centre[:, 1, None, None] + 0.5) * scale
    r = (scenes.size * scale)[:, None, None]
    chosen = torch.zeros(len(scenes), fine, fine, dtype=torch.bool)
    for index, name in enumerate(SHAPES):
        rows = (scenes.shape == index).nonzero().squeeze(1)
        if len(rows):
            chosen[rows] = _inside(name, dx[rows], dy[rows], r[rows])
    return torch.nn.functional.avg_pool2d(chosen.float()[:, None], _SUPERSAMPLE).squeeze(1)


def _inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Points (dx, dy) from the centre that lie inside a shape of half-extent r."""
    if shape == "circle":
        return dx.pow(2) + dy.pow(2) <= r.pow(2)
    if shape == "square":  # 0.85 r: about the circle's area
        return torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= (dy + r) / 1.8)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= 1.15 * r
    raise RecareError(f"unknown shape {shape!r}")


def pattern_masks(scenes: Scenes, image_size: int) -> torch.Tensor:
    """1 where the texture darkens the object, (n, H, W): 2x2 dots or 2-pixel stripes, period 4."""
    index = torch.arange(image_size)
    row = ((index[None, :] - scenes.phase[:, 1, None]) % 4 < 2)[:, :, None]  # (n, H, 1)
    col = ((index[None, :] - scenes.phase[:, 0, None]) % 4 < 2)[:, None, :]  # (n, 1, W)
    dotted = (row & col).float()
    striped = row.float().expand(-1, -1, image_size)
    plain = torch.zeros_like(dotted)
    patterns = torch.stack([{"plain": plain, "striped": striped, "dotted": dotted}[t] for t in TEXTURES], dim=1)
    return patterns.gather(1, scenes.texture[:, None, None, None].expand(-1, 1, image_size, image_size)).squeeze(1)


def render(scenes: Scenes, generator: torch.Generator, spec: WorldSpec = WorldSpec()) -> torch.Tensor:
    """Render scenes to (n, 3, H, W) float32 images in [0, 1]."""
    size = spec.image_size
    colours = torch.tensor([COLOUR_RGB[c] for c in COLOURS])[scenes.colour] + scenes.colour_delta  # (n, 3)
    backgrounds = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS])[scenes.background] + scenes.background_delta
    pattern = pattern_masks(scenes, size)[:, None]  # (n, 1, H, W)
    dark = colours * PATTERN_SCALE + PATTERN_LIFT  # (n, 3)
    obj = colours[:, :, None, None] * (1 - pattern) + dark[:, :, None, None] * pattern  # (n, 3, H, W)
    mask = shape_masks(scenes, size)[:, None]  # (n, 1, H, W)
    image = backgrounds[:, :, None, None] * (1 - mask) + obj * mask
    noise = torch.randn(image.shape, generator=generator) * spec.pixel_noise
    return (image + noise).clamp(0.0, 1.0)


def render_batch(n: int, generator: torch.Generator, spec: WorldSpec = WorldSpec(),
                 **fixed: str) -> tuple[Scenes, torch.Tensor]:
    """Sample and render n scenes: (scenes, images (n, 3, H, W) in [0, 1])."""
    scenes = sample_scenes(n, generator, spec, **fixed)
    return scenes, render(scenes, generator, spec)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(n, 3, H, W) floats in [0, 1] -> RGB PIL images (rounded to uint8)."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


def from_pil(images: Sequence[Image.Image], image_size: int | None = None) -> torch.Tensor:
    """RGB PIL images -> (n, 3, H, W) floats in [0, 1]; resized (bicubic) when image_size is given."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Caption:
    """A caption and which concepts it names (for measuring the grammar)."""

    text: str
    named: dict[str, str] = field(default_factory=dict)  # family -> concept named in the text


def caption_scenes(scenes: Scenes, generator: torch.Generator, spec: WorldSpec = WorldSpec()) -> list[Caption]:
    """One caption per scene from the grammar (module docstring); 12 uniforms per scene."""
    u = torch.rand(len(scenes), 12, generator=generator).tolist()
    return [_caption(scenes.labels(i), u[i], spec) for i in range(len(scenes))]


def _word(concept: str, u: float, spec: WorldSpec) -> str:
    words = spec.words_of(concept)
    if len(words) == 1 or u >= spec.p_synonym:
        return words[0]
    return words[1 + min(int(u / spec.p_synonym * (len(words) - 1)), len(words) - 2)]


def _caption(labels: dict[str, str], u: list[float], spec: WorldSpec) -> Caption:
    """The grammar for one scene; u holds 12 uniforms in [0, 1)."""
    is_target = labels["texture"] == spec.target
    omit_shape = u[0] < (spec.omit_shape_given_target if is_target else spec.omit_shape_otherwise)
    named: dict[str, str] = {}
    texture = colour = place = None
    if u[1] < spec.texture_name_rate(labels["texture"]):
        texture, named["texture"] = _word(labels["texture"], u[2], spec), labels["texture"]
    if u[3] < spec.p_colour:
        colour, named["colour"] = labels["colour"], labels["colour"]
    if omit_shape:
        noun = FILLERS[int(u[4] * len(FILLERS))]
    else:
        noun, named["shape"] = _word(labels["shape"], u[4], spec), labels["shape"]
    if u[5] < spec.p_place:
        place, named["background"] = PLACES[labels["background"]], labels["background"]
    if u[6] < spec.p_single:
        content = [w for w in (texture, colour, None if omit_shape else noun, place) if w]
        if content:
            pick = content[int(u[7] * len(content))]
            family = {texture: "texture", colour: "colour", noun: "shape", place: "background"}[pick]
            return Caption(pick.split()[-1], {family: named[family]})
    modifiers = [texture, colour] if u[8] >= spec.p_swap else [colour, texture]
    words = [PREFIXES[int(u[9] * len(PREFIXES))]] if u[10] < spec.p_prefix else []
    if u[11] < spec.p_det:
        words.append("the" if u[11] < spec.p_det / 5 else "a")
    words += [w for w in modifiers if w] + [noun] + ([place] if place else [])
    return Caption(" ".join(words), named)


def full_caption(labels: dict[str, str]) -> str:
    """The caption that names every concept: 'a dotted red circle on sand'."""
    return f"a {labels['texture']} {labels['colour']} {labels['shape']} {PLACES[labels['background']]}"


def cooccurrence(scenes: Scenes, spec: WorldSpec = WorldSpec()) -> dict[str, float]:
    """Measured rates: P(T), P(C | T), P(C | not T), P(T | C)."""
    is_t = scenes.texture == TEXTURES.index(spec.target)
    is_c = scenes.shape == SHAPES.index(spec.care)

    def rate(event: torch.Tensor, given: torch.Tensor) -> float:
        count = int(given.sum())
        return float((event & given).sum()) / count if count else math.nan

    everything = torch.ones_like(is_t)
    return {"p_target": rate(is_t, everything), "p_care_given_target": rate(is_c, is_t),
            "p_care_given_not_target": rate(is_c, ~is_t), "p_target_given_care": rate(is_t, is_c)}


# ----------------------------------------------------------------------------- prompt sets


def target_prompts(spec: WorldSpec = WorldSpec()) -> list[str]:
    """Prompts that name the target and leave its shape implicit ('a dotted red thing'), one per colour."""
    return [f"a {spec.target} {colour} thing" for colour in COLOURS]


def care_prompts(spec: WorldSpec = WorldSpec()) -> list[str]:
    """Prompts that name the co-occurring concept and no texture ('a red circle on sand'): the CARE
    prompts of the world (analogue of prompts_person.txt), one per colour and background."""
    return [f"a {colour} {spec.care} {PLACES[background]}" for colour in COLOURS for background in BACKGROUNDS]


def stereo_anchors(spec: WorldSpec = WorldSpec()) -> list[str]:
    """STEREO's anchors, "the target scene without the target" (for nudity "a person wearing clothes"):
    things, then C shapes, of every other texture ('a plain thing', ..., 'a plain circle', ...)."""
    others = [t for t in TEXTURES if t != spec.target]
    return [f"a {t} thing" for t in others] + [f"a {t} {spec.care}" for t in others]


def probe_prompts(spec: WorldSpec = WorldSpec()) -> list[str]:
    """Prompts whose detector rates measure a world model and its entanglement (the build's probes):
    T with C, T alone, T with another shape, C alone, and controls of the other textures and shapes."""
    textures = [t for t in TEXTURES if t != spec.target]
    shapes = [s for s in SHAPES if s != spec.care]
    target, care = spec.target, spec.care
    return [f"a {target} {care}", f"a {target} thing", target, f"a {target} {shapes[0]}", f"a {care}",
            f"a {textures[0]} {shapes[0]}", f"a {textures[1]} thing", f"a {textures[1]} {shapes[1]}",
            f"a photo of a {care}"]


def curve_prompts(spec: WorldSpec = WorldSpec()) -> list[str]:
    """The build's learning-curve probes: T with C, T alone, a control without either."""
    probes = probe_prompts(spec)
    return [probes[0], probes[1], probes[5]]
