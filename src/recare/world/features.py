"""FID in the world's feature space: the world CLIP's image embeddings stand in for Inception.

The Inception network of clean-fid was trained on ImageNet photographs; on 16x16 renders of
flat shapes its pool3 features say little. The world's own CLIP image tower, trained on the
world, is the analogue of "a network that knows this image distribution". FID's formula is
unchanged (recare.fid.frechet_distance over the mean and covariance of the features,
Heusel et al. 2017); only the feature map differs, and `extractor_id` says which it is, so
world statistics never mix with Inception statistics.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from recare.errors import RecareError
from recare.io import load_image_rgb
from recare.models.loading import ImageTextModel


class WorldClipFeatureExtractor:
    """Duck-typed like recare.fid.InceptionFeatureExtractor: L2-normalised CLIP image embeddings."""

    def __init__(self, clip: ImageTextModel, batch_size: int = 256):
        self.clip = clip
        self.batch_size = int(batch_size)
        dim = clip.model.config.projection_dim
        self.extractor_id = f"world-clip-image-embedding:{dim}d:fingerprint={clip.fingerprint()[:12]}"

    def __call__(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """(n, d) float64 features of PIL images."""
        return self._run(len(images), lambda i: images[i], progress)

    def features_of_files(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> np.ndarray:
        """(n, d) features of image files."""
        return self._run(len(paths), lambda i: load_image_rgb(paths[i]), progress)

    def _run(self, n: int, get_image, progress: bool) -> np.ndarray:
        if n == 0:
            raise RecareError("no images to extract FID features from")
        chunks = []
        for start in tqdm(range(0, n, self.batch_size), desc="world-clip features", disable=not progress):
            batch = [get_image(i) for i in range(start, min(n, start + self.batch_size))]
            chunks.append(self.clip.encode_images(batch, batch_size=self.batch_size).double().numpy())
        return np.concatenate(chunks)
