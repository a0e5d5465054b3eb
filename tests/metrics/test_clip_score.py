"""CLIP score: the paired-cosine rule on hand features, and the tiny CLIP end to end."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from recare.errors import RecareError
from recare.metrics.clip_score import clip_score, paired_cosines


def test_paired_cosines_hand_features():
    images = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[4.0, 3.0], [-1.0, 0.0], [0.0, 5.0]])
    # (12 + 12) / (5 * 5) = 0.96; opposite = -1 (kept negative, no clipping); same direction = 1
    assert paired_cosines(images, texts).tolist() == pytest.approx([0.96, -1.0, 1.0], abs=1e-6)
    # only the pairs on the diagonal count: (3,4).(0,5) = 20/25, (0,2).(4,3) = 6/10
    assert paired_cosines(images, texts.flip(0)).tolist() == pytest.approx([0.8, -1.0, 0.6], abs=1e-6)
    with pytest.raises(ValueError):
        paired_cosines(images, texts[:2])


def test_clip_score_tiny_clip(tiny_clip):
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (40, 24), (0, 0, 255)),
              Image.new("RGB", (32, 32), (20, 200, 20))]
    prompts = ["a red square", "a blue car parked on a street", "green"]
    mean, per_image = clip_score(tiny_clip, images, prompts, batch_size=2)
    assert per_image.shape == (3,) and per_image.dtype == torch.float32
    expected = (tiny_clip.encode_images(images) * tiny_clip.encode_text(prompts)).sum(dim=-1)
    assert per_image.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert mean == pytest.approx(float(expected.mean()), abs=1e-6)
    assert all(-1.0 <= v <= 1.0 for v in per_image.tolist())  # a cosine, not x100
    # the order of pairs matters
    swapped = clip_score(tiny_clip, images, prompts[::-1]).per_image
    assert not torch.allclose(swapped, per_image)
    assert not math.isnan(mean)


def test_clip_score_errors(tiny_clip):
    img = Image.new("RGB", (32, 32))
    with pytest.raises(RecareError, match="2 images, 1 prompts"):
        clip_score(tiny_clip, [img, img], ["x"])
    with pytest.raises(RecareError, match="zero images"):
        clip_score(tiny_clip, [], [])
    with pytest.raises(RecareError, match="not a string"):
        clip_score(tiny_clip, [img], "x")
