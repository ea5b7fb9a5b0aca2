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
)
from PIL import Image

from convtune.data.images import decode_rgb
from convtune.models.inference import OnnxClassifier, format_prediction

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
    "huge-canvas": ("predict", one("big.png", huge_canvas_png(), "image/png"), 400),
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
ERROR_FIELDS = {"error", "index", "limit_bytes", "limit_images"}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_a_json_error(server, case: str) -> None:
    route, request, status = BAD_REQUESTS[case]
    body = assert_json_error(post(server, route, **request), status)
    assert set(body) <= ERROR_FIELDS, body
    if case == "batch-one-bad":
        assert "images[1]" in body["error"] and body["index"] == 1
    if case == "batch-too-many":
        assert "64" in body["error"] and body["limit_images"] == 64
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
    "float-tiff": encode(drawing().convert("F"), "TIFF"),
    "translucent-webp": encode(_translucent(), "WEBP", lossless=True),
    "progressive-jpeg": encode(drawing(), "JPEG", progressive=True),
}


@pytest.fixture(scope="module")
def local(exported) -> OnnxClassifier:
    """The exported model run in this process: what the service must reproduce."""
    return OnnxClassifier(exported.artifact_dir)


def local_prediction(local: OnnxClassifier, data: bytes) -> dict:
    [row] = local.classify([decode_rgb(data)])
    return format_prediction(row, local.classes, 5)


def predict(server: str, name: str, data: bytes) -> dict:
    response = post(server, "predict", files={"image": (name, data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_odd_images_are_answered_as_the_library_decodes_them(server, exported, local, case):
    result = predict(server, case, ODD_IMAGES[case])
    assert_prediction(result, exported.classes, top_k=5)
    assert_same_numbers(result, local_prediction(local, ODD_IMAGES[case]))


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


def test_service_is_healthy_after_the_corpus(server, probe_images, cli_results) -> None:
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
    assert_same_numbers(after.json(), cli_results[0])
