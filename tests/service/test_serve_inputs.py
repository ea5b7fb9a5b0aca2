"""Whatever a client sends: bad input gets a 4xx with a JSON error, odd images get answers.

The corpus is generated here and sent to the suite's real ``bentoml serve`` process, which
runs with the default limits (64 images, 40 Mpx, 20 MiB).
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import (
    assert_json_error,
    assert_prediction,
    assert_same_numbers,
    drawing,
    encode,
    huge_canvas_png,
    image_file,
    png_bytes,
    post,
    reference_results,
)
from PIL import Image

pytestmark = pytest.mark.slow

EXIF_ORIENTATION = 0x0112
GOOD = ("good.png", png_bytes(), "image/png")
JPEG = encode(drawing(), "JPEG", quality=90)
TWO_TOP_KS = [("top_k", (None, "1")), ("top_k", (None, "2"))]
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>'
HTML = b"<!doctype html><html><body><img src='http://127.0.0.1:1/x.png'></body></html>"
BROKEN_CRC = bytearray(png_bytes())
BROKEN_CRC[40] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
OVER_20_MIB = bytes(20 * 1024 * 1024 + 1)


def one(name: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
    return {"files": {"image": (name, data, content_type)}}


def raw(data: bytes, content_type: str) -> dict:
    return {"content": data, "headers": {"content-type": content_type}}


BAD_REQUESTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "not-an-image": ("predict", one("notes.txt", b"just text", "text/plain"), 400),
    "empty-file": ("predict", one("empty.png", b"", "image/png"), 400),
    "svg": ("predict", one("cat.svg", SVG, "image/svg+xml"), 400),
    "pdf": ("predict", one("cat.pdf", encode(drawing(), "PDF"), "application/pdf"), 400),
    "html-named-jpg": ("predict", one("cat.jpg", HTML, "image/jpeg"), 400),
    "truncated-png": ("predict", one("cut.png", png_bytes()[:60], "image/png"), 400),
    "truncated-jpeg": ("predict", one("cut.jpg", JPEG[: len(JPEG) // 2], "image/jpeg"), 400),
    "broken-crc-png": ("predict", one("crc.png", bytes(BROKEN_CRC), "image/png"), 400),
    # Over the service's limit, under Pillow's own guard: only the service's check refuses it.
    "huge-canvas": ("predict", one("big.png", huge_canvas_png(), "image/png"), 400),
    # Over Pillow's decompression-bomb guard as well.
    "bomb-canvas": ("predict", one("bomb.png", huge_canvas_png(50_000, 50_000), "image/png"), 400),
    "over-20-mib": ("predict", one("big.png", OVER_20_MIB, "image/png"), 413),
    "missing-field": ("predict", {"files": {"top_k": (None, "3")}}, 400),
    "misnamed-field": ("predict", {"files": {"file": GOOD}}, 400),
    "extra-field": ("predict", {"files": {"image": GOOD, "extra": GOOD}}, 400),
    "string-in-image": ("predict", {"files": {"image": (None, "aGVsbG8=")}}, 400),
    "two-images": ("predict", {"files": [("image", GOOD), ("image", GOOD)]}, 400),
    "json-body": ("predict", {"json": {"image": "aGVsbG8=", "top_k": 3}}, 400),
    "urlencoded-body": ("predict", {"data": {"image": "aGVsbG8="}}, 400),
    "raw-png-body": ("predict", raw(png_bytes(), "image/png"), 400),
    "raw-octet-body": ("predict", raw(png_bytes(), "application/octet-stream"), 400),
    "no-body": ("predict", {}, 400),
    "top_k-zero": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "0"}}, 400),
    "top_k-negative": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "-2"}}, 400),
    "top_k-text": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "abc"}}, 400),
    "top_k-float": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "1.5"}}, 400),
    "top_k-empty": ("predict", {"files": {"image": GOOD}, "data": {"top_k": ""}}, 400),
    "top_k-twice": ("predict", {"files": [("image", GOOD), *TWO_TOP_KS]}, 400),
    "top_k-file": ("predict", {"files": {"image": GOOD, "top_k": ("k", b"3", "text/plain")}}, 400),
    "garbage-multipart": ("predict", raw(b"garbage", "multipart/form-data; boundary=xyz"), 400),
    "no-boundary": ("predict", raw(b"garbage", "multipart/form-data"), 400),
    # Python has a codec named "undefined": every decode with it fails.
    "charset-undefined": (
        "predict",
        raw(
            b'--X\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            b"png\r\n--X--\r\n",
            "multipart/form-data; boundary=X; charset=undefined",
        ),
        400,
    ),
    "batch-one-bad": (
        "predict_batch",
        {"files": [("images", GOOD), ("images", ("x.png", b"not a png", "image/png"))]},
        400,
    ),
    "batch-empty-file": ("predict_batch", {"files": [("images", ("e.png", b""))]}, 400),
    "batch-string": ("predict_batch", {"files": {"images": (None, "aGVsbG8=")}}, 400),
    "batch-misnamed": ("predict_batch", {"files": {"image": GOOD}}, 400),
    "batch-json": ("predict_batch", {"json": {"images": ["aGVsbG8="]}}, 400),
    "batch-too-many": ("predict_batch", {"files": [("images", GOOD)] * 65}, 400),
    "batch-over-20-mib": (
        "predict_batch",
        {"files": [("images", GOOD), ("images", ("big.png", OVER_20_MIB, "image/png"))]},
        413,
    ),
}  # fmt: skip
NOT_AN_IMAGE = "upload is not an image in a supported format (JPEG, PNG, WEBP, BMP, GIF, TIFF)"
NOT_MULTIPART = "send multipart/form-data with the image in the file field 'image' (got "
OVER_BYTES = "the request body is over the limit of 20,971,520 bytes"
NOT_A_TOP_K = "top_k must be a positive integer (got "
# What each refusal's message must say: the reason, in words a client author can act on.
REASONS: dict[str, str] = {
    "not-an-image": "'notes.txt': " + NOT_AN_IMAGE,
    "empty-file": "'empty.png': the image is empty (0 bytes)",
    "svg": "'cat.svg': " + NOT_AN_IMAGE,
    "pdf": "'cat.pdf': " + NOT_AN_IMAGE,
    "html-named-jpg": "'cat.jpg': " + NOT_AN_IMAGE,
    "truncated-png": "'cut.png': upload is damaged or truncated",
    "truncated-jpeg": "'cut.jpg': upload is damaged or truncated",
    "broken-crc-png": "'crc.png': " + NOT_AN_IMAGE,
    "huge-canvas": "'big.png': upload is 8000x8000 pixels, more than the limit of 40,000,000",
    "bomb-canvas": "'bomb.png': upload declares more pixels than the limit of 40,000,000",
    "over-20-mib": OVER_BYTES,
    "missing-field": "missing the file field 'image'",
    "misnamed-field": "unexpected field(s) ['file']; send files in 'image'",
    "extra-field": "unexpected field(s) ['extra']; send files in 'image'",
    "string-in-image": "'image' must be a file upload, not text",
    "two-images": "send exactly one file in 'image'",
    "json-body": NOT_MULTIPART + "'application/json')",
    "urlencoded-body": NOT_MULTIPART + "'application/x-www-form-urlencoded')",
    "raw-png-body": NOT_MULTIPART + "'image/png')",
    "raw-octet-body": NOT_MULTIPART + "'application/octet-stream')",
    "no-body": NOT_MULTIPART + "'no content type')",
    "top_k-zero": NOT_A_TOP_K + "'0')",
    "top_k-negative": NOT_A_TOP_K + "'-2')",
    "top_k-text": NOT_A_TOP_K + "'abc')",
    "top_k-float": NOT_A_TOP_K + "'1.5')",
    "top_k-empty": NOT_A_TOP_K + "'')",
    "top_k-twice": "send top_k once (got 2 values)",
    "top_k-file": NOT_A_TOP_K + "'a file')",
    "garbage-multipart": "the multipart body cannot be read",
    "no-boundary": "the multipart body cannot be read: Missing boundary",
    "charset-undefined": "the multipart body cannot be read: its charset 'undefined' decodes",
    "batch-one-bad": "images[1] 'x.png': " + NOT_AN_IMAGE,
    "batch-empty-file": "images[0] 'e.png': the image is empty (0 bytes)",
    "batch-string": "'images' must be a file upload, not text",
    "batch-misnamed": "unexpected field(s) ['image']; send files in 'images'",
    "batch-json": "in the file field 'images' (got 'application/json')",
    "batch-too-many": "too many images: at most 64 per request",
    "batch-over-20-mib": OVER_BYTES,
}
ERROR_FIELDS = {"error", "index", "limit_bytes", "limit_images"}


def test_every_bad_request_has_its_reason() -> None:
    assert list(REASONS) == list(BAD_REQUESTS)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_a_json_error_saying_why(server, case: str) -> None:
    route, request, status = BAD_REQUESTS[case]
    body = assert_json_error(post(server, route, **request), status)
    assert REASONS[case] in body["error"], body
    assert set(body) <= ERROR_FIELDS, body
    if case == "batch-one-bad":
        assert body["index"] == 1
    if case == "batch-too-many":
        assert body["limit_images"] == 64
    if status == 413:
        assert body["limit_bytes"] == 20 * 1024 * 1024


def test_batch_of_exactly_the_limit_is_answered(server, exported) -> None:
    response = post(server, "predict_batch", files=[("images", GOOD)] * 64)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 64


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (24, 6)), mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return image


def _animated_gif() -> bytes:
    frames = [drawing(), drawing().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _translucent() -> Image.Image:
    image = drawing().convert("RGBA")
    image.putalpha(128)
    return image


# Images that are unusual but valid: each must be answered, and as the library decodes it.
ODD_IMAGES: dict[str, bytes] = {
    "1x1": encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "10000x1": encode(drawing(10_000, 1), "PNG"),
    "1x10000": encode(drawing(1, 10_000), "PNG"),
    "cmyk-jpeg": encode(drawing().convert("CMYK"), "JPEG"),
    "16-bit-png": encode(
        Image.fromarray((np.arange(64 * 40).reshape(40, 64) * 25).astype(np.uint16)), "PNG"
    ),
    "palette-gif-transparency": encode(_palette_with_transparency(), "GIF", transparency=0),
    "animated-gif": _animated_gif(),
    "1-bit-bmp": encode(drawing().convert("1"), "BMP"),
    "gray-alpha-png": encode(drawing().convert("LA"), "PNG"),
    "int32-tiff": encode(drawing().convert("I"), "TIFF"),
    "float-tiff": encode(drawing().convert("F").point(lambda value: value / 255), "TIFF"),
    "translucent-webp": encode(_translucent(), "WEBP", lossless=True),
    "progressive-jpeg": encode(drawing(), "JPEG", progressive=True),
}


def predict(server: str, name: str, data: bytes) -> dict:
    response = post(server, "predict", files={"image": (name, data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_odd_images_are_answered_as_the_library_decodes_them(server, exported, case) -> None:
    result = predict(server, case, ODD_IMAGES[case])
    assert_prediction(result, exported.classes, top_k=5)
    [expected] = reference_results(exported.artifact_dir, [ODD_IMAGES[case]])
    assert_same_numbers(result, expected)


def test_exif_orientation_is_applied(server) -> None:
    """A sideways-stored JPEG tagged "rotate 90° clockwise" predicts as the upright image."""
    upright = drawing(64, 40)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera held sideways
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # the viewer rotates it 90° clockwise
    tagged = encode(stored, "JPEG", exif=exif, quality=95)
    as_stored = np.asarray(Image.open(io.BytesIO(tagged)).convert("RGB"))  # no rotation
    as_shown = np.rot90(as_stored, k=-1)  # what a viewer shows: clockwise
    assert as_shown.shape == (40, 64, 3)
    assert np.abs(as_shown.astype(int) - np.asarray(upright)).mean() < 8  # JPEG loss only

    rotated = predict(server, "rotated.jpg", tagged)
    shown = predict(server, "upright.png", encode(Image.fromarray(as_shown.copy()), "PNG"))
    ignored = predict(server, "sideways.png", encode(Image.fromarray(as_stored), "PNG"))
    assert_same_numbers(rotated, shown)
    # The check can fail: the same pixels, not rotated, predict differently.
    difference = max(
        abs(rotated["probabilities"][c] - ignored["probabilities"][c])
        for c in rotated["probabilities"]
    )
    assert difference > 100 * 1e-5


def test_service_is_healthy_after_the_corpus(server, probe_images, expected_results) -> None:
    before = predict(server, "probe.png", probe_images[0].read_bytes())
    for route, request, _ in BAD_REQUESTS.values():
        post(server, route, **request)
    for name, data in ODD_IMAGES.items():
        post(server, "predict", files={"image": (name, data)})
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200
    after = post(server, "predict", files={"image": image_file(probe_images[0])})
    assert after.status_code == 200, after.text
    assert after.json() == before
    assert_same_numbers(after.json(), expected_results[0])
