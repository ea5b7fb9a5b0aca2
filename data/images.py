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

    ``max_pixels`` is checked against the header before any pixel is decoded, so a
    small file that declares a huge canvas is refused cheaply. ``draft_size`` lets the
    JPEG decoder downscale by a power of two while decoding when the caller will shrink
    the image anyway.
    """
    name = str(encoded) if isinstance(encoded, (str, Path)) else "upload"
    stream = _read(encoded, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=ACCEPTED_FORMATS)
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


def _read(encoded: bytes | str | Path, name: str) -> io.BytesIO:
    """The encoded image in memory, or an ImageDecodeError if it is empty or unreadable."""
    if isinstance(encoded, bytes):
        if not encoded:
            raise ImageDecodeError("the image is empty (0 bytes)")
        return io.BytesIO(encoded)
    try:
        return io.BytesIO(Path(encoded).read_bytes())
    except OSError as error:
        raise ImageDecodeError(f"cannot read {name}: {error.strerror or error}") from error


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any mode into an ``(H, W, 3)`` uint8 array."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit and 32-bit integer grayscale: map the 16-bit range onto 8 bits.
        pixels = np.asarray(image, dtype=np.float64)
        gray = np.clip(pixels / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(pixels, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(pixels * scale), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
