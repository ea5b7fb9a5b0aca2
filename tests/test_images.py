"""decode_rgb: every input mode becomes the same kind of RGB array, bad input a clear error."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from helpers import encode, huge_canvas_png
from PIL import Image

from convtune.benchmarks.hostile_images import (
    HOSTILE_IMAGES,
    jpeg_with_many_markers,
    png_chunk,
    png_with_chunks,
    progressive_jpeg_with_many_scans,
    tiff_with_many_strips,
)
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


# What each hostile file's refusal says: the rule it breaks (data/image_rules.py).
HOSTILE_REASONS = {
    "bmp-rle8": "upload is a BMP with RLE8 compression, which is refused",
    "bmp-rle4": "upload is a BMP with RLE4 compression, which is refused",
    "tiff-strips": "upload is a TIFF whose StripOffsets lists 200,000 strips or tiles for 64 "
    "pixels in 8 rows, more than the 16 allowed",
    "png-iccp": "upload is a PNG with more than one iCCP (colour profile) chunk",
    "png-ztxt": "upload is a PNG with more than 16 compressed text chunks (zTXt, iTXt)",
    "png-tiny-chunks": "upload is a PNG of more than 1,193 chunks (allowed: 256 plus one per "
    "1024 bytes of file)",
    "jpeg-markers": "upload is a JPEG with more than 1,024 segments (markers) before its image",
    "jpeg-scans": "upload is a JPEG of 1,000 scans, more than the 64 allowed",
    "gif-blocks": "upload is a GIF with more than 4,096 extension blocks before its first frame",
}


@pytest.mark.parametrize("name", list(HOSTILE_IMAGES))
def test_hostile_structures_are_refused_before_decoding(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file costs 0.08 to 4 s of CPU in Pillow or libjpeg (docs/benchmarks.md,
    "Hostile images"); the structural rules refuse it before Pillow opens it."""
    data = HOSTILE_IMAGES[name]()
    opened = []
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(args))
    with pytest.raises(ImageDecodeError) as refused:
        decode_rgb(data)
    assert str(refused.value).startswith(HOSTILE_REASONS[name])
    assert opened == []


def test_the_rules_allow_what_real_writers_produce() -> None:
    """Right at each limit the image still decodes; one more is refused."""
    text = png_chunk(b"zTXt", b"note\0\0" + zlib.compress(b"hello"))
    itxt = png_chunk(b"iTXt", b"Comment\0\x01\0\0\0" + zlib.compress(b"hello"))
    icc = png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"profile"))
    at_limit = png_with_chunks([icc, itxt, *[text] * 15])
    assert decode_rgb(at_limit).shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError, match="more than 16 compressed text chunks"):
        decode_rgb(png_with_chunks([icc, itxt, *[text] * 16]))
    with pytest.raises(ImageDecodeError, match="more than one iCCP"):
        decode_rgb(png_with_chunks([icc, icc]))
    assert decode_rgb(progressive_jpeg_with_many_scans(64, 32, 32)).shape == (32, 32, 3)
    with pytest.raises(ImageDecodeError, match="JPEG of 65 scans, more than the 64"):
        decode_rgb(progressive_jpeg_with_many_scans(65, 32, 32))
    assert decode_rgb(jpeg_with_many_markers(1000)).shape == (64, 64, 3)
    palette_bmp = encode(gradient_rgb().convert("P"), "BMP")  # uncompressed: allowed
    assert np.array_equal(
        decode_rgb(palette_bmp), np.asarray(gradient_rgb().convert("P").convert("RGB"))
    )


def test_tiffs_of_many_strips_from_real_writers_decode() -> None:
    """libtiff and Pillow write strips of a few KiB: one per row at small widths."""
    image = gradient_rgb(300, 200).convert("L")
    one_row_per_strip = encode(image, "TIFF", strip_size=300)  # 200 strips of one row
    assert np.array_equal(decode_rgb(one_row_per_strip), decode_rgb(encode(image, "PNG")))
    with pytest.raises(ImageDecodeError, match="lists 17 strips or tiles for 64 pixels"):
        decode_rgb(tiff_with_many_strips(17))
    # Pillow sets up every strip before the pixel limit is checked: a header declaring a
    # huge canvas does not buy more strips than the limit's pixels would.
    over_the_limit = tiff_with_many_strips(2000, width=65_535, height=8)  # 2,047 by its size
    with pytest.raises(ImageDecodeError, match="lists 2,000 strips or tiles for 524,280 pixels"):
        decode_rgb(over_the_limit, max_pixels=4096)


def test_camera_like_jpeg_with_exif_icc_and_thumbnail_decodes() -> None:
    """A JPEG with EXIF (holding a JPEG thumbnail, whose scan is not the image's), an ICC
    profile and XMP: its markers and scans stay within the rules."""
    thumbnail = encode(gradient_rgb(16, 16), "JPEG", progressive=True)
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    app1 = b"Exif\0\0" + exif.tobytes() + thumbnail
    photo = encode(gradient_rgb(64, 48), "JPEG", progressive=True, icc_profile=bytes(5000))
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"
    segments = [b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body for body in (app1, xmp)]
    camera = photo[:2] + b"".join(segments) + photo[2:]
    assert np.array_equal(decode_rgb(camera), decode_rgb(photo))


def test_png_colour_key_is_composited_onto_white() -> None:
    """A tRNS colour key makes every pixel of that colour transparent, like alpha 0."""
    pixels = np.zeros((2, 2, 3), np.uint8)
    pixels[0] = (10, 20, 30)  # the key
    pixels[1] = (200, 0, 0)
    rgb = decode_rgb(encode(Image.fromarray(pixels), "PNG", transparency=(10, 20, 30)))
    assert rgb[0].tolist() == [[255, 255, 255]] * 2 and rgb[1].tolist() == [[200, 0, 0]] * 2
    gray = np.array([[7, 100]], np.uint8)
    keyed = decode_rgb(encode(Image.fromarray(gray), "PNG", transparency=7))
    assert keyed[0].tolist() == [[255, 255, 255], [100, 100, 100]]
    sixteen = np.array([[1000, 25700]], np.uint16)
    keyed16 = decode_rgb(encode(Image.fromarray(sixteen), "PNG", transparency=1000))
    assert keyed16[0].tolist() == [[255, 255, 255], [100, 100, 100]]


def test_float_gray_is_read_as_0_to_1_whatever_its_values() -> None:
    """Mode F: 0..1 onto 0..255 by a rule, not by a guess from the pixels' range."""
    values = np.array([[0.0, 0.5, 1.0, 2.0, 200.0, -1.0, np.nan, np.inf]], np.float32)
    rgb = decode_rgb(encode(Image.fromarray(values), "TIFF"))
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 255, 255, 0, 0, 255]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
