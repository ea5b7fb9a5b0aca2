"""Structures no camera or scanner writes, found in an image's bytes before any decoder runs.

Pillow parses some structures in pure Python, one loop turn per marker, chunk, strip or
pixel, and libjpeg walks every block of the image once per progressive scan. A file made of
such structures, repeated, costs far more CPU and memory than its bytes or its pixel count
suggest. :func:`structure_problem` walks the container (headers, chunk and segment lengths,
never the compressed data) and names the first rule a file breaks; each walk stops as soon
as a count passes its rule, so the scan itself is bounded. The rules are generous to every
writer we know of (libjpeg, libpng, libtiff, giflib, cameras, scanners, phones):

- BMP: no RLE4/RLE8 compression (Pillow expands it in Python, pixel by pixel).
- TIFF: at most 1,024 tags in the first directory (the one decoded); strips or tiles at
  most one per 256 pixels (a tile is at least 16x16), or one per row and sample up to
  4,096, or 16, whichever allows more (libtiff writes strips of about 8 KiB).
- PNG: at most one iCCP chunk (the PNG spec's rule), at most 16 compressed text chunks
  (zTXt, compressed iTXt; each inflates to at most 1 MiB in Pillow), and at most
  256 chunks plus one per KiB of file.
- JPEG: at most 1,024 segments and 1,024 stray or fill bytes before the first scan; at
  most 64 scans in the image (libjpeg's progressive files have 6 to 18).
- GIF: at most 4,096 extension sub-blocks before the first frame (the only one decoded).
"""

from __future__ import annotations

import struct

BMP_RLE_COMPRESSIONS = {1: "RLE8", 2: "RLE4"}
TIFF_PIXELS_PER_STRIP = 256  # the smallest TIFF tile is 16x16
TIFF_FREE_STRIPS = 16
TIFF_MOST_STRIPS_BY_ROW = 4096
TIFF_MAX_TAGS = 1024
TIFF_STRIP_TAGS = {273: "StripOffsets", 279: "StripByteCounts", 324: "TileOffsets",
                   325: "TileByteCounts"}  # fmt: skip
PNG_MAX_ICC_CHUNKS = 1
PNG_MAX_COMPRESSED_TEXT_CHUNKS = 16
PNG_FREE_CHUNKS = 256
PNG_BYTES_PER_CHUNK = 1024
JPEG_MAX_SEGMENTS_BEFORE_SCAN = 1024
JPEG_MAX_STRAY_BYTES = 1024
JPEG_MAX_SCANS = 64
_JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI
GIF_MAX_SUB_BLOCKS = 4096

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = {b"II*\0": ("<", False), b"MM\0*": (">", False), b"II+\0": ("<", True),
               b"MM\0+": (">", True)}  # fmt: skip


def structure_problem(data: bytes, *, max_pixels: int) -> str | None:
    """Which rule (module docstring) the image in ``data`` breaks, as the end of a sentence
    about the file; None when it breaks none or is not one of these formats (Pillow then
    judges it). ``max_pixels``: the pixel limit that the caller checks after Pillow has
    read the header, which for TIFF already sets up every strip; so strips are allowed
    for at most that many pixels, whatever the header declares."""
    try:
        if data.startswith(b"BM"):
            return _bmp_problem(data)
        if data[:4] in _TIFF_MAGIC:
            return _tiff_problem(data, *_TIFF_MAGIC[data[:4]], max_pixels=max_pixels)
        if data.startswith(PNG_SIGNATURE):
            return _png_problem(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_problem(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif_problem(data)
    except (struct.error, IndexError):
        return None  # cut short: the decoder reports the damage
    return None


def _bmp_problem(data: bytes) -> str | None:
    header_size, compression = struct.unpack_from("<I12xI", data, 14)
    if header_size >= 40 and compression in BMP_RLE_COMPRESSIONS:
        return (
            f"is a BMP with {BMP_RLE_COMPRESSIONS[compression]} compression, which is refused "
            "(no camera or scanner writes it, and it decodes slowly): save it as PNG"
        )
    return None


def _tiff_problem(data: bytes, order: str, big: bool, *, max_pixels: int) -> str | None:
    """Tag, strip and tile counts of the first directory (the only one decoded)."""
    count_format, entry_format, offset_format = ("Q", "HHQ", "Q") if big else ("H", "HHI", "I")
    directory = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
    entries = struct.unpack_from(order + count_format, data, directory)[0]
    if entries > TIFF_MAX_TAGS:
        return (
            f"is a TIFF with {entries:,} tags in its first directory, more than {TIFF_MAX_TAGS:,}"
        )
    entry_size = 20 if big else 12
    first = directory + struct.calcsize(count_format)
    counts, fields = {}, {}
    for at in range(first, first + entries * entry_size, entry_size):
        tag, kind, count = struct.unpack_from(order + entry_format, data, at)
        value_at = at + struct.calcsize(entry_format)
        if tag in TIFF_STRIP_TAGS:
            counts[tag] = count
        elif tag in (256, 257, 277):  # ImageWidth, ImageLength, SamplesPerPixel
            value_format = order + ("H" if kind == 3 else "I")  # SHORT or LONG
            fields[tag] = struct.unpack_from(value_format, data, value_at)[0]
    rows, samples = fields.get(257, 0), fields.get(277, 1)
    pixels = fields.get(256, 0) * rows
    most = max(
        TIFF_FREE_STRIPS,
        min(rows * samples, TIFF_MOST_STRIPS_BY_ROW),
        min(pixels, max_pixels) // TIFF_PIXELS_PER_STRIP,
    )
    for tag, count in counts.items():
        if count > most:
            return (
                f"is a TIFF whose {TIFF_STRIP_TAGS[tag]} lists {count:,} strips or tiles for "
                f"{pixels:,} pixels in {rows:,} rows, more than the {most:,} allowed"
            )
    return None


def _png_problem(data: bytes) -> str | None:
    """Chunk counts up to where Pillow stops reading: IEND, or the second frame's fcTL."""
    most_chunks = PNG_FREE_CHUNKS + len(data) // PNG_BYTES_PER_CHUNK
    at, chunks, icc, compressed_text, image_data_seen = len(PNG_SIGNATURE), 0, 0, 0, False
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        if kind == b"IEND" or (kind == b"fcTL" and image_data_seen):
            break
        chunks += 1
        image_data_seen |= kind == b"IDAT"
        icc += kind == b"iCCP"
        compressed_text += kind == b"zTXt" or (kind == b"iTXt" and _itxt_compressed(data, at))
        if chunks > most_chunks:
            return (
                f"is a PNG of more than {most_chunks:,} chunks (allowed: {PNG_FREE_CHUNKS} "
                f"plus one per {PNG_BYTES_PER_CHUNK} bytes of file)"
            )
        if icc > PNG_MAX_ICC_CHUNKS:
            return "is a PNG with more than one iCCP (colour profile) chunk"
        if compressed_text > PNG_MAX_COMPRESSED_TEXT_CHUNKS:
            return (
                f"is a PNG with more than {PNG_MAX_COMPRESSED_TEXT_CHUNKS} compressed text "
                "chunks (zTXt, iTXt)"
            )
        at += 12 + length
    return None


def _itxt_compressed(data: bytes, at: int) -> bool:
    """Whether the iTXt chunk at ``at`` sets its compression flag (after the keyword)."""
    keyword_end = data.find(b"\0", at + 8, at + 8 + 80)
    return keyword_end != -1 and data[keyword_end + 1] == 1


def _jpeg_problem(data: bytes) -> str | None:
    """Segments and stray bytes up to the first scan (Pillow's loop), then the scans up to
    the end of the image (libjpeg's)."""
    at, segments, stray = 2, 0, 0
    while True:
        marker_at = data.find(b"\xff", at)
        if marker_at == -1:
            return None
        stray += marker_at - at
        while data[marker_at + 1] == 0xFF and stray <= JPEG_MAX_STRAY_BYTES:  # fill bytes
            marker_at, stray = marker_at + 1, stray + 1
        segments += 1
        if segments > JPEG_MAX_SEGMENTS_BEFORE_SCAN:
            return (
                f"is a JPEG with more than {JPEG_MAX_SEGMENTS_BEFORE_SCAN:,} segments "
                "(markers) before its image data"
            )
        if stray > JPEG_MAX_STRAY_BYTES:
            return (
                f"is a JPEG with more than {JPEG_MAX_STRAY_BYTES:,} stray or fill bytes "
                "between its segments"
            )
        if data[marker_at + 1] == 0xDA:  # start of scan
            break
        at = marker_at + 2
        if data[marker_at + 1] not in _JPEG_MARKERS_WITHOUT_LENGTH:
            at += struct.unpack_from(">H", data, at)[0]
    # Entropy-coded data never holds 0xFF followed by a marker code (it is stuffed as
    # FF 00), so every FF DA up to the first FF D9 starts a scan of this image.
    scans = data.count(b"\xff\xda", marker_at)
    if scans > JPEG_MAX_SCANS:  # more in the file: count those before the image's end only
        end = data.find(b"\xff\xd9", marker_at)
        scans = data.count(b"\xff\xda", marker_at, len(data) if end == -1 else end)
    if scans > JPEG_MAX_SCANS:
        return (
            f"is a JPEG of {scans:,} scans, more than the {JPEG_MAX_SCANS} allowed (a "
            "progressive JPEG has about 10)"
        )
    return None


def _gif_problem(data: bytes) -> str | None:
    """Extension sub-blocks before the first image descriptor."""
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    sub_blocks = 0
    while data[at] == 0x21:  # an extension: label, then sub-blocks up to an empty one
        at += 2
        while data[at]:
            sub_blocks += 1
            if sub_blocks > GIF_MAX_SUB_BLOCKS:
                return (
                    f"is a GIF with more than {GIF_MAX_SUB_BLOCKS:,} extension blocks "
                    "before its first frame"
                )
            at += 1 + data[at]
        at += 1
    return None
