"""Configured limits and overload, on a second server started with tight settings.

``CONVTUNE_MAX_*`` set the per-request limits; BentoML's own ``BENTOML_CONFIG_OPTIONS``
sets its traffic limits. With two requests allowed in flight and a 4 s timeout, two
clients that stall mid-upload fill the server: the next request must be refused at once
(429), the stalled ones must time out (504), and then the server must answer again.
A bad limit or a tampered model stops the service at start.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from helpers import assert_json_error, drawing, encode, png_bytes, post

from convtune.service.http import Limits

pytestmark = pytest.mark.slow

MAX_IMAGES = 3
MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000
MAX_CONCURRENCY = 2
TIMEOUT_S = 4


@pytest.fixture(scope="module")
def tight(start_server) -> Iterator:
    traffic = "services.Convtune.traffic"
    with start_server(
        "serve-tight",
        CONVTUNE_MAX_BATCH_IMAGES=str(MAX_IMAGES),
        CONVTUNE_MAX_UPLOAD_BYTES=str(MAX_BYTES),
        CONVTUNE_MAX_PIXELS=str(MAX_PIXELS),
        BENTOML_CONFIG_OPTIONS=(
            f"{traffic}.max_concurrency={MAX_CONCURRENCY} {traffic}.timeout={TIMEOUT_S}"
        ),
    ) as server:
        yield server


GOOD = ("good.png", png_bytes(), "image/png")


def test_image_count_limit_comes_from_the_environment(tight) -> None:
    response = post(tight.url, "predict_batch", files=[("images", GOOD)] * MAX_IMAGES)
    assert response.status_code == 200, response.text
    response = post(tight.url, "predict_batch", files=[("images", GOOD)] * (MAX_IMAGES + 1))
    body = assert_json_error(response, 400)
    assert body["limit_images"] == MAX_IMAGES and f"at most {MAX_IMAGES}" in body["error"]


def test_byte_limit_comes_from_the_environment(tight) -> None:
    noise = bytes(MAX_BYTES)
    body = assert_json_error(post(tight.url, "predict", files={"image": ("a.png", noise)}), 413)
    assert body["limit_bytes"] == MAX_BYTES

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for start in range(0, len(noise), 16_384):
            yield noise[start : start + 16_384]
        yield b"\r\n--b--\r\n"

    response = post(
        tight.url,
        "predict",
        content=chunked(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert assert_json_error(response, 413)["limit_bytes"] == MAX_BYTES


def test_pixel_limits_come_from_the_environment(tight) -> None:
    over = encode(drawing(1001, 1000), "PNG")
    body = assert_json_error(post(tight.url, "predict", files={"image": ("big.png", over)}), 400)
    assert "1,000,000" in body["error"]
    # Under the limit however elongated: the eval transform crops before it resizes.
    thin = encode(drawing(100_000, 1), "PNG")
    assert post(tight.url, "predict", files={"image": ("thin.png", thin)}).status_code == 200
    assert post(tight.url, "predict", files={"image": GOOD}).status_code == 200


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_a_chunked_body_is_refused_as_it_passes_the_limit_before_it_ends(tight) -> None:
    """A chunked upload that never ends: the 413 must arrive while it is still open, so the
    server counted it as it came instead of reading (and spooling) it to the end. A server
    that waited for the end would answer 504 once its 4 s timeout passed."""
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    body = part + bytes(MAX_BYTES + 1)
    with socket.create_connection(address(tight.url), timeout=TIMEOUT_S + 30) as client:
        client.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        for start in range(0, len(body), 16_384):
            chunk = body[start : start + 16_384]
            client.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        # No last chunk: the body has not ended.
        answer = http.client.HTTPResponse(client)
        answer.begin()
        assert answer.status == 413
        refusal = json.loads(answer.read())
    assert refusal["limit_bytes"] == MAX_BYTES
    assert f"over the limit of {MAX_BYTES:,} bytes" in refusal["error"]


def stalled_upload(url: str) -> socket.socket:
    """A client that sends the start of a /predict request and then nothing more."""
    client = socket.create_connection(address(url), timeout=TIMEOUT_S + 10)
    client.sendall(
        b"POST /predict HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n"
    )
    return client


def unanswered(client: socket.socket) -> bool:
    """Whether nothing has come back on ``client`` yet (the answer stays unread)."""
    client.setblocking(False)
    try:
        return not client.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        client.settimeout(TIMEOUT_S + 10)


def test_overload_is_refused_at_once_and_stalled_requests_time_out(tight) -> None:
    stalled = [stalled_upload(tight.url) for _ in range(MAX_CONCURRENCY)]
    try:
        # Both stalled requests hold a slot as soon as the server has read their headers;
        # until they time out, the next request must be refused.
        deadline = time.monotonic() + TIMEOUT_S - 1
        while (response := post(tight.url, "predict", files={"image": GOOD})).status_code != 429:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.05)
        assert_json_error(response, 429)
        # Refused at once, not queued behind them: they have had no answer yet.
        assert all(map(unanswered, stalled))
        assert httpx.get(f"{tight.url}/readyz", timeout=5).status_code == 200  # probes bypass
        for client in stalled:
            answer = http.client.HTTPResponse(client)  # read the raw socket's answer
            answer.begin()
            assert answer.status == 504
            assert "error" in json.loads(answer.read())
    finally:
        for client in stalled:
            client.close()
    assert post(tight.url, "predict", files={"image": GOOD}).status_code == 200


@pytest.mark.parametrize("value", ["0", "-3", "ten", "1.5", ""])
def test_a_bad_limit_value_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="CONVTUNE_MAX_PIXELS must be a positive integer"):
        Limits.from_env({"CONVTUNE_MAX_PIXELS": value})


def test_a_bad_limit_stops_the_service_at_start(start_refused) -> None:
    error = "convtune service: error: CONVTUNE_MAX_PIXELS must be a positive integer, not 'ten'"
    start_refused("serve-bad-limit", error, CONVTUNE_MAX_PIXELS="ten")


def test_a_tampered_model_is_refused_at_start(start_refused, exported, tmp_path) -> None:
    home = tmp_path / "bentoml"  # a store holding a copy of the model, one byte changed
    shutil.copytree(exported.bentoml_home / "models", home / "models", symlinks=True)
    onnx = home / "models" / exported.tag.replace(":", "/") / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    start_refused(
        "serve-tampered",
        "model.onnx does not match its recorded sha256",
        BENTOML_HOME=str(home),
        CONVTUNE_MODEL=exported.tag,
    )


def test_limits_default_and_parse() -> None:
    assert Limits.from_env({}) == Limits(64, 40_000_000, 20 * 1024 * 1024)
    assert Limits.from_env({"CONVTUNE_MAX_BATCH_IMAGES": "8"}).max_batch_images == 8
