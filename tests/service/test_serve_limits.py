"""Configured limits and overload, on a second server started with tight settings.

``CONVTUNE_MAX_*`` set the per-request limits; BentoML's own ``BENTOML_CONFIG_OPTIONS``
sets its traffic limits. With two requests allowed in flight, a burst of requests gets
some refused at once (429), while clients that stall mid-upload hold no slot at all: their
bodies are read before their requests take one, and they time out (408).
A bad limit or a tampered model stops the service at start.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import pytest
from helpers import (
    RawAnswer,
    address,
    assert_json_error,
    drawing,
    encode,
    huge_canvas_png,
    png_bytes,
    post,
)
from starlette.requests import Request
from starlette.types import Message

from convtune.data.images import ImageDecodeError, decode_rgb
from convtune.service.http import (
    MAX_BOUNDARY_PADDING,
    BadRequest,
    BoundaryScan,
    Limits,
    PayloadTooLarge,
    RequestError,
    read_form,
)
from convtune.service.uploads import request_pixels

pytestmark = pytest.mark.slow

MAX_IMAGES = 3
MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000
MAX_REQUEST_PIXELS = 2_500_000
MAX_CONCURRENCY = 2
TIMEOUT_S = 4
BODY_GRACE_S = 2  # a stalled upload is refused this long after its headers


@pytest.fixture(scope="module")
def tight(start_server) -> Iterator:
    traffic = "services.Convtune.traffic"
    with start_server(
        "serve-tight",
        CONVTUNE_MAX_BATCH_IMAGES=str(MAX_IMAGES),
        CONVTUNE_MAX_UPLOAD_BYTES=str(MAX_BYTES),
        CONVTUNE_MAX_PIXELS=str(MAX_PIXELS),
        CONVTUNE_MAX_REQUEST_PIXELS=str(MAX_REQUEST_PIXELS),
        CONVTUNE_SLOW_BODY_GRACE_S=str(BODY_GRACE_S),
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


def test_the_images_of_a_request_share_a_pixel_budget(tight) -> None:
    # Each under the per-image limit; three of them declare more than a request may.
    image = ("big.png", huge_canvas_png(1000, 900), "image/png")  # 900,000 pixels, 45 bytes
    body = assert_json_error(post(tight.url, "predict_batch", files=[("images", image)] * 3), 413)
    assert "2,700,000 pixels together, more than the limit of 2,500,000" in body["error"]
    # Two fit the budget: they are decoded (and refused for their empty pixel data).
    response = post(tight.url, "predict_batch", files=[("images", image)] * 2)
    assert "damaged or truncated" in assert_json_error(response, 400)["error"]


def test_a_chunked_body_is_refused_as_it_passes_the_limit_before_it_ends(tight) -> None:
    """A chunked upload that never ends: the 413 must arrive while it is still open, so the
    server counted it as it came instead of reading (and spooling) it to the end. A server
    that waited for the end would answer 408 once the body stopped arriving."""
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
    client = socket.create_connection(address(url), timeout=BODY_GRACE_S + 30)
    client.sendall(
        b"POST /predict HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n"
    )
    return client


def test_stalled_uploads_hold_no_slot_and_time_out(tight) -> None:
    stalled = [stalled_upload(tight.url) for _ in range(MAX_CONCURRENCY)]
    try:
        # As many stalled uploads as there are slots: the next request is still answered.
        assert post(tight.url, "predict", files={"image": GOOD}).status_code == 200
        for client in stalled:
            answer = RawAnswer.read(client)
            assert answer.status == 408 and "bytes/s" in answer.json()["error"]
    finally:
        for client in stalled:
            client.close()


def test_a_burst_over_the_concurrency_limit_is_refused_at_once(tight) -> None:
    """More requests at once than slots: some are refused with 429 instead of queued."""
    files = [("images", ("big.png", encode(drawing(800, 800), "PNG"), "image/png"))]
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(max_workers=16) as pool:
        while not statuses[429]:
            assert time.monotonic() < deadline, f"no request was refused: {statuses}"
            burst = [pool.submit(post, tight.url, "predict_batch", files=files * MAX_IMAGES)
                     for _ in range(16)]  # fmt: skip
            answers = [future.result() for future in burst]
            statuses.update(response.status_code for response in answers)
            for response in answers:
                if response.status_code == 429:
                    assert_json_error(response, 429)
    assert set(statuses) <= {200, 429}, statuses
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


# Each limit's variable, its field and its default, written out here so that a changed
# default or a renamed variable fails a test (the README's table is checked against the code
# by tests/test_documented_defaults.py).
DEFAULT_LIMITS = {
    "CONVTUNE_MAX_BATCH_IMAGES": ("max_batch_images", 64),
    "CONVTUNE_MAX_PIXELS": ("max_pixels", 40_000_000),
    "CONVTUNE_MAX_UPLOAD_BYTES": ("max_upload_bytes", 20_971_520),  # 20 MiB
    "CONVTUNE_MAX_REQUEST_PIXELS": ("max_request_pixels", 160_000_000),
    "CONVTUNE_MAX_URL_BYTES": ("max_url_bytes", 8192),
    "CONVTUNE_MAX_HEADER_BYTES": ("max_header_bytes", 16_384),
    "CONVTUNE_HEADER_TIMEOUT_S": ("header_timeout_s", 10),
    "CONVTUNE_SLOW_BODY_GRACE_S": ("slow_body_grace_s", 10),
    "CONVTUNE_MIN_BODY_RATE": ("min_body_rate", 16_384),
}


def test_each_limit_has_its_default_and_is_set_by_its_own_variable() -> None:
    defaults = Limits.from_env({})
    assert asdict(defaults) == dict(DEFAULT_LIMITS.values())
    for variable, (name, _) in DEFAULT_LIMITS.items():
        assert Limits.from_env({variable: "7"}) == replace(defaults, **{name: 7}), variable


def form_request(body: bytes) -> Request:
    """``body`` POSTed as multipart/form-data (boundary ``b``), as the application gets it."""
    headers = [(b"content-type", b"multipart/form-data; boundary=b"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def multipart(files: list[bytes], field: str = "images") -> bytes:
    parts = [b'--b\r\nContent-Disposition: form-data; name="%s"; filename="f"\r\n\r\n%s\r\n'
             % (field.encode(), data) for data in files]  # fmt: skip
    return b"".join(parts) + b"--b--\r\n"


def read_with_defaults(body: bytes) -> list[tuple[str, bytes]] | RequestError:
    """The files ``read_form`` takes from ``body`` under the default limits, or its refusal."""
    try:
        return asyncio.run(read_form(form_request(body), "images", Limits())).files
    except RequestError as error:
        return error


def test_by_default_a_request_may_send_64_images() -> None:
    accepted = read_with_defaults(multipart([b"x"] * 64))
    assert isinstance(accepted, list) and len(accepted) == 64, accepted
    refusal = read_with_defaults(multipart([b"x"] * 65))
    assert isinstance(refusal, BadRequest) and refusal.details == {"limit_images": 64}


def test_by_default_a_request_body_may_hold_20_mib() -> None:
    frame = len(multipart([b""]))  # the body but the file's bytes
    body = multipart([bytes(20 * 1024 * 1024 - frame)])
    assert len(body) == 20 * 1024 * 1024
    accepted = read_with_defaults(body)
    assert isinstance(accepted, list), accepted
    [(_, data)] = accepted
    assert len(data) == len(body) - frame
    refusal = read_with_defaults(multipart([bytes(len(data) + 1)]))
    assert isinstance(refusal, PayloadTooLarge)
    assert refusal.details == {"limit_bytes": 20 * 1024 * 1024}


def test_by_default_an_image_may_declare_40_mpx_and_a_request_160_mpx() -> None:
    limits = Limits()
    at_limit = huge_canvas_png(8000, 5000)  # 40,000,000 pixels declared, none sent
    # Past the pixel check, Pillow finds no pixel data; one row more is refused before it.
    with pytest.raises(ImageDecodeError, match="damaged or truncated"):
        decode_rgb(at_limit, max_pixels=limits.max_pixels)
    with pytest.raises(ImageDecodeError, match="more than the limit of 40,000,000 pixels"):
        decode_rgb(huge_canvas_png(8000, 5001), max_pixels=limits.max_pixels)
    four = [("a.png", at_limit)] * 4
    assert request_pixels(four, limits) == 160_000_000
    with pytest.raises(PayloadTooLarge, match="160,000,001 pixels together"):
        request_pixels([*four, ("b.png", huge_canvas_png(1, 1))], limits)


def scanned(body: bytes, chunk_size: int, max_parts: int = 4) -> str:
    """What ``BoundaryScan`` says of ``body`` fed in chunks: "ok" or its refusal."""
    scan = BoundaryScan(b"b", max_parts=max_parts)
    try:
        for start in range(0, len(body), chunk_size):
            scan.feed(body[start : start + chunk_size])
    except BadRequest as error:
        return str(error)
    return "ok"


PART = b'Content-Disposition: form-data; name="image"; filename="a"\r\n\r\nxy\r\n'


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 16])
def test_boundary_scan_refuses_padding_and_extra_parts_however_the_body_is_cut(
    chunk_size: int,
) -> None:
    ordinary = b"--b\r\n" + PART + b"--b\r\n" + PART + b"--b--\r\n"
    assert scanned(ordinary, chunk_size) == "ok"
    allowed_padding = b"--b" + b" \t" * (MAX_BOUNDARY_PADDING // 2) + b"\r\n" + PART + b"--b--"
    assert scanned(allowed_padding, chunk_size) == "ok"
    for padded in (
        b"--b" + b" " * (MAX_BOUNDARY_PADDING + 1) + b"\r\n" + PART + b"--b--",  # first boundary
        b"--b\r\n" + PART + b"--b" + b"\t" * 10_000 + b"\r\n" + PART + b"--b--",
    ):
        assert "spaces after a boundary" in scanned(padded, chunk_size)
    assert scanned(b"--b\r\n" + PART * 4 + b"--b--", chunk_size) == "ok"  # one part
    five_parts = b"--b\r\n" + b"--b\r\n".join([PART] * 5) + b"--b--"
    assert scanned(five_parts, chunk_size) == "the multipart body has more than 4 parts"
    look_alikes = b"--b\r\n" + PART + b"\r\n--bX" * 10 + b"\r\n--b--"
    assert scanned(look_alikes, chunk_size) == "the multipart body has more than 4 parts"
