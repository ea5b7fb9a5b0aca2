"""The served model over HTTP: same numbers as the CLI, batching, and refusal of bad input."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from data.synthetic import make_shapes_dataset

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


def png_bytes(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_canvas_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header that declares a canvas far over the pixel limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def post(url: str, route: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/{route}", timeout=60, **kwargs)


def image_file(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "application/octet-stream")


def assert_prediction(result: dict, classes: tuple[str, ...], top_k: int) -> None:
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


def test_predict_matches_cli(server, exported, probe_images, cli_results) -> None:
    for path, expected in zip(probe_images, cli_results, strict=True):
        response = post(server, "predict", files={"image": image_file(path)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == exported.tag
        assert_prediction(body, exported.classes, top_k=5)
        assert_same_numbers(body, expected)


@pytest.mark.parametrize(("top_k", "expected_length"), [("1", 1), ("2", 2), ("99", 3)])
def test_top_k_is_sorted_and_clamped(server, exported, probe_images, top_k, expected_length):
    assert len(exported.classes) == 3
    response = post(
        server, "predict", files={"image": image_file(probe_images[0])}, data={"top_k": top_k}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["top_k"]) == expected_length
    assert_prediction(response.json(), exported.classes, top_k=int(top_k))


def test_predict_batch_matches_cli_in_input_order(server, exported, probe_images, cli_results):
    # The probe images get distinct answers, so a reordering would show.
    assert len({tuple(r["probabilities"].values()) for r in cli_results}) == len(cli_results)
    for order in (list(range(len(probe_images))), list(reversed(range(len(probe_images))))):
        files = [("images", image_file(probe_images[i])) for i in order]
        response = post(server, "predict_batch", files=files, data={"top_k": "2"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == exported.tag
        assert len(body["results"]) == len(order)
        for index, result in zip(order, body["results"], strict=True):
            assert_prediction(result, exported.classes, top_k=2)
            assert_same_numbers(result, cli_results[index])


def test_concurrent_requests_are_batched_correctly(server, exported, probe_images, cli_results):
    """Many requests at once share onnxruntime calls; each still gets its own answer."""
    jobs = [i % len(probe_images) for i in range(32)]

    def one(index: int) -> tuple[int, dict]:
        response = post(server, "predict", files={"image": image_file(probe_images[index])})
        assert response.status_code == 200, response.text
        return index, response.json()

    def batch() -> list[dict]:  # 3 x 45 images: over the 64-image batch limit together
        files = [("images", image_file(path)) for path in probe_images * 5]
        response = post(server, "predict_batch", files=files)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        batches = [pool.submit(batch) for _ in range(3)]
        singles = list(pool.map(one, jobs))
        batches = [future.result() for future in batches]
    for index, result in singles:
        assert_same_numbers(result, cli_results[index])
    for results in batches:
        for result, expected in zip(results, cli_results * 5, strict=True):
            assert_same_numbers(result, expected)


def test_accuracy_on_heldout_images(server, exported) -> None:
    root = make_shapes_dataset(exported.root / "heldout", per_class=20, size=48, seed=12345)
    paths = sorted(root.glob("*/*.png"))
    response = post(server, "predict_batch", files=[("images", image_file(p)) for p in paths])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    hits = [r["label"] == p.parent.name for r, p in zip(results, paths, strict=True)]
    accuracy = sum(hits) / len(paths)
    print(f"held-out accuracy through /predict_batch: {accuracy:.3f} on {len(paths)} images")
    assert accuracy > 0.7, f"held-out accuracy {accuracy:.3f} (chance is 1/3)"


GOOD = ("good.png", png_bytes(), "image/png")
TWO_TOP_KS = [("top_k", (None, "1")), ("top_k", (None, "2"))]
BAD_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "not-an-image": ("predict", {"files": {"image": ("notes.txt", b"just text", "text/plain")}}),
    "empty-file": ("predict", {"files": {"image": ("empty.png", b"", "image/png")}}),
    "truncated-png": ("predict", {"files": {"image": ("cut.png", png_bytes()[:60], "image/png")}}),
    "huge-canvas": ("predict", {"files": {"image": ("big.png", huge_canvas_png(), "image/png")}}),
    "missing-field": ("predict", {"files": {"top_k": (None, "3")}}),
    "misnamed-field": ("predict", {"files": {"file": GOOD}}),
    "extra-field": ("predict", {"files": {"image": GOOD, "extra": GOOD}}),
    "string-in-image": ("predict", {"files": {"image": (None, "aGVsbG8=")}}),
    "two-images": ("predict", {"files": [("image", GOOD), ("image", GOOD)]}),
    "json-body": ("predict", {"json": {"image": "aGVsbG8=", "top_k": 3}}),
    "urlencoded-body": ("predict", {"data": {"image": "aGVsbG8="}}),
    "no-body": ("predict", {}),
    "top_k-zero": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "0"}}),
    "top_k-negative": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "-2"}}),
    "top_k-text": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "abc"}}),
    "top_k-float": ("predict", {"files": {"image": GOOD}, "data": {"top_k": "1.5"}}),
    "top_k-twice": ("predict", {"files": [("image", GOOD), *TWO_TOP_KS]}),
    "top_k-file": ("predict", {"files": {"image": GOOD, "top_k": ("k.txt", b"3", "text/plain")}}),
    "garbage-multipart": (
        "predict",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
    ),
    "no-boundary": (
        "predict",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
    ),
    "batch-one-bad": (
        "predict_batch",
        {"files": [("images", GOOD), ("images", ("x.png", b"not a png", "image/png"))]},
    ),
    "batch-empty-file": ("predict_batch", {"files": [("images", ("e.png", b"", "image/png"))]}),
    "batch-string": ("predict_batch", {"files": {"images": (None, "aGVsbG8=")}}),
    "batch-misnamed": ("predict_batch", {"files": {"image": GOOD}}),
    "batch-json": ("predict_batch", {"json": {"images": ["aGVsbG8="]}}),
    "batch-too-many": ("predict_batch", {"files": [("images", GOOD)] * 65}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_400_with_a_json_error(server, case: str) -> None:
    route, request = BAD_REQUESTS[case]
    response = post(server, route, **request)
    assert response.status_code == 400, response.text
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and len(body["error"]) > 10
    if case == "batch-one-bad":
        assert "images[1]" in body["error"]


def test_service_is_healthy_after_bad_input(server, probe_images, cli_results) -> None:
    for route, request in BAD_REQUESTS.values():
        post(server, route, **request)
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200
    response = post(server, "predict", files={"image": image_file(probe_images[0])})
    assert response.status_code == 200, response.text
    assert_same_numbers(response.json(), cli_results[0])


def test_metrics_endpoint_counts_requests(server, probe_images) -> None:
    post(server, "predict", files={"image": image_file(probe_images[0])})
    response = httpx.get(f"{server}/metrics", timeout=10)
    assert response.status_code == 200
    assert "bentoml_" in response.text and "/predict" in response.text


class Listener:
    """A TCP server on a free local port that records every connection it accepts."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, address = self.socket.accept()
            except TimeoutError:
                continue
            self.connections.append(address)
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


def test_url_in_a_file_field_is_never_fetched(server) -> None:
    listener = Listener()
    try:
        url = f"http://127.0.0.1:{listener.port}/cat.png"
        # Sanity check: the listener does see a client that connects.
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5):
            pass
        deadline = time.monotonic() + 5
        while not listener.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(listener.connections) == 1
        requests = [
            ("predict", {"files": {"image": (None, url)}}),
            ("predict", {"data": {"image": url}}),
            ("predict", {"json": {"image": url}}),
            ("predict_batch", {"files": [("images", (None, url)), ("images", (None, url))]}),
            ("predict_batch", {"json": {"images": [url]}}),
        ]
        for route, request in requests:
            response = post(server, route, **request)
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"error"}
        time.sleep(1.0)  # time for any (wrong) fetch to arrive
        assert len(listener.connections) == 1, "the service connected to a URL from a request"
    finally:
        listener.close()
