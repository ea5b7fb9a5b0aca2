"""``POST /explain``'s answer: the prediction, the class activation map over the image and
each stage's feature maps as thumbnails, drawn with numpy and OpenCV (``models.cam``).

Only this route runs the artifact's explaining graph (``OnnxClassifier.explain``, its
session made on the first call); ``/predict``'s graph computes the logits alone. The
answer is JSON with PNGs in base64, or the overlay alone as ``image/png`` for a client that
asks for it (Accept).
"""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from starlette.responses import Response

from convtune.models.artifact import FeatureVolume
from convtune.models.cam import (
    FEATURE_COLOURS,
    HEAT_COLOURS,
    class_activation_map,
    coloured,
    most_active_channels,
    normalised,
    overlay,
    png_bytes,
)
from convtune.models.inference import OnnxClassifier, format_prediction
from convtune.service.http import BadRequest, RequestError

CLASS_FIELD = "class"  # the form field naming the class to map (default: the predicted one)
OVERLAY_OPACITY = 0.5  # the map's weight in the overlay PNG
# The page lays the map over the image itself and stretches it to the image's box: a map
# this size on its longer side looks the same as one of the image's own size (maps are
# smooth) and keeps the answer small for a large photo.
HEATMAP_SIDE = 512
THUMBNAIL_SIDE = 32  # a feature-map thumbnail's longer side at most (smaller maps as they are)
THUMBNAIL_COLUMNS = 16  # thumbnails per row of a stage's sheet
PNG_TYPE = "image/png"
NO_CLASS_MAPS = (
    "no class activation map: the model's head is not a single linear layer on the "
    "averaged features, so the service cannot compute one exactly (`convtune explain` "
    "draws Grad-CAM for it)"
)


class NotExplainable(RequestError):
    """The served model was exported without the outputs ``/explain`` shows."""

    status = 409


@dataclass(frozen=True)
class ImageExplanation:
    """One image explained: its class probabilities, the class mapped, the map on the
    image's pixels (None: the head gives none) and each stage's ``(C, h, w)`` volume."""

    probabilities: np.ndarray
    class_name: str
    heat: np.ndarray | None
    stages: dict[str, np.ndarray]


def check_explainable(classifier: OnnxClassifier, model_tag: str) -> None:
    """Refuse /explain (409) for a model exported without the outputs it shows."""
    if classifier.manifest.explain is None:
        raise NotExplainable(
            f"the served model {model_tag} was exported without the feature maps /explain "
            "shows: re-export its run with this convtune (`convtune export RUN_DIR "
            "--name NAME`) and serve that model"
        )


def checked_class(text: str | None, classes: tuple[str, ...]) -> str | None:
    """The ``class`` field: None (the predicted class), or one of the model's classes, as
    text or as a JSON string (how BentoML's clients send every argument that is not a file).
    """
    if text is None or text in classes:
        return text
    with contextlib.suppress(ValueError):
        decoded = json.loads(text)
        if isinstance(decoded, str) and decoded in classes:
            return decoded
    raise BadRequest(f"{CLASS_FIELD} {text[:80]!r} is not one of the model's classes {classes}")


def wants_png(accept: str) -> bool:
    """Whether an Accept header prefers the overlay PNG to JSON (JSON on a tie, for ``*/*``
    or with no header)."""
    quality = {}
    for part in accept.split(","):
        media_type, *parameters = (item.strip() for item in part.split(";"))
        q = next((p[2:] for p in parameters if p.startswith("q=")), "1")
        try:
            quality[media_type.lower()] = float(q)
        except ValueError:
            quality[media_type.lower()] = 0.0
    return quality.get(PNG_TYPE, 0.0) > quality.get("application/json", 0.0)


def explain_image(
    classifier: OnnxClassifier, rgb: np.ndarray, *, class_name: str | None
) -> ImageExplanation:
    """Run the explaining graph on one decoded image."""
    explanation = classifier.explain(classifier.preprocess(rgb)[np.newaxis])
    [probabilities] = explanation.probabilities
    classes = classifier.classes
    name = classes[int(np.argmax(probabilities))] if class_name is None else class_name
    heat = None
    if explanation.class_maps is not None:
        class_map = explanation.class_maps[0, classes.index(name)]
        heat = class_activation_map(class_map, geometry=classifier.placement(rgb))
    stages = {output: volume[0] for output, volume in explanation.stages.items()}
    return ImageExplanation(probabilities, name, heat, stages)


def explanation(
    classifier: OnnxClassifier, rgb: np.ndarray, *, class_name: str | None, top_k: int, png: bool
) -> dict[str, Any] | Response:
    """``/explain``'s answer for one decoded image: the overlay PNG, or else the JSON."""
    explained = explain_image(classifier, rgb, class_name=class_name)
    if png:
        return overlay_png(rgb, explained)
    return explanation_json(classifier, rgb, explained, top_k=top_k)


def overlay_png(rgb: np.ndarray, explained: ImageExplanation) -> Response:
    """The ``image/png`` answer: the map over the image, the image's size."""
    if explained.heat is None:
        raise NotExplainable(NO_CLASS_MAPS)
    return Response(png_bytes(overlay(rgb, explained.heat, OVERLAY_OPACITY)), media_type=PNG_TYPE)


def explanation_json(
    classifier: OnnxClassifier, rgb: np.ndarray, explained: ImageExplanation, *, top_k: int
) -> dict[str, Any]:
    """The JSON answer: ``/predict``'s fields, the class mapped, its ``overlay`` (the
    image's size) and ``heatmap`` (the map alone, for a page to lay over the image), and
    ``stages``: each stage's feature maps as one sheet of thumbnails."""
    answer = format_prediction(explained.probabilities, classifier.classes, top_k)
    answer[CLASS_FIELD] = explained.class_name
    if explained.heat is None:
        answer.update(overlay=None, heatmap=None, map_unavailable=NO_CLASS_MAPS)
    else:
        answer["overlay"] = _base64_png(overlay(rgb, explained.heat, OVERLAY_OPACITY))
        answer["heatmap"] = _base64_png(coloured(_fit(explained.heat, HEATMAP_SIDE), HEAT_COLOURS))
    volumes = classifier.manifest.explain.stages
    answer["stages"] = [
        _stage_json(volume, explained.stages[volume.output])
        for volume in volumes
        if volume.output is not None
    ]
    return answer


def _stage_json(volume: FeatureVolume, maps: np.ndarray) -> dict[str, Any]:
    order = most_active_channels(maps, len(maps))
    sheet, (tile_height, tile_width) = thumbnail_sheet(maps, order)
    return {
        "name": volume.output,
        "channels": volume.channels,
        "height": volume.height,
        "width": volume.width,
        "stride": volume.stride,
        "tiles": {
            "png": _base64_png(sheet),
            "columns": THUMBNAIL_COLUMNS,
            "tile_width": tile_width,
            "tile_height": tile_height,
            "channels": order,
        },
    }


def thumbnail_sheet(maps: np.ndarray, order: list[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The ``order``ed channels of a ``(C, h, w)`` volume as thumbnails, ``THUMBNAIL_COLUMNS``
    a row, each scaled to its own range; the sheet (RGB) and one thumbnail's (height, width).
    """
    tiles = [_fit(normalised(maps[channel]), THUMBNAIL_SIDE) for channel in order]
    height, width = tiles[0].shape
    rows = -(-len(tiles) // THUMBNAIL_COLUMNS)
    sheet = np.zeros((rows * height, THUMBNAIL_COLUMNS * width), np.float32)
    for index, tile in enumerate(tiles):
        top, left = index // THUMBNAIL_COLUMNS * height, index % THUMBNAIL_COLUMNS * width
        sheet[top : top + height, left : left + width] = tile
    return coloured(sheet, FEATURE_COLOURS), (height, width)


def _fit(values: np.ndarray, side: int) -> np.ndarray:
    """``values`` shrunk (area average) to at most ``side`` on its longer side."""
    height, width = values.shape
    scale = side / max(height, width)
    if scale >= 1:
        return values
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(values, size, interpolation=cv2.INTER_AREA)


def _base64_png(rgb: np.ndarray) -> str:
    return base64.b64encode(png_bytes(rgb)).decode("ascii")
