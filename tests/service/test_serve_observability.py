"""What operators and client authors see: the request log, request ids, the OpenAPI document."""

from __future__ import annotations

import time

import httpx
import pytest
from helpers import drawing, encode, post, request_log
from PIL import PngImagePlugin

pytestmark = pytest.mark.slow

SECRET = "pixel-bytes-must-not-reach-the-log"


def logged(served, request_id: str, timeout_s: float = 10) -> list[dict]:
    """The request-log lines of ``request_id`` (waiting for the worker's stdout to land)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in request_log(served.log) if r["request_id"] == request_id]
        if records or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_one_json_log_line_per_request_without_image_bytes(served) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET)  # readable in the file's bytes
    image = ("tagged.png", encode(drawing(), "PNG", pnginfo=info), "image/png")
    assert SECRET.encode() in image[1]
    text = ("notes.png", f"not an image: {SECRET}".encode(), "image/png")
    cases = [
        ("predict", {"files": {"image": image}}, 200, 1),
        ("predict_batch", {"files": [("images", image)] * 3}, 200, 3),
        ("predict_batch", {"files": [("images", image), ("images", text)]}, 400, 2),
        ("predict", {"json": {"image": SECRET}}, 400, 0),
    ]
    for route, request, status, images in cases:
        started = time.monotonic()
        response = post(served.url, route, **request)
        elapsed_ms = (time.monotonic() - started) * 1000
        assert response.status_code == status, response.text
        request_id = response.headers["x-request-id"]
        assert len(request_id) >= 16 and request_id.isalnum()
        [record] = logged(served, request_id)
        assert record["route"] == f"/{route}"
        assert record["status"] == status
        assert record["images"] == images
        assert 0 < record["latency_ms"] <= elapsed_ms
        assert ("error" in record) == (status != 200)
    assert SECRET not in served.log.read_text(errors="replace")


def test_request_ids_are_unique(served) -> None:
    files = {"image": ("a.png", encode(drawing(), "PNG"))}
    ids = {post(served.url, "predict", files=files).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


def test_openapi_document_describes_the_prediction_routes(served) -> None:
    response = httpx.get(f"{served.url}/docs.json", timeout=30)
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.")
    assert {"/predict", "/predict_batch", "/readyz", "/metrics"} <= set(spec["paths"])
    for route, field in (("/predict", "image"), ("/predict_batch", "images")):
        operation = spec["paths"][route]["post"]
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["required"] == [field]
        assert set(form["properties"]) == {field, "top_k"}
        assert form["properties"]["top_k"]["minimum"] == 1
        assert {"200", "400", "413", "429", "503", "504"} <= set(operation["responses"])
        assert "40,000,000 pixels" in operation["responses"]["400"]["description"]
        for response in operation["responses"].values():
            schema = response["content"]["application/json"]["schema"]
            name = schema["$ref"].removeprefix("#/components/schemas/")
            assert name in spec["components"]["schemas"], name
    batch = spec["paths"]["/predict_batch"]["post"]["requestBody"]
    files = batch["content"]["multipart/form-data"]["schema"]["properties"]["images"]
    assert files["maxItems"] == 64 and files["items"]["format"] == "binary"
    # BentoML's Swagger UI at / reads this document.
    assert httpx.get(f"{served.url}/", timeout=30).status_code == 200
