"""CLIP and SigLIP image preprocessing as torch operations on the model's device.

`TensorImageProcessor.from_processor` reads every setting from a transformers CLIP or SigLIP
image processor and repeats its steps with torch ops on the images' device: convert to RGB
(alpha composited as the processor does), resize (shortest edge or fixed height/width,
bilinear or bicubic, antialiased, rounded back to uint8 as the processor does), center crop
(zero padding where the crop is larger), rescale and normalise.

Agreement with the processor's `pixel_values`, in normalised units (measured in
tests/models/test_preprocess.py on random-noise images, the worst case for interpolation):

* torchvision backend (transformers 5's default), tensor path on the CPU: measured 0, stated
  max |diff| <= TORCHVISION_TOLERANCE = 1e-5 (the same torchvision kernels run);
* the tensor path on a GPU (float kernels, see `resize_uint8_in_float`), and the PIL backend
  with bilinear resampling: the resized uint8 images differ by at most 2 levels (measured),
  stated max |diff| <= UINT8_LEVELS_TOLERANCE / 255 / min(image_std), i.e. 3 levels: 0.045
  for CLIP's std, 0.024 for SigLIP's 0.5; the mean |diff| is below 0.002.

A setting this path does not reproduce raises `UnsupportedProcessor` and callers use the
processor itself: another resize mode or filter, padding, channels-last output, an unknown
processor class, and the PIL backend with bicubic resampling (Pillow 13 runs its vertical pass
first for some shapes, which changes bicubic results by up to 20 uint8 levels on noise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

SUPPORTED_PROCESSORS = frozenset({
    "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
    "SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil",
})
"""Image-processor classes whose steps are exactly resize, center crop, rescale, normalise."""

TORCHVISION_TOLERANCE = 1e-5
"""Max |diff| from the torchvision-backend processor, tensor path on the CPU (normalised units)."""
UINT8_LEVELS_TOLERANCE = 3
"""Max difference in uint8 levels after the resize from the PIL backend, or on a GPU."""

DEVICE_TYPES = ("cpu", "cuda")
"""Devices the tensor path runs on (antialiased float interpolation elsewhere, e.g. MPS, is not assumed)."""

_PIL_BICUBIC, _PIL_BILINEAR = int(Image.Resampling.BICUBIC), int(Image.Resampling.BILINEAR)
_logged: set[str] = set()


class UnsupportedProcessor(ValueError):
    """The processor has a setting that the tensor path does not reproduce."""


def _size_fields(size: Any) -> dict[str, int]:
    """The set fields of a size dict or transformers SizeDict."""
    if size is None:
        return {}
    try:
        items = dict(size)
    except (TypeError, ValueError) as err:
        raise UnsupportedProcessor(f"size {size!r} is not a dict") from err
    return {key: value for key, value in items.items() if value is not None}


def _height_width(size: Any, what: str) -> tuple[int, int]:
    fields = _size_fields(size)
    if set(fields) != {"height", "width"}:
        raise UnsupportedProcessor(f"{what} {fields} is not {{height, width}}")
    return int(fields["height"]), int(fields["width"])


def _interpolation(resample: Any):
    from torchvision.transforms.v2.functional import InterpolationMode

    if isinstance(resample, InterpolationMode):
        mode = resample
    elif isinstance(resample, int) and int(resample) in (_PIL_BICUBIC, _PIL_BILINEAR):
        mode = InterpolationMode.BICUBIC if int(resample) == _PIL_BICUBIC else InterpolationMode.BILINEAR
    else:
        raise UnsupportedProcessor(f"resample {resample!r} is not bilinear or bicubic")
    if mode not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
        raise UnsupportedProcessor(f"resample {mode} is not bilinear or bicubic")
    return mode


def _channels(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))


@dataclass(frozen=True)
class TensorImageProcessor:
    """The steps of a CLIP/SigLIP image processor as torch ops; build it with `from_processor`.

    Output equals the processor's pixel_values within the tolerances in the module docstring.
    """

    shortest_edge: int | None  # resize the shorter side to this, keeping the aspect ratio (CLIP)
    resize_to: tuple[int, int] | None  # or resize to this (height, width) (SigLIP)
    interpolation: Any  # torchvision InterpolationMode
    crop_size: tuple[int, int] | None  # center crop (height, width)
    rescale_factor: float | None
    image_mean: tuple[float, ...] | None
    image_std: tuple[float, ...] | None
    convert_rgb: bool

    @classmethod
    def from_processor(cls, processor: Any) -> TensorImageProcessor:
        """Read the settings of a processor (or of its `image_processor`); UnsupportedProcessor if not exact."""
        image_processor = getattr(processor, "image_processor", processor)
        name = type(image_processor).__name__
        if name not in SUPPORTED_PROCESSORS:
            raise UnsupportedProcessor(f"image processor {name} is not one of {sorted(SUPPORTED_PROCESSORS)}")
        setting = lambda key: getattr(image_processor, key, None)
        backend = setting("backend") or ("torchvision" if name.endswith("Fast") else "pil")  # transformers 4: none
        if setting("do_pad"):
            raise UnsupportedProcessor("do_pad is set")
        data_format = setting("data_format")
        if data_format is not None and str(getattr(data_format, "value", data_format)) != "channels_first":
            raise UnsupportedProcessor(f"data_format {data_format!r} is not channels_first")
        shortest_edge = resize_to = interpolation = None
        if setting("do_resize"):
            fields = _size_fields(setting("size"))
            if set(fields) == {"shortest_edge"}:
                shortest_edge = int(fields["shortest_edge"])
            else:
                resize_to = _height_width(setting("size"), "size")
            interpolation = _interpolation(setting("resample"))
            if backend != "torchvision" and interpolation.value == "bicubic":
                raise UnsupportedProcessor(f"{name} resizes with PIL's bicubic, whose pass order is not reproduced")
        crop_size = _height_width(setting("crop_size"), "crop_size") if setting("do_center_crop") else None
        normalize = bool(setting("do_normalize"))
        return cls(shortest_edge=shortest_edge, resize_to=resize_to, interpolation=interpolation, crop_size=crop_size,
                   rescale_factor=float(setting("rescale_factor")) if setting("do_rescale") else None,
                   image_mean=_channels(setting("image_mean")) if normalize else None,
                   image_std=_channels(setting("image_std")) if normalize else None,
                   convert_rgb=bool(setting("do_convert_rgb")))

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, computed as transformers does."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        if width <= height:
            return int(self.shortest_edge * height / width), self.shortest_edge
        return self.shortest_edge, int(self.shortest_edge * width / height)

    def uint8_image(self, image: Image.Image) -> torch.Tensor:
        """A PIL image as a (H, W, 3) uint8 CPU tensor, converted to RGB as the processor does."""
        plain_rgb = image.mode == "RGB" and image.info.get("transparency") is None
        array = _processor_rgb(image) if self.convert_rgb and not plain_rgb else np.array(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"a {image.mode} image is not 3-channel uint8 without do_convert_rgb")
        return torch.from_numpy(array)

    def __call__(self, images: Sequence[Image.Image], device: str | torch.device = "cpu",
                 group_by_size: bool | None = None) -> torch.Tensor:
        """(n, 3, h, w) float32 pixel values on `device` of PIL images.

        Images are moved to `device` as uint8 before resizing. Same-size images are stacked and
        resized together when `group_by_size` (default: on every device but the CPU, where one
        image at a time is faster).
        """
        device = torch.device(device)
        if group_by_size is None:
            group_by_size = device.type != "cpu"
        arrays = [self.uint8_image(image) for image in images]
        groups: dict[Any, list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault(tuple(array.shape) if group_by_size else index, []).append(index)
        batches = []
        for indices in groups.values():
            if len(indices) == 1:
                batch = arrays[indices[0]][None]
            else:
                batch = torch.empty((len(indices), *arrays[indices[0]].shape), dtype=torch.uint8,
                                    pin_memory=device.type == "cuda")
                torch.stack([arrays[i] for i in indices], out=batch)
            batches.append((indices, batch.to(device, non_blocking=True).permute(0, 3, 1, 2)))
        return self.pixel_values(batches, len(arrays))

    def pixel_values(self, batches: Sequence[tuple[Sequence[int], torch.Tensor]], n: int) -> torch.Tensor:
        """(n, 3, h, w) float32 pixel values from uint8 (k, 3, H, W) batches, each with its k output rows."""
        out = None
        for indices, batch in batches:
            batch = self._crop(self._resize(batch))
            if out is None:
                out = torch.empty((n, *batch.shape[1:]), dtype=torch.float32, device=batch.device)
            elif batch.shape[1:] != out.shape[1:]:
                raise ValueError(f"images of sizes {tuple(batch.shape[1:])} and {tuple(out.shape[1:])} "
                                 "cannot be stacked (no resize to a common size)")
            rows = torch.as_tensor(indices, device=batch.device)
            out[rows] = batch.to(torch.float32, memory_format=torch.contiguous_format)
        if out is None:
            raise ValueError("no images to preprocess")
        return self._rescale_normalize(out)

    def _resize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 resize: the processor's own torchvision call on the CPU, `resize_uint8_in_float` elsewhere."""
        from torchvision.transforms.v2 import functional as tvF

        size = self.resized_size(*batch.shape[-2:])
        if self.interpolation is None or size == tuple(batch.shape[-2:]):
            return batch
        if batch.device.type == "cpu":
            return tvF.resize(batch, list(size), interpolation=self.interpolation, antialias=True)
        return resize_uint8_in_float(batch, size, self.interpolation.value)

    def _crop(self, batch: torch.Tensor) -> torch.Tensor:
        """Center crop as the processor does: zero padding where the crop is larger than the image."""
        from torchvision.transforms.v2 import functional as tvF

        if self.crop_size is None:
            return batch
        crop_h, crop_w = self.crop_size
        height, width = batch.shape[-2:]
        if crop_h > height or crop_w > width:
            pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
            batch = tvF.pad(batch, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
            height, width = batch.shape[-2:]
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
        return batch[..., top:top + crop_h, left:left + crop_w]

    def _rescale_normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """In place; rescale and normalise fused as the torchvision backend does."""
        scale = self.rescale_factor
        if self.image_mean is None:
            return pixels.mul_(scale) if scale is not None else pixels
        mean = torch.tensor(self.image_mean, device=pixels.device)
        std = torch.tensor(self.image_std, device=pixels.device)
        if scale is not None:
            mean, std = mean * (1.0 / scale), std * (1.0 / scale)
        return pixels.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def resize_uint8_in_float(batch: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased uint8 resize computed in float32 on any device, as torch's uint8 kernel does on the CPU.

    Bicubic runs as a width pass then a height pass, each clamped to [0, 255] and rounded, so its
    overshoot is clipped between the passes as in that kernel (one float pass differs by up to
    ~25 uint8 levels on noise); bilinear, which cannot overshoot, runs in one pass. Measured on
    the CPU against the uint8 kernel: at most 2 levels apart.
    """
    pixels = batch.float()
    height, width = batch.shape[-2:]
    steps = [(height, size[1]), tuple(size)] if mode == "bicubic" else [tuple(size)]
    for step in steps:
        if step != tuple(pixels.shape[-2:]):
            pixels = torch.nn.functional.interpolate(pixels, size=list(step), mode=mode, antialias=True,
                                                     align_corners=False).clamp_(0, 255).round_()
    return pixels.to(torch.uint8)


def _processor_rgb(image: Image.Image) -> np.ndarray:
    """transformers' own RGB conversion (transformers 5 composites alpha on white, 4 drops it)."""
    from transformers.image_transforms import convert_to_rgb

    try:
        return np.array(convert_to_rgb(image, return_numpy=True))
    except TypeError:  # transformers 4: no return_numpy, returns a PIL image
        return np.array(convert_to_rgb(image))


def tensor_processor_or_none(processor: Any) -> TensorImageProcessor | None:
    """`TensorImageProcessor.from_processor`, or None (logged at DEBUG once per reason) when unsupported."""
    try:
        return TensorImageProcessor.from_processor(processor)
    except UnsupportedProcessor as err:
        log_once(f"image preprocessing falls back to the processor: {err}")
        return None


def log_once(message: str) -> None:
    """Log `message` at DEBUG the first time it is seen in this process."""
    if message not in _logged:
        _logged.add(message)
        logger.debug(message)
