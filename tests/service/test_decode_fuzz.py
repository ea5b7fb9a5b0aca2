"""Fuzzing ``decode_rgb``, the only code that parses a client's bytes.

Random bytes, random bytes behind a real format's magic number (so they reach that format's
decoder), and random mutations (byte flips, overwrites, insertions, deletions, truncations)
of small valid PNG, JPEG, GIF, WebP, TIFF and BMP files. Whatever comes in, the outcome is
an ``(H, W, 3)`` uint8 array within the pixel limit or an ``ImageDecodeError``: any other
exception would reach the service as a 500.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from convtune.data.images import ImageDecodeError, decode_rgb

# Pillow warns about some damage it tolerates (corrupt EXIF, odd TIFF tags): not errors.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MAX_PIXELS = 1_000_000  # a mutated header that declares more is refused before decoding
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a failure here is never a fluke
)


def _seeds() -> dict[str, bytes]:
    x = np.linspace(0, 255, 12, dtype=np.uint8)
    rgb = Image.fromarray(
        np.stack(np.broadcast_arrays(x[None, :], x[:8, None], np.uint8(99)), axis=2)
    )
    rgba = rgb.convert("RGBA")
    rgba.putalpha(100)
    return {
        "png": encode(rgb, "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-16bit": encode(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "png-palette": encode(rgb.convert("P"), "PNG", transparency=3),
        "jpeg": encode(rgb, "JPEG", quality=80),
        "jpeg-progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "gif": encode(rgb.convert("P"), "GIF", transparency=0),
        "webp": encode(rgb, "WEBP", quality=80),
        "webp-lossless-alpha": encode(rgba, "WEBP", lossless=True),
        "tiff": encode(rgb, "TIFF"),
        "tiff-lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-float": encode(rgb.convert("F"), "TIFF"),
        "bmp": encode(rgb, "BMP"),
    }


SEEDS = _seeds()
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ",
         b"II*\0", b"MM\0*", b"BM"]  # fmt: skip


def assert_rgb_or_decode_error(data: bytes) -> None:
    try:
        pixels = decode_rgb(data, max_pixels=MAX_PIXELS)
    except ImageDecodeError:
        return
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    height, width = pixels.shape[:2]
    assert 1 <= height * width <= MAX_PIXELS and height >= 1 and width >= 1


@pytest.mark.parametrize("name", list(SEEDS))
def test_seeds_decode(name: str) -> None:
    """The mutation seeds are valid images: mutations start from real decoder input."""
    assert decode_rgb(SEEDS[name]).shape[2] == 3


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    assert_rgb_or_decode_error(data)


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=2048))
def test_random_bytes_behind_a_magic_number(magic: bytes, rest: bytes) -> None:
    assert_rgb_or_decode_error(magic + rest)


EDITS = ["flip", "flip", "flip", "overwrite", "insert", "delete", "truncate"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with 1 to 6 random edits; mostly byte flips, which keep the file's
    structure and so reach deeper into the decoders than cuts do."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(EDITS))
        if edit == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


@settings(FUZZ, max_examples=1000)
@given(mutated())
def test_mutated_images(data: bytes) -> None:
    assert_rgb_or_decode_error(data)
