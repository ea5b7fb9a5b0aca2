"""The training pipeline: albumentations augmentation, then the model's normalisation.

It takes the normalisation statistics, input size and interpolation from the same
:class:`~convtune.data.preprocessing.Preprocessing` as the eval view, so an encoder
trained with other statistics gets its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import albumentations as A
import cv2
import numpy as np

from convtune.data.preprocessing import INTERPOLATIONS, EvalGeometry, Preprocessing


@dataclass(frozen=True, kw_only=True)
class Augmentation:
    """Training-time augmentation.

    ``random_crop`` off trains on the eval view of the whole image, which suits inspection
    data (cells, documents, X-rays) where the evidence may sit anywhere, the border
    included; ``rotate90`` with both flips then covers the 8 symmetries of a square, and
    the affine ranges add the small scale, shift and rotation changes a fixture allows.
    """

    # No defaults for what a fit configures: training's FitConfig holds them (they suit
    # photos in small fine-tuning sets), so each lives in one place.
    random_crop: bool
    scale: tuple[float, float]
    hflip: float
    vflip: float
    rotate90: bool
    affine_scale: float
    affine_shift: float
    affine_rotate: float
    color_jitter: float
    # Fixed parts of the recipe, not fit options.
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter_p: float = 0.8


class ToChannelsFirst(A.ImageOnlyTransform):
    """HWC float32 → contiguous CHW float32, the layout the encoder expects."""

    def __init__(self) -> None:
        super().__init__(p=1.0)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


class EvalView(A.ImageOnlyTransform):
    """The eval view's geometry (crop and resize, no normalisation) as a pipeline step."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__(p=1.0)
        self.geometry = EvalGeometry(preprocessing)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return self.geometry(img)


def build_train_transform(
    preprocessing: Preprocessing,
    augmentation: Augmentation,
    *,
    input_size: tuple[int, int] | None = None,
) -> A.Compose:
    """A view of the image at ``input_size`` (a random crop, or the eval view), flips and
    rotations, a small affine, colour jitter, then the encoder's normalisation.

    ``input_size`` defaults to the eval input size; training may run smaller (cheaper) and
    evaluate at the model's full size.
    """
    aug = augmentation
    size = input_size or preprocessing.input_size
    if aug.rotate90 and size[0] != size[1]:
        raise ValueError(f"rotate90 needs a square input size, got {size[0]}x{size[1]}")
    view = (
        A.RandomResizedCrop(
            size=size,
            scale=aug.scale,
            ratio=aug.ratio,
            interpolation=INTERPOLATIONS[preprocessing.interpolation],
            area_for_downscale="image",
        )
        if aug.random_crop
        else EvalView(replace(preprocessing, input_size=size))
    )
    steps = [view, *_augmentation_steps(aug), _normalisation(preprocessing), ToChannelsFirst()]
    return A.Compose(steps)


def _augmentation_steps(aug: Augmentation) -> list[A.BasicTransform]:
    """The flips, rotations, affine and colour jitter that ``aug`` turns on, in order."""
    steps: list[A.BasicTransform] = []
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate90:
        steps.append(A.RandomRotate90(p=1.0))
    if aug.affine_scale or aug.affine_shift or aug.affine_rotate:
        steps.append(
            A.Affine(
                scale=(1 - aug.affine_scale, 1 + aug.affine_scale),
                translate_percent=(-aug.affine_shift, aug.affine_shift),
                rotate=(-aug.affine_rotate, aug.affine_rotate),
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_REFLECT_101,
                p=1.0,
            )
        )
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
    return steps


def _normalisation(preprocessing: Preprocessing) -> A.Normalize:
    return A.Normalize(mean=preprocessing.mean, std=preprocessing.std, max_pixel_value=255.0)
