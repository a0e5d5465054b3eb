"""Metrics (method §5): CARE score, CLIP score, FID, RATIO, the CARE labels and the concept detectors.

Each metric is a function of images and models passed in. May import: recare.generate (the
CARE score generates its images), recare.models, recare.io, recare.errors, recare.config;
never recare.train.
"""

from recare.metrics.care_score import CareScoreConfig, evaluate_care_score
from recare.metrics.clip_score import clip_score
from recare.metrics.fid import compute_fid, frechet_distance
from recare.metrics.ratio import RadarNormalisation, compute_ratio

__all__ = ["CareScoreConfig", "RadarNormalisation", "clip_score", "compute_fid", "compute_ratio",
           "evaluate_care_score", "frechet_distance"]
