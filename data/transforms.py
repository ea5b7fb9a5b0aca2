"""The pixel pipelines: albumentations augmentation for training, a fixed view for evaluation.

Both pipelines take the normalisation statistics, input size, interpolation and crop
percentage from a :class:`Preprocessing` that ``models`` resolves from the encoder's own
pretrained config, so an encoder trained with other statistics gets its own. The eval
pipeline is the one the service runs; it is rebuilt from the artifact's manifest, so
training and serving cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
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
CROP_MODES = ("center", "squash", "border")


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
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode {self.crop_mode!r}; one of {CROP_MODES}")

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
            interpolation=_INTERPOLATIONS[preprocessing.interpolation],
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


def build_eval_transform(preprocessing: Preprocessing) -> EvalTransform:
    """timm's eval view (``crop_pct`` and ``crop_mode``), resized to the input size."""
    return EvalTransform(preprocessing)


def resize(image: np.ndarray, size: tuple[int, int], *, interpolation: str) -> np.ndarray:
    """``image`` resized to ``size`` (width, height): pixel-area averaging when it shrinks
    on both axes, so a large image does not alias; ``interpolation`` otherwise.

    Every eval view goes through here, so a large PNG and its JPEG twin (which the JPEG
    decoder already shrank by averaging) give nearly the same input.
    """
    height, width = image.shape[:2]
    if (width, height) == size:
        return image
    shrinking = size[0] <= width and size[1] <= height
    flag = cv2.INTER_AREA if shrinking else _INTERPOLATIONS[interpolation]
    return cv2.resize(image, size, interpolation=flag)


class EvalGeometry:
    """timm's eval geometry for one ``crop_mode``, on uint8 RGB, without normalisation.

    With ``scale_size = size / crop_pct``: ``center`` resizes the shorter side to it and
    crops the centre (aspect kept, the border lost unless ``crop_pct`` is 1); ``squash``
    resizes each side to it and crops the centre (aspect not kept); ``border`` resizes the
    longer side to it and pads with the mean colour (nothing lost at ``crop_pct`` 1).
    The region that survives is cut out before resizing, so an elongated upload never
    builds a huge intermediate.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.height, self.width = preprocessing.input_size
        self.crop_pct = preprocessing.crop_pct
        self.mode = preprocessing.crop_mode
        self.interpolation = preprocessing.interpolation
        self.fill = tuple(round(255 * m) for m in preprocessing.mean)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.mode == "border":
            return self._fit_and_pad(image)
        h, w = image.shape[:2]
        if self.mode == "center" and self.height == self.width:
            crop_h = crop_w = max(1, round(min(h, w) * self.crop_pct))
        elif self.mode == "center":
            # Shorter side to scale, keeping aspect: the crop spans size/scale of each side.
            scale = max(self.height / h, self.width / w) / self.crop_pct
            crop_h = min(h, max(1, round(self.height / scale)))
            crop_w = min(w, max(1, round(self.width / scale)))
        else:
            crop_h, crop_w = max(1, round(h * self.crop_pct)), max(1, round(w * self.crop_pct))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        crop = image[top : top + crop_h, left : left + crop_w]
        return resize(crop, (self.width, self.height), interpolation=self.interpolation)

    def _fit_and_pad(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        scale = min(self.height / h, self.width / w) / self.crop_pct
        crop_h, crop_w = min(h, round(self.height / scale)), min(w, round(self.width / scale))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        out_h = min(self.height, max(1, round(crop_h * scale)))
        out_w = min(self.width, max(1, round(crop_w * scale)))
        fitted = resize(
            image[top : top + crop_h, left : left + crop_w],
            (out_w, out_h),
            interpolation=self.interpolation,
        )
        pad_top, pad_left = (self.height - out_h) // 2, (self.width - out_w) // 2
        return cv2.copyMakeBorder(
            fitted, pad_top, self.height - out_h - pad_top, pad_left,
            self.width - out_w - pad_left, cv2.BORDER_CONSTANT, value=self.fill,
        )  # fmt: skip


class EvalTransform:
    """The eval view, called as ``transform(image=rgb)["image"]`` like the training pipeline.

    Geometry, then one lookup table for normalisation (``A.Normalize``'s own output for
    each of the 256 values) and a transpose: the pixels of an ``A.Compose`` of the same
    steps for less work, which matters because the service pays it on every request.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.geometry = EvalGeometry(preprocessing)
        every_value = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3)
        self.lookup = _normalisation(preprocessing)(image=every_value)["image"]

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        normalised = cv2.LUT(self.geometry(image), self.lookup)
        return {"image": np.ascontiguousarray(normalised.transpose(2, 0, 1))}


def eval_decode_size(preprocessing: Preprocessing) -> tuple[int, int]:
    """The (width, height) a JPEG may be shrunk to while decoding, for the eval transform.

    Decoding at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``) costs a fraction of a full
    decode; at this size the eval region is still no smaller than the input, so the eval
    transform only ever shrinks. Training's val/test loaders (and its image cache),
    ``convtune predict`` and ``evaluate`` and the service all decode this way, so they see
    the same pixels.
    """
    side = math.ceil(max(preprocessing.input_size) / preprocessing.crop_pct)
    return side, side


def _normalisation(preprocessing: Preprocessing) -> A.Normalize:
    return A.Normalize(mean=preprocessing.mean, std=preprocessing.std, max_pixel_value=255.0)
