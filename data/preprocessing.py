"""How pixels become the encoder's input: the eval view, the one every prediction sees.

A :class:`Preprocessing` (resolved by ``models`` from the encoder's own pretrained config and
stored in the artifact's manifest) says the input size, normalisation, interpolation and
crop; :class:`EvalTransform` applies it. Validation, the test report, ``convtune predict``
and ``evaluate``, and the service all run this one transform, so training and serving
cannot drift apart. numpy and OpenCV only: the service imports it, and albumentations
would load torch wherever torch is installed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

INTERPOLATIONS = {
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
        # A manifest's values come here unchecked: refuse what no encoder config gives.
        if len(self.input_size) != 2 or not all(map(_positive_whole, self.input_size)):
            raise ValueError(
                f"input_size must be (height, width), positive whole numbers, not {self.input_size}"
            )
        for name, values, low in (("mean", self.mean, -math.inf), ("std", self.std, 0.0)):
            if len(values) != 3 or not all(_finite_above(value, low) for value in values):
                above = "" if low == -math.inf else f" > {low:g}"
                raise ValueError(f"{name} must be 3 finite numbers{above}, not {values}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; one of {sorted(INTERPOLATIONS)}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode {self.crop_mode!r}; one of {CROP_MODES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; a key that is absent keeps the field's default."""
        known = {field.name for field in fields(cls)}
        kept = {name: value for name, value in values.items() if name in known}
        for name in ("input_size", "mean", "std"):
            kept[name] = tuple(kept[name])
        return cls(**kept)


def _positive_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _finite_above(value: Any, low: float) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value) and value > low


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
    flag = cv2.INTER_AREA if shrinking else INTERPOLATIONS[interpolation]
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
        place = self.placement(*image.shape[:2])
        fitted = resize(
            image[
                place.top : place.top + place.crop_height,
                place.left : place.left + place.crop_width,
            ],
            (place.fitted_width, place.fitted_height),
            interpolation=self.interpolation,
        )
        if (place.fitted_height, place.fitted_width) == (self.height, self.width):
            return fitted
        return cv2.copyMakeBorder(
            fitted, place.pad_top, self.height - place.fitted_height - place.pad_top,
            place.pad_left, self.width - place.fitted_width - place.pad_left,
            cv2.BORDER_CONSTANT, value=self.fill,
        )  # fmt: skip

    def placement(self, height: int, width: int) -> Placement:
        """Where an image of ``height`` x ``width`` goes: the region cut from it, and where
        that region lands in the input once resized."""
        if self.mode == "border":
            scale = min(self.height / height, self.width / width) / self.crop_pct
            crop_h, crop_w = (
                min(height, round(self.height / scale)),
                min(width, round(self.width / scale)),
            )
            out_h = min(self.height, max(1, round(crop_h * scale)))
            out_w = min(self.width, max(1, round(crop_w * scale)))
        else:
            crop_h, crop_w = self._crop_size(height, width)
            out_h, out_w = self.height, self.width
        return Placement(
            image_height=height, image_width=width,
            top=(height - crop_h) // 2, left=(width - crop_w) // 2,
            crop_height=crop_h, crop_width=crop_w,
            pad_top=(self.height - out_h) // 2, pad_left=(self.width - out_w) // 2,
            fitted_height=out_h, fitted_width=out_w,
            input_height=self.height, input_width=self.width,
        )  # fmt: skip

    def _crop_size(self, h: int, w: int) -> tuple[int, int]:
        """The centre region ``center`` and ``squash`` keep, before resizing to the input."""
        if self.mode == "center" and self.height == self.width:
            side = max(1, round(min(h, w) * self.crop_pct))
            return side, side
        if self.mode == "center":
            # Shorter side to scale, keeping aspect: the crop spans size/scale of each side.
            scale = max(self.height / h, self.width / w) / self.crop_pct
            return min(h, max(1, round(self.height / scale))), min(
                w, max(1, round(self.width / scale))
            )
        return max(1, round(h * self.crop_pct)), max(1, round(w * self.crop_pct))


@dataclass(frozen=True, kw_only=True)
class Placement:
    """How the eval view placed one image: the region ``top``, ``left``, ``crop_height`` x
    ``crop_width`` of the ``image_height`` x ``image_width`` image, resized to
    ``fitted_height`` x ``fitted_width``, sits at ``pad_top``, ``pad_left`` in the
    ``input_height`` x ``input_width`` input (padded around it with the mean colour in
    ``border`` mode; filling it otherwise). What maps the model's view back onto the image."""

    image_height: int
    image_width: int
    top: int
    left: int
    crop_height: int
    crop_width: int
    pad_top: int
    pad_left: int
    fitted_height: int
    fitted_width: int
    input_height: int
    input_width: int


class EvalTransform:
    """The eval view, called as ``transform(image=rgb)["image"]`` like the training pipeline.

    Geometry, then one lookup table for normalisation and a transpose: the pixels of an
    albumentations pipeline of the same steps for less work, which matters because the
    service pays it on every request.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.geometry = EvalGeometry(preprocessing)
        self.lookup = normalisation_lookup(preprocessing)

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


def normalisation_lookup(preprocessing: Preprocessing) -> np.ndarray:
    """(1, 256, 3) float32: each uint8 value of each channel normalised, computed as
    albumentations' ``Normalize`` computes it (``(value - 255 mean) / (255 std)``), so the
    training pipeline and this table give the same numbers."""
    mean = np.asarray(preprocessing.mean, dtype=np.float32) * 255.0
    reciprocal = np.reciprocal(np.asarray(preprocessing.std, dtype=np.float32) * 255.0)
    values = np.arange(256, dtype=np.float32)[:, np.newaxis]
    return ((values - mean) * reciprocal).astype(np.float32)[np.newaxis]
