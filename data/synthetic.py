"""Small generated datasets with real, learnable tasks, for the test suite and offline demos.

Shapes: which shape is in the picture. Each image has one light circle, square or triangle
of random size, position and colour on a dark random-colour background, with noise.

Border: is there a small bright notch at the edge of the picture? The evidence sits where
an eval view that crops the centre (timm's default) never looks.
"""

from __future__ import annotations

from collections.abc import Callable
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


def write_class_folders(
    root: str | Path,
    classes: tuple[str, ...],
    draw: Callable[[str, np.random.Generator], Image.Image],
    *,
    per_class: int,
    seed: int,
) -> Path:
    """Write ``root/<class>/<n>.png``, each image ``draw(class, rng)``; return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            draw(name, rng).save(root / name / f"{n:04d}.png")
    return root


def make_shapes_dataset(
    root: str | Path, *, per_class: int = 30, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/<shape>/<n>.png`` and return ``root``."""
    return write_class_folders(
        root, SHAPES, lambda shape, rng: draw_shape(shape, rng, size), per_class=per_class,
        seed=seed,
    )  # fmt: skip


# The border task: is there a small bright notch at the image's edge? Its depth stays inside
# the outer 6.25 % of each side that timm's default eval view (crop_pct 0.875) cuts away,
# so only a whole-image view (crop_pct 1.0) keeps the evidence.
BORDER_CLASSES = ("clean", "notched")
NOTCH_DEPTH = 0.05  # of the side


def draw_photo_background(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A dark gradient with a mid-tone blob kept away from the border, and noise: content
    everywhere, but nothing at the edge that looks like the notch."""
    start, end = rng.integers(0, 80, (2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    pixels = np.broadcast_to(start + (end - start) * ramp, (size, size, 3))
    image = Image.fromarray(pixels.astype(np.uint8))
    if rng.random() < 0.5:  # a horizontal gradient as often as a vertical one
        image = image.transpose(Image.Transpose.ROTATE_90)
    radius = rng.uniform(0.1, 0.25) * size
    cx, cy = rng.uniform(0.3 * size, 0.7 * size, 2)
    colour = tuple(int(v) for v in rng.integers(90, 160, 3))
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], colour)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def add_border_notch(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A copy of ``image`` with a bright notch on a random side, touching the edge."""
    size = image.width
    depth = max(1, int(NOTCH_DEPTH * size))
    length = max(2, round(rng.uniform(0.3, 0.45) * size))
    offset = int(rng.integers(depth, size - depth - length + 1))  # clear of the corners
    colour = tuple(int(v) for v in rng.integers(225, 256, 3))
    # Drawn on the top side of the image turned by 0-3 quarter turns, then turned back.
    quarter_turns = int(rng.integers(4))
    notched = image.rotate(90 * quarter_turns)
    ImageDraw.Draw(notched).rectangle((offset, 0, offset + length - 1, depth - 1), fill=colour)
    return notched.rotate(-90 * quarter_turns)


def make_border_dataset(
    root: str | Path, *, per_class: int = 60, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/<clean|notched>/<n>.png`` and return ``root``."""

    def draw(name: str, rng: np.random.Generator) -> Image.Image:
        image = draw_photo_background(rng, size)
        return add_border_notch(image, rng) if name == "notched" else image

    return write_class_folders(root, BORDER_CLASSES, draw, per_class=per_class, seed=seed)
