"""Decode image files and uploads into 3-channel uint8 RGB arrays.

Training and the service both call :func:`decode_rgb`, so every mode conversion
(grayscale, palette, alpha, 16-bit, CMYK) and the EXIF orientation are applied the
same way in both places.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from convtune.data.image_rules import structure_problem

Image.init()  # register every plugin now, so ACCEPTED_FORMATS can all be named below
# Formats a client or a dataset may use. Restricting Pillow's plugins keeps exotic
# decoders (and their bugs) out of the attack surface.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes MPO
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 40_000_000
# Transparent pixels are composited onto white: drawings and scans on a transparent
# background are meant to be seen on paper, and a fixed choice keeps training and
# serving identical.
_ALPHA_BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The bytes are not an image this project can read; the message says why."""


def decode_rgb(
    encoded: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode an image file (its path) or an upload (its bytes) into an ``(H, W, 3)`` uint8
    RGB array.

    Structures no camera or scanner writes, which would cost far more to decode than
    their bytes (RLE BMP, absurd strip, chunk, marker or scan counts), are refused before
    Pillow sees the file (:mod:`~convtune.data.image_rules` states the rules).
    ``max_pixels`` is checked against the header before any pixel is decoded, so a
    small file that declares a huge canvas is refused cheaply. ``draft_size`` lets the
    JPEG decoder downscale by a power of two while decoding when the caller will shrink
    the image anyway.
    """
    name = str(encoded) if isinstance(encoded, (str, Path)) else "upload"
    data = _read(encoded, name)
    problem = structure_problem(data, max_pixels=max_pixels)
    if problem is not None:
        raise ImageDecodeError(f"{name} {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"{name} is {width}x{height} pixels, more than the limit of {max_pixels:,} pixels"
            )
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            image.draft("RGB", draft_size)
        image.seek(0)  # first frame of animated GIF/WebP/TIFF
        # In place: otherwise Pillow copies the whole image even when there is nothing to
        # rotate (docs/benchmarks.md, "Decoding in place").
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb_array(image)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(
            f"{name} is not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})"
        ) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(
            f"{name} declares more pixels than the limit of {max_pixels:,} pixels"
        ) from error
    # Pillow's decoders raise many types on damaged input (OSError, SyntaxError,
    # struct.error, IndexError, ...); to a caller they all mean the same thing.
    except Exception as error:
        raise ImageDecodeError(f"{name} is damaged or truncated: {error}") from error


def declared_pixels(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The pixels the image in ``data`` declares in its header, without decoding it; 0 for
    bytes that :func:`decode_rgb` will refuse anyway (its structure rules, no image, more
    than ``max_pixels``)."""
    if not data or structure_problem(data, max_pixels=max_pixels) is not None:
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS).size
    except Exception:  # any header Pillow cannot read: decode_rgb says why
        return 0
    return width * height if width * height <= max_pixels else 0


def _read(encoded: bytes | str | Path, name: str) -> bytes:
    """The encoded image in memory, or an ImageDecodeError if it is empty or unreadable."""
    if isinstance(encoded, bytes):
        if not encoded:
            raise ImageDecodeError("the image is empty (0 bytes)")
        return encoded
    try:
        return Path(encoded).read_bytes()
    except OSError as error:
        raise ImageDecodeError(f"cannot read {name}: {error.strerror or error}") from error


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any mode into an ``(H, W, 3)`` uint8 array.

    16- and 32-bit integer gray maps 0..65535 onto 0..255. 32-bit float gray (mode ``F``,
    float TIFFs) is read as 0..1, the convention of float images, whatever the values:
    below 0 is black, above 1 white, NaN black. Transparency, an alpha channel or a colour
    key (a PNG's or GIF's ``tRNS``: ``transparency`` in ``image.info``), is composited onto
    white.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_gray_to_rgb(image)
    if "transparency" in image.info and image.mode in ("1", "L", "P", "RGB"):
        image = image.convert("RGBA")  # the colour key becomes alpha 0
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _wide_gray_to_rgb(image: Image.Image) -> np.ndarray:
    """16/32-bit integer or float gray → RGB, a colour key composited onto white."""
    pixels = np.asarray(image, dtype=np.float64)
    scaled = np.nan_to_num(pixels * 255.0, nan=0.0) if image.mode == "F" else pixels / 257.0
    gray = np.clip(scaled, 0, 255).round().astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    key = image.info.get("transparency")
    if isinstance(key, int):  # 16-bit gray PNG with a tRNS colour key
        rgb[pixels == key] = _ALPHA_BACKGROUND
    return rgb
