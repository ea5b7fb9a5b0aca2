"""decode_rgb: every input mode becomes the same kind of RGB array, bad input a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import encode, huge_canvas_png
from PIL import Image

from convtune.data.images import ImageDecodeError, decode_rgb


def gradient_rgb(width: int = 24, height: int = 16) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 128), axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# (mode, format, whether the format loses detail: then pixels are near, not equal)
MODES = [("1", "PNG", False), ("L", "PNG", False), ("LA", "PNG", False), ("P", "GIF", False),
         ("RGB", "JPEG", True), ("RGBA", "PNG", False), ("CMYK", "JPEG", True),
         ("I;16", "PNG", False), ("RGB", "WEBP", True), ("RGB", "BMP", False),
         ("RGB", "TIFF", False), ("F", "TIFF", False)]  # fmt: skip


@pytest.mark.parametrize(("mode", "fmt", "lossy"), MODES)
def test_every_mode_decodes_to_uint8_rgb(mode: str, fmt: str, lossy: bool) -> None:
    """Each mode's pixels arrive as the RGB the image shows: its own values, grays as equal
    channels, every channel in place (a gradient tells red, green and blue apart)."""
    rgb = gradient_rgb()
    gray = np.asarray(rgb.convert("L"))
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(gray.astype(np.float32) / 255.0)
    else:
        image = rgb.convert(mode)
    shown = np.asarray(image.convert("RGB")) if mode not in ("I;16", "F") else gray[..., None]
    pixels = decode_rgb(encode(image, fmt))
    assert pixels.dtype == np.uint8
    assert pixels.shape == (16, 24, 3)
    difference = np.abs(pixels.astype(int) - np.broadcast_to(shown, pixels.shape))
    if lossy:  # compression noise of a few levels; a swapped channel would be off by ~100
        assert difference.mean() < 6 and difference.max() < 48, difference.max()
    else:
        assert difference.max() == 0


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


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
        # Over the 40 M pixel limit, under Pillow's own guard (89 M): the limit refuses it.
        (huge_canvas_png(8000, 8000), "8000x8000 pixels, more than the limit of 40,000,000"),
        # A decompression bomb, over Pillow's guard too: still reported as our limit.
        (huge_canvas_png(50_000, 50_000), "declares more pixels than the limit of 40,000,000"),
    ],
    ids=["empty", "text", "svg", "over-the-limit", "bomb"],
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
