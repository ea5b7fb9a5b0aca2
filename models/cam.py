"""Pictures of what the network sees: class activation maps laid over the image, and grids
of a stage's feature maps. numpy and OpenCV only: the service and ``convtune predict``
draw them without torch.

A class map (``OnnxClassifier.explain``) covers the model's input, one cell per position
of the last feature volume. :func:`class_activation_map` stretches it over the input and
undoes the eval view (``data.preprocessing.Placement``: the crop, the resize, the
padding), so each value lands on the pixels of the original image it was computed from;
pixels the view cut away get 0, as the model never saw them.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from convtune.data.preprocessing import Placement

HEAT_COLOURS = cv2.COLORMAP_JET  # the CAM literature's; feature maps use viridis
FEATURE_COLOURS = cv2.COLORMAP_VIRIDIS
MIN_TILE = 48  # a feature-map tile's smallest side in pixels, so a 2x2 map is visible
TILE_GAP = 2


def normalised(values: np.ndarray) -> np.ndarray:
    """``values`` scaled to [0, 1] (min to max); all zeros where they are all the same."""
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros(values.shape, np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def class_activation_map(class_map: np.ndarray, *, geometry: Placement) -> np.ndarray:
    """One class's ``(h, w)`` map → ``(H0, W0)`` float32 in [0, 1] on the original image's
    pixels (``geometry``: where the eval view took them from, ``OnnxClassifier.placement``).

    The map's cells split the input evenly; one affine resampling (bilinear) carries them
    through the resize and the crop.
    """
    heat = normalised(class_map)
    rows, columns = heat.shape
    g = geometry
    scale_x, shift_x = _axis(
        columns, g.input_width, g.fitted_width, g.crop_width, g.pad_left, g.left
    )
    scale_y, shift_y = _axis(rows, g.input_height, g.fitted_height, g.crop_height, g.pad_top, g.top)
    spread = cv2.warpAffine(
        heat,
        np.array([[scale_x, 0.0, shift_x], [0.0, scale_y, shift_y]]),
        (g.image_width, g.image_height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    seen = np.zeros(spread.shape, bool)
    seen[g.top : g.top + g.crop_height, g.left : g.left + g.crop_width] = True
    return np.clip(np.where(seen, spread, 0.0), 0.0, 1.0).astype(np.float32)


def _axis(
    cells: int, input_size: int, fitted: int, crop: int, pad: int, start: int
) -> tuple[float, float]:
    """(scale, shift) taking a map cell's index to the original image's pixel coordinate
    along one axis, pixel centres throughout: cell j's centre lies at ``(j + 0.5) input /
    cells - 0.5`` of the input, ``- pad`` of the fitted region, which the resize stretches
    by ``crop / fitted`` about pixel edges, then ``+ start`` of the image."""
    per_cell, stretch = input_size / cells, crop / fitted
    return per_cell * stretch, start + (0.5 * per_cell - pad) * stretch - 0.5


def overlay(rgb: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """``heat`` (``(H, W)`` in [0, 1]) in colour over the ``(H, W, 3)`` uint8 image: at
    ``opacity`` 0 the image, at 1 the map alone."""
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"a map of {heat.shape} cannot lie over an image of {rgb.shape[:2]}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], not {opacity}")
    colours = coloured(heat, HEAT_COLOURS)
    blended = rgb.astype(np.float32) * (1.0 - opacity) + colours.astype(np.float32) * opacity
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def coloured(values: np.ndarray, colour_map: int) -> np.ndarray:
    """``(H, W)`` values in [0, 1] → ``(H, W, 3)`` uint8 RGB through an OpenCV colour map."""
    levels = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, colour_map), cv2.COLOR_BGR2RGB)


def most_active_channels(stage: np.ndarray, k: int) -> list[int]:
    """The ``k`` channels of a ``(C, h, w)`` volume with the largest mean magnitude, most
    active first (magnitude: a stage may end without a ReLU, so its maps can be negative)."""
    activity = np.abs(stage).reshape(len(stage), -1).mean(axis=1)
    return [int(c) for c in np.argsort(-activity, kind="stable")[: max(0, k)]]


def feature_grid(stage: np.ndarray, channels: list[int]) -> np.ndarray:
    """The ``channels`` of a ``(C, h, w)`` volume as tiles of a near-square grid, row by row,
    each scaled to its own range and enlarged (nearest: one cell, one block of pixels) to at
    least ``MIN_TILE`` pixels; ``(H, W, 3)`` uint8 RGB on black."""
    if not channels:
        raise ValueError("feature_grid needs at least one channel")
    height, width = stage.shape[1:]
    zoom = max(1, math.ceil(MIN_TILE / min(height, width)))
    tile_h, tile_w = height * zoom, width * zoom
    columns = math.ceil(math.sqrt(len(channels)))
    rows = math.ceil(len(channels) / columns)
    grid = np.zeros(
        (rows * (tile_h + TILE_GAP) - TILE_GAP, columns * (tile_w + TILE_GAP) - TILE_GAP, 3),
        np.uint8,
    )
    for index, channel in enumerate(channels):
        tile = cv2.resize(
            normalised(stage[channel]), (tile_w, tile_h), interpolation=cv2.INTER_NEAREST
        )
        top = index // columns * (tile_h + TILE_GAP)
        left = index % columns * (tile_w + TILE_GAP)
        grid[top : top + tile_h, left : left + tile_w] = coloured(tile, FEATURE_COLOURS)
    return grid


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 RGB image as PNG file bytes."""
    encoded, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not encoded:
        raise ValueError(f"OpenCV could not encode an image of shape {rgb.shape} as PNG")
    return buffer.tobytes()
