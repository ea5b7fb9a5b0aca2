"""The pixel pipelines: albumentations augmentation for training, a fixed view for evaluation.

Both pipelines take the normalisation statistics, input size, interpolation and crop
percentage from a :class:`Preprocessing` that ``models`` resolves from the encoder's own
pretrained config, so an encoder trained with other statistics gets its own. The eval
pipeline is the one the service runs; it is rebuilt from the artifact's manifest, so
training and serving cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np

_INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the encoder's input tensor (stored in the artifact manifest)."""

    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; one of {sorted(_INTERPOLATIONS)}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=tuple(values["input_size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            interpolation=values.get("interpolation", "bicubic"),
            crop_pct=float(values.get("crop_pct", 0.875)),
            crop_mode=values.get("crop_mode", "center"),
        )


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation strengths (the defaults suit small fine-tuning sets)."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.2
    color_jitter_p: float = 0.8


class ToChannelsFirst(A.ImageOnlyTransform):
    """HWC float32 → contiguous CHW float32, the layout the encoder expects."""

    def __init__(self) -> None:
        super().__init__(p=1.0)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def build_train_transform(
    preprocessing: Preprocessing, augmentation: Augmentation | None = None
) -> A.Compose:
    """RandomResizedCrop + flips + colour jitter, then the encoder's normalisation."""
    aug = augmentation or Augmentation()
    interpolation = _INTERPOLATIONS[preprocessing.interpolation]
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=preprocessing.input_size,
            scale=aug.scale,
            ratio=aug.ratio,
            interpolation=interpolation,
        )
    ]
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.color_jitter > 0:
        strength = aug.color_jitter
        steps.append(
            A.ColorJitter(
                brightness=strength,
                contrast=strength,
                saturation=strength,
                hue=0.0,
                p=aug.color_jitter_p,
            )
        )
    return A.Compose([*steps, _normalisation(preprocessing), ToChannelsFirst()])


def build_eval_transform(preprocessing: Preprocessing) -> EvalTransform:
    """timm's eval view: the centre ``crop_pct`` of the image, resized to the input size."""
    return EvalTransform(preprocessing)


class EvalTransform:
    """timm's eval view, called as ``transform(image=rgb)["image"]`` like the training pipeline.

    timm resizes the shorter side to ``size / crop_pct`` and then crops ``size``; cropping
    first and resizing second keeps the same region but never builds the enlarged
    intermediate, which for a 40000x1 upload would be gigabytes. Three OpenCV calls rather
    than an ``A.Compose`` of ``Resize`` and ``Normalize``: the same pixels (the lookup table
    is ``A.Normalize``'s own output for each of the 256 values, and a test compares the two)
    in two thirds of the time (0.33 against 0.48 ms at 224 px, timed once by hand), which
    the service pays on every request.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.height, self.width = preprocessing.input_size
        self.crop_pct = preprocessing.crop_pct
        self.square = self.height == self.width
        self.interpolation = _INTERPOLATIONS[preprocessing.interpolation]
        every_value = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3)
        self.lookup = _normalisation(preprocessing)(image=every_value)["image"]

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        crop = center_crop_fraction(image, self.crop_pct, square=self.square)
        resized = cv2.resize(crop, (self.width, self.height), interpolation=self.interpolation)
        normalised = cv2.LUT(resized, self.lookup)
        return {"image": np.ascontiguousarray(normalised.transpose(2, 0, 1))}


def eval_decode_size(preprocessing: Preprocessing) -> tuple[int, int]:
    """The (width, height) a JPEG may be shrunk to while decoding, for the eval transform.

    Decoding at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``) costs a fraction of a full
    decode; at this size the centre crop is still no smaller than the input, so the eval
    transform only ever shrinks. Training's val/test loaders, ``convtune predict`` and
    ``evaluate`` and the service all decode this way, so they see the same pixels.
    """
    side = math.ceil(max(preprocessing.input_size) / preprocessing.crop_pct)
    return side, side


def center_crop_fraction(image: np.ndarray, fraction: float, *, square: bool) -> np.ndarray:
    """The centred ``fraction`` of ``image`` (a view): of its shorter side, as a square, for
    square inputs; of each side otherwise."""
    h, w = image.shape[:2]
    if square:
        crop_h = crop_w = max(1, round(min(h, w) * fraction))
    else:
        crop_h, crop_w = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w]


def _normalisation(preprocessing: Preprocessing) -> A.Normalize:
    return A.Normalize(mean=preprocessing.mean, std=preprocessing.std, max_pixel_value=255.0)
