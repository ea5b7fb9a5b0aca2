"""Helpers shared by the service tests: requests, generated images, and answer checks.

Imported as ``helpers`` (pytest puts this folder, which has no ``__init__.py``, on
``sys.path``). Every image is generated here, in memory: the tests own their corpus.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

TOLERANCE = 1e-5  # onnxruntime may sum in another order when requests share a batch


def post(url: str, route: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/{route}", timeout=60, **kwargs)


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_bytes(size: int = 32) -> bytes:
    return encode(Image.new("RGB", (size, size), (200, 30, 30)), "PNG")


def drawing(width: int = 64, height: int = 40) -> Image.Image:
    """A red triangle off-center on white: rotating or mirroring it changes the pixels."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).polygon(
        [(width // 12, height - 4), (width // 2, 4), (2 * width // 3, height - 4)],
        fill=(200, 30, 30),
    )
    return image


def huge_canvas_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header that declares a canvas far over the pixel limit, in 45 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def image_file(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "application/octet-stream")


def assert_prediction(result: dict, classes: tuple[str, ...], top_k: int) -> None:
    """One image's answer is well formed: every class, a distribution, a sorted top-k."""
    probabilities = result["probabilities"]
    assert list(probabilities) == list(classes)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert result["label"] == max(probabilities, key=probabilities.get)
    ranked = result["top_k"]
    assert len(ranked) == min(top_k, len(classes))
    assert [entry["probability"] for entry in ranked] == sorted(
        (entry["probability"] for entry in ranked), reverse=True
    )
    assert ranked[0]["label"] == result["label"]
    assert all(probabilities[entry["label"]] == entry["probability"] for entry in ranked)


def assert_same_numbers(result: dict, expected: dict) -> None:
    assert result["label"] == expected["label"]
    for name, probability in expected["probabilities"].items():
        assert result["probabilities"][name] == pytest.approx(probability, abs=TOLERANCE)


def assert_json_error(response: httpx.Response, status: int) -> dict:
    """``response`` is ``status`` with a JSON object whose ``error`` is a readable sentence."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert len(body["error"]) > 10, body
    return body


def request_log(log: Path) -> list[dict]:
    """The service's JSON request-log lines in a server log (BentoML's lines are skipped)."""
    records = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith('{"event": "request"'):
            records.append(json.loads(line))
    return records


def assert_concurrent_answers(
    url: str,
    probe_images: list[Path],
    expected: list[dict],
    *,
    singles: int,
    batches: int,
    repeat: int,
    workers: int,
) -> None:
    """Send ``singles`` one-image requests and ``batches`` requests of the probe images
    ``repeat`` times over, all at once; each answer must be its own images' ``expected``."""

    def one(index: int) -> tuple[int, dict]:
        response = post(url, "predict", files={"image": image_file(probe_images[index])})
        assert response.status_code == 200, response.text
        return index, response.json()

    def batch() -> list[dict]:
        files = [("images", image_file(path)) for path in probe_images * repeat]
        response = post(url, "predict_batch", files=files)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(batch) for _ in range(batches)]
        answers = list(pool.map(one, [i % len(probe_images) for i in range(singles)]))
        batched = [future.result() for future in pending]
    for index, result in answers:
        assert_same_numbers(result, expected[index])
    for results in batched:
        for result, want in zip(results, expected * repeat, strict=True):
            assert_same_numbers(result, want)
