"""A small generated dataset with a real, learnable task: which shape is in the picture.

Used by the test suite and the offline demo. Each image has one light circle, square
or triangle of random size, position and colour on a dark random-colour background,
with noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    # Dark background, light shape: colours vary, but the outline is always visible.
    background = tuple(int(v) for v in rng.integers(0, 96, 3))
    colour = tuple(int(v) for v in rng.integers(160, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
            fill=colour,
        )
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def make_shapes_dataset(
    root: str | Path, *, per_class: int = 30, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/<shape>/<n>.png`` and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            draw_shape(shape, rng, size).save(root / shape / f"{n:04d}.png")
    return root
