"""decode_rgb: every input mode becomes the same kind of RGB array, bad input a clear error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from convtune.data.images import ImageDecodeError, decode_rgb


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient_rgb(width: int = 24, height: int = 16) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 128), axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("RGB", "JPEG"),
     ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"),
     ("RGB", "TIFF"), ("F", "TIFF")],
)  # fmt: skip
def test_every_mode_decodes_to_uint8_rgb(mode: str, fmt: str) -> None:
    image = gradient_rgb().convert("L" if mode in ("I;16", "F") else "RGB")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(image).astype(np.float32) / 255.0)
    else:
        image = image.convert(mode)
    pixels = decode_rgb(encode(image, fmt))
    assert pixels.dtype == np.uint8
    assert pixels.shape == (16, 24, 3)


def test_sixteen_bit_and_float_gray_map_onto_the_8_bit_range() -> None:
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    expected = np.repeat(gray[:, :, None], 3, axis=2)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert np.array_equal(decode_rgb(encode(sixteen, "PNG")), expected)
    floats = Image.fromarray(gray.astype(np.float32) / 255.0)
    assert np.array_equal(decode_rgb(encode(floats, "TIFF")), expected)


def test_transparency_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.all(decode_rgb(encode(rgba, "PNG")) == 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert np.all(decode_rgb(encode(palette, "GIF", transparency=0)) == 255)


def test_exif_orientation_is_applied() -> None:
    upright = gradient_rgb(24, 16)
    stored_rotated = upright.rotate(90, expand=True)  # how a camera stores a portrait shot
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated = decode_rgb(encode(stored_rotated, "PNG", exif=exif))
    assert rotated.shape == (16, 24, 3)
    assert np.array_equal(rotated, decode_rgb(encode(upright, "PNG")))


def test_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(decode_rgb(data)[0, 0]) == (255, 0, 0)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
        (png_declaring(50_000, 50_000), "than the limit"),
    ],
)
def test_bad_bytes_raise_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_rgb(data)


def test_truncated_image_is_an_error() -> None:
    data = encode(gradient_rgb(64, 64), "PNG")
    with pytest.raises(ImageDecodeError, match="damaged or truncated"):
        decode_rgb(data[: len(data) // 2])


def test_unreadable_path_names_the_file(tmp_path) -> None:
    with pytest.raises(ImageDecodeError, match=r"missing\.png"):
        decode_rgb(tmp_path / "missing.png")


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(gradient_rgb(100, 100), "PNG")
    assert decode_rgb(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageDecodeError, match="100x100 pixels, more than the limit"):
        decode_rgb(data, max_pixels=9_999)
