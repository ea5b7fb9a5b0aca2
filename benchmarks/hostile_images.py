"""Image files built to cost a decoder far more than their bytes, generated in memory.

Each stays inside the service's byte and pixel limits and is made of structures the format
allows, repeated or sized as no camera or scanner writes them. The decode benchmark
(``benchmarks/decode_bombs.py``) measures them; the tests send them to ``decode_rgb`` and
to a running service (``tests/test_images.py``, ``tests/service/test_serve_bombs.py``).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image


def rle_bmp(width: int = 4_000_000, height: int = 1, *, rle4: bool = False) -> bytes:
    """An RLE8 (or RLE4) BMP of ``width`` x ``height`` pixels in about 1 kB: one
    pixel and an end-of-line code per row, the rest of which Pillow fills one pixel at a
    time in Python."""
    bits, compression, colours = (4, 2, 16) if rle4 else (8, 1, 256)
    palette = b"\x80\x80\x80\x00" * colours
    # per row: one pixel, then end of line; then end of bitmap
    pixels = b"\x01\x00\x00\x00" * height + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835,
        colours, 0,
    )  # fmt: skip
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


def tiff_with_many_strips(strips: int = 200_000, width: int = 8, height: int = 8) -> bytes:
    """A little-endian gray TIFF whose StripOffsets and StripByteCounts hold ``strips``
    SHORT entries each (every strip the same one byte), about 4 bytes per strip."""
    entries = [
        (256, 3, 1, width),  # ImageWidth
        (257, 3, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 3, strips, None),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 3, 1, 1),  # RowsPerStrip
        (279, 3, strips, None),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 2 * strips
    pixel_at = counts_at + 2 * strips
    arrays = {273: (offsets_at, struct.pack(f"<{strips}H", *[pixel_at & 0xFFFF] * strips)),
              279: (counts_at, struct.pack(f"<{strips}H", *[1] * strips))}  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if value is None:
            ifd += struct.pack("<HHII", tag, kind, count, arrays[tag][0])
        else:
            ifd += struct.pack("<HHIHH", tag, kind, count, value, 0)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + arrays[273][1] + arrays[279][1] + b"\x80"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(chunks: list[bytes], width: int = 8, height: int = 8) -> bytes:
    """A valid 8-bit gray PNG with ``chunks`` (whole chunks) between IHDR and IDAT."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * width for _ in range(height)))
    return (
        b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )  # fmt: skip


# 1 kB of deflate that inflates to just under 1 MiB, the most Pillow inflates per chunk
INFLATING_MIB = zlib.compress(bytes((1 << 20) - 1024), 9)


def png_with_icc_bombs(count: int = 1000) -> bytes:
    """A PNG with ``count`` iCCP chunks, each about 1 kB that inflates to 1 MiB (the most
    Pillow inflates per chunk)."""
    return png_with_chunks([png_chunk(b"iCCP", b"icc\x00\x00" + INFLATING_MIB)] * count)


def png_with_text_bombs(count: int = 1000) -> bytes:
    """A PNG with ``count`` zTXt chunks, each about 1 kB that inflates to 1 MiB."""
    return png_with_chunks([png_chunk(b"zTXt", b"note\x00\x00" + INFLATING_MIB)] * count)


def png_with_tiny_chunks(count: int = 80_000) -> bytes:
    """A PNG with ``count`` empty private ancillary chunks (12 bytes each)."""
    return png_with_chunks([png_chunk(b"prVt", b"")] * count)


def _small_jpeg(**options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def jpeg_with_many_markers(count: int = 250_000) -> bytes:
    """A valid JPEG with ``count`` empty APP15 segments (4 bytes each) after SOI."""
    jpeg = _small_jpeg()
    return jpeg[:2] + b"\xff\xef\x00\x02" * count + jpeg[2:]


def _jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG cut into its segments; each scan carries its entropy-coded data along."""
    segments, at = [], 2
    while at < len(data):
        marker = data[at + 1]
        if marker == 0xD9:
            break
        length = struct.unpack(">H", data[at + 2 : at + 4])[0]
        end = at + 2 + length
        if marker == 0xDA:  # the scan's data runs to the next marker that is not RSTn or 0
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
        segments.append(data[at:end])
        at = end
    return segments


def progressive_jpeg_with_many_scans(
    scans: int = 1000, width: int = 2048, height: int = 2048
) -> bytes:
    """A progressive gray JPEG of ``width`` x ``height`` whose last scan is repeated until
    there are ``scans``: each repeat is a few bytes (an end-of-band run over every block)
    that libjpeg still walks over every block of the image."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "JPEG", progressive=True, quality=75)
    segments = _jpeg_segments(buffer.getvalue())
    own_scans = [segment for segment in segments if segment[1] == 0xDA]
    extra = own_scans[-1:] * max(0, scans - len(own_scans))
    return b"\xff\xd8" + b"".join(segments) + b"".join(extra) + b"\xff\xd9"


def gif_with_many_blocks(count: int = 250_000) -> bytes:
    """A valid GIF whose first frame is preceded by a comment extension of ``count``
    one-byte sub-blocks (2 bytes each)."""
    buffer = io.BytesIO()
    Image.new("P", (8, 8), 0).save(buffer, "GIF")
    gif = buffer.getvalue()
    at = gif.index(b"\x2c")  # the first image descriptor (the generator writes no extension)
    comment = b"\x21\xfe" + b"\x01x" * count + b"\x00"
    return gif[:at] + comment + gif[at:]


# name -> a factory of the hostile file, as the benchmark and the tests name them
HOSTILE_IMAGES: dict[str, Callable[[], bytes]] = {
    "bmp-rle8": rle_bmp,
    "bmp-rle4": lambda: rle_bmp(rle4=True),
    "tiff-strips": tiff_with_many_strips,
    "png-iccp": png_with_icc_bombs,
    "png-ztxt": png_with_text_bombs,
    "png-tiny-chunks": png_with_tiny_chunks,
    "jpeg-markers": jpeg_with_many_markers,
    "jpeg-scans": progressive_jpeg_with_many_scans,
    "gif-blocks": gif_with_many_blocks,
}
