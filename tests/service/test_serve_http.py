"""The served model over HTTP: same numbers as the CLI, batching, metrics, no URL fetching.

Bad and unusual input: ``test_serve_inputs.py``; configured limits and overload:
``test_serve_limits.py``.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from helpers import (
    assert_concurrent_answers,
    assert_prediction,
    assert_same_numbers,
    image_file,
    post,
)

from convtune.data.synthetic import make_shapes_dataset

pytestmark = pytest.mark.slow


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
    """Many requests at once share onnxruntime calls; each still gets its own answer. The
    3 batches of 45 images are over the 64-image batch limit together."""
    assert_concurrent_answers(server, probe_images, cli_results, singles=32, batches=3,
                              repeat=5, workers=16)  # fmt: skip


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
            # A URL as the file's content, as its name, or in another field.
            ("predict", {"files": {"image": ("x.url", url.encode(), "text/uri-list")}}),
            ("predict", {"files": {"image": (url, b"", "image/png")}}),
            ("predict", {"files": {"image": (url, b"GIF89a", "image/gif")}}),
            ("predict", {"files": {"image": ("a.png", b"x"), "top_k": (None, url)}}),
        ]
        for route, request in requests:
            response = post(server, route, **request)
            assert response.status_code == 400, response.text
            assert set(response.json()) <= {"error", "index"}
        time.sleep(1.0)  # time for any (wrong) fetch to arrive
        assert len(listener.connections) == 1, "the service connected to a URL from a request"
    finally:
        listener.close()
