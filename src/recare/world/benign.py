"""The world's benign data (its COCO): scenes without the target texture, with full captions, and
the RATIO normalisation measured on their renders (used by recare.world.demo)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from recare.errors import RecareError


def benign_scenes(n: int, seed: int, spec: Any = None) -> tuple[Any, torch.Tensor, list[str]]:
    """n world scenes without the target texture, their renders and full captions (the world's COCO);
    spec: the world's WorldSpec (default: the committed world's)."""
    from recare.world import render

    spec = render.WorldSpec() if spec is None else spec
    generator = torch.Generator().manual_seed(seed)
    kept, total = [], 0
    while total < n:
        scenes = render.sample_scenes(4 * n, generator, spec)
        keep = (scenes.texture != render.TEXTURES.index(spec.target)).nonzero().flatten()[: n - total]
        kept.append(render.Scenes(*(getattr(scenes, f)[keep] for f in scenes.__dataclass_fields__)))
        total += len(keep)
    scenes = render.Scenes(*(torch.cat([getattr(s, f) for s in kept]) for f in render.Scenes.__dataclass_fields__))
    images = render.render(scenes, generator, spec)
    captions = [render.full_caption(scenes.labels(i)) for i in range(len(scenes))]
    return scenes, images, captions


def world_normalisation(clip: Any, extractor: Any, n: int, seed: int, spec: Any = None) -> tuple[Any, dict[str, float]]:
    """RATIO bounds measured on real renders, so that radii mean something in the world's feature space.

    CLIP: radius 0 at the mean cosine of renders with shuffled captions (unrelated text), radius
    1 at the mean cosine of renders with their own captions. FID: radius 1 at the FID between two
    independent real render sets (the sampling floor), radius 0 at the FID of renders with the
    object removed (backgrounds only: a model that draws nothing) against real renders. spec: the
    world's WorldSpec (default: the committed world's).
    """
    from recare.metrics.clip_score import clip_score
    from recare.metrics.fid import FidStatistics, frechet_distance
    from recare.metrics.ratio import RadarNormalisation
    from recare.world import render

    spec = render.WorldSpec() if spec is None else spec
    scenes_a, images_a, captions_a = benign_scenes(n, seed + 1, spec)
    _, images_b, _ = benign_scenes(n, seed + 2, spec)
    pil_a = render.to_pil(images_a)
    own = float(clip_score(clip, pil_a, captions_a).per_image.mean())
    shuffled = float(clip_score(clip, pil_a, captions_a[1:] + captions_a[:1]).per_image.mean())
    empty = render.render(replace(scenes_a, size=torch.zeros_like(scenes_a.size)), torch.Generator().manual_seed(seed),
                          spec)

    def stats(images: torch.Tensor) -> Any:
        return FidStatistics.from_features(extractor(render.to_pil(images)), extractor.extractor_id)

    ref, other, blank = stats(images_a), stats(images_b), stats(empty)
    floor = frechet_distance(other.mu, other.sigma, ref.mu, ref.sigma, method="eigh")
    worst = frechet_distance(blank.mu, blank.sigma, ref.mu, ref.sigma, method="eigh")
    measured = {"clip_shuffled_captions": shuffled, "clip_own_captions": own, "fid_real_vs_real": floor,
                "fid_backgrounds_only": worst, "n_images": n}
    if not (shuffled < own and floor < worst):
        raise RecareError(f"the world's reference measurements are degenerate: {measured}")
    return RadarNormalisation(clip_low=shuffled, clip_high=own, fid_best=max(floor, 0.0), fid_worst=worst), measured
