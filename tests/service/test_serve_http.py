"""The served model over HTTP: same numbers as the CLI, batching, metrics, no URL fetching.

The numbers both must give are computed by the tests themselves (``expected_results``:
softmax(logits / T) of onnxruntime's logits), so a fault the CLI and the service share
(a temperature dropped in the inference code they both use) still shows.

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
    TOLERANCE,
    assert_concurrent_answers,
    assert_prediction,
    assert_same_numbers,
    image_file,
    largest_difference,
    post,
    reference_results,
)
from prometheus_client.parser import text_string_to_metric_families

from convtune.data.synthetic import make_shapes_dataset

pytestmark = pytest.mark.slow


def test_cli_answers_the_calibrated_softmax_of_the_onnx_logits(
    exported, probe_images, cli_results, expected_results
) -> None:
    for result, expected in zip(cli_results, expected_results, strict=True):
        assert_same_numbers(result, expected)
    # The check can fail: without the temperature the numbers differ.
    uncalibrated = reference_results(exported.artifact_dir, probe_images, temperature=1.0)
    assert largest_difference(uncalibrated, expected_results) > 100 * TOLERANCE


def test_predict_matches_cli(server, exported, probe_images, cli_results, expected_results):
    for path, cli, expected in zip(probe_images, cli_results, expected_results, strict=True):
        response = post(server, "predict", files={"image": image_file(path)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == exported.tag
        assert_prediction(body, exported.classes, top_k=5)
        assert_same_numbers(body, expected)
        assert_same_numbers(body, cli)


@pytest.mark.parametrize(("top_k", "expected_length"), [("1", 1), ("2", 2), ("99", 3)])
def test_top_k_is_sorted_and_clamped(server, exported, probe_images, top_k, expected_length):
    assert len(exported.classes) == 3
    response = post(
        server, "predict", files={"image": image_file(probe_images[0])}, data={"top_k": top_k}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["top_k"]) == expected_length
    assert_prediction(response.json(), exported.classes, top_k=int(top_k))


def test_predict_batch_matches_cli_in_input_order(
    server, exported, probe_images, cli_results, expected_results
) -> None:
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
            assert_same_numbers(result, expected_results[index])
            assert_same_numbers(result, cli_results[index])


def test_concurrent_requests_are_batched_correctly(server, probe_images, expected_results):
    """Many requests at once share onnxruntime calls; each still gets its own answer. The
    3 batches of 45 images are over the 64-image batch limit together."""
    assert_concurrent_answers(server, probe_images, expected_results, singles=32, batches=3,
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


def request_counts(url: str) -> dict[tuple[str, str], float]:
    """BentoML's request counter from ``/metrics``, by (route, status)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    counts = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "bentoml_service_request_total":
                # Summed over the other labels: a route can have several series.
                key = (sample.labels["endpoint"], sample.labels["http_response_code"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def test_metrics_endpoint_counts_requests(server, probe_images) -> None:
    before = request_counts(server)
    sent = {("/predict", "200"): 3, ("/predict", "400"): 2, ("/predict_batch", "200"): 1}
    for _ in range(3):
        assert post(server, "predict", files={"image": image_file(probe_images[0])}).is_success
    for _ in range(2):
        assert post(server, "predict", json={}).status_code == 400
    files = [("images", image_file(path)) for path in probe_images[:2]]
    assert post(server, "predict_batch", files=files).is_success

    def counted() -> dict[tuple[str, str], float]:
        after = request_counts(server)
        return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in sent}

    # The counter may be written just after the answer is sent: wait for it to catch up.
    deadline = time.monotonic() + 30
    while (increase := counted()) != sent and time.monotonic() < deadline:
        time.sleep(0.1)
    assert increase == sent


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
