"""HTTP limits below the application, against a real server: raw sockets, real timeouts.

The server runs with short timeouts (headers in 2 s; a body's first 2 s free, then at
least 16 KiB/s; an answer in 3 s) and BentoML's default 64 concurrency slots. Oversized
heads are refused (431, 414), slow heads and slow bodies time out (408), a body is read
whole before its request takes a slot, a hostile multipart body costs the server little
CPU, and a request that times out stops decoding.

Other processes share the cores, so timers fire late by any amount: a timeout is checked
never to fire early, and a refusal that never comes is caught by a backstop of many times
the timeout. Costs are counted as the server's CPU seconds and images decoded, not as
seconds on the clock.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from helpers import (
    BACKSTOP_S,
    RawAnswer,
    address,
    assert_json_error,
    cpu_seconds,
    encode,
    png_bytes,
    post,
    raw_request,
    request_log,
    trickle,
)
from PIL import Image

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2
BODY_GRACE_S = 2
MIN_BODY_RATE = 16 * 1024
TIMEOUT_S = 3  # BentoML's traffic timeout: 504
GOOD = ("good.png", png_bytes(), "image/png")


@pytest.fixture(scope="module")
def limited(start_server) -> Iterator:
    with start_server(
        "serve-slow-clients",
        CONVTUNE_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        CONVTUNE_SLOW_BODY_GRACE_S=str(BODY_GRACE_S),
        CONVTUNE_MIN_BODY_RATE=str(MIN_BODY_RATE),
        # Room for a batch that decodes longer than the timeout (the 36 Mpx images below).
        CONVTUNE_MAX_REQUEST_PIXELS=str(16 * 36_000_000),
        BENTOML_CONFIG_OPTIONS=f"services.Convtune.traffic.timeout={TIMEOUT_S}",
    ) as server:
        yield server


def predict_head(length: int, *extra: bytes) -> bytes:
    return b"".join(
        [b"POST /predict HTTP/1.1\r\nHost: test\r\n",
         b"Content-Type: multipart/form-data; boundary=b\r\n",
         b"Content-Length: %d\r\n" % length, *extra, b"\r\n"]
    )  # fmt: skip


def test_oversized_headers_are_refused_with_431(limited) -> None:
    answer = raw_request(limited.url, b"GET /readyz HTTP/1.1\r\nHost: test\r\n"
                         + b"X-Padding: " + b"a" * 20_000 + b"\r\n\r\n")  # fmt: skip
    assert answer.status == 431 and "over 16,384 bytes" in answer.json()["error"]
    assert answer.closed


def test_a_long_url_is_refused_with_414(limited) -> None:
    answer = raw_request(limited.url, b"GET /readyz?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert answer.status == 414 and "over 8,192 bytes" in answer.json()["error"]
    assert answer.closed


@pytest.mark.parametrize(
    ("sent", "trickled"),
    [(b"", b""), (b"GET /readyz HTTP/1.1\r\nHost: test\r\nX-Slow: ", b"x")],
    ids=["silent", "trickled"],
)
def test_a_head_that_does_not_arrive_in_time_is_refused_with_408(limited, sent, trickled) -> None:
    """A connection that sends nothing, or a head a byte at a time: both end in 408."""
    started = time.monotonic()
    with socket.create_connection(address(limited.url), timeout=30) as client:
        client.sendall(sent)
        answer = trickle(client, every_s=0.2, backstop_s=BACKSTOP_S, byte=trickled)
        waited = time.monotonic() - started
    assert answer.status == 408 and "did not arrive within 2 s" in answer.json()["error"]
    assert answer.closed
    assert waited >= HEADER_TIMEOUT_S, "refused before its timeout"


def test_a_slow_body_is_refused_with_408_and_never_takes_a_slot(limited) -> None:
    started = time.monotonic()
    with socket.create_connection(address(limited.url), timeout=30) as client:
        client.sendall(predict_head(5000) + b"--b\r\n")
        answer = trickle(client, every_s=0.2, backstop_s=BACKSTOP_S)
        waited = time.monotonic() - started
    assert answer.status == 408 and "slower than 16,384 bytes/s" in answer.json()["error"]
    assert waited >= BODY_GRACE_S, "refused within its grace period"


def test_trickling_bodies_leave_the_slots_to_other_clients(limited) -> None:
    """64 clients sending bodies a byte at a time, as many as BentoML has slots: ordinary
    requests meanwhile are all answered, none refused with 429."""
    stop = threading.Event()
    clients = [socket.create_connection(address(limited.url), timeout=10) for _ in range(64)]

    def trickle() -> None:
        while not stop.wait(0.25):
            for client in clients:
                with contextlib.suppress(OSError):  # refused: 408
                    client.sendall(b"x")

    for client in clients:
        client.sendall(predict_head(100_000) + b"--b\r\n")
    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        statuses = [post(limited.url, "predict", files={"image": GOOD}).status_code
                    for _ in range(20)]  # fmt: skip
    finally:
        stop.set()
        trickler.join()
        for client in clients:
            client.close()
    assert statuses == [200] * 20


def test_a_body_sent_after_100_continue_is_answered(limited) -> None:
    """curl asks before it sends a big body; the server says go on before reading it."""
    form = httpx.Request("POST", limited.url, files={"image": GOOD})
    body = form.read()
    head = (b"POST /predict HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
            b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (form.headers["content-type"].encode(), len(body)))  # fmt: skip
    with socket.create_connection(address(limited.url), timeout=30) as client:
        client.sendall(head)
        assert client.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.sendall(body)
        answer = RawAnswer.read(client)
    assert answer.status == 200 and answer.json()["label"] and not answer.closed


PADDING_BYTES = 20 * 1024 * 1024 - 1000
# Reading the 20 MiB body and finding the spaces cost 0.09-0.10 CPU s (docs/benchmarks.md,
# "Hostile multipart bodies"); python-multipart walking them byte by byte costs seconds.
MAX_HOSTILE_CPU_S = 0.5


def padded_multipart() -> bytes:
    """20 MiB of spaces after a boundary: python-multipart walks them a byte at a time."""
    part = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    padding = b" " * PADDING_BYTES
    return b"--b\r\n" + part + b"x\r\n--b" + padding + b"\r\n" + part + b"y\r\n--b--\r\n"


def test_a_hostile_multipart_body_costs_the_server_little(limited) -> None:
    """Refused for a fraction of the CPU the parser alone would spend walking the padding
    (seconds, on the event loop), and ``/readyz`` answers meanwhile."""
    body = padded_multipart()
    answers: list[httpx.Response] = []

    def send() -> None:
        content_type = {"content-type": "multipart/form-data; boundary=b"}
        answers.append(post(limited.url, "predict", content=body, headers=content_type))

    sender = threading.Thread(target=send)
    probes = []
    with httpx.Client(base_url=limited.url, timeout=10) as probe:
        assert probe.get("/readyz").status_code == 200  # connected before the body comes
        before = cpu_seconds(limited.process.pid)
        sender.start()
        while sender.is_alive():
            probes.append(probe.get("/readyz").status_code)
        sender.join()
        spent = cpu_seconds(limited.process.pid) - before
    [response] = answers
    assert "spaces after a boundary" in assert_json_error(response, 400)["error"]
    assert set(probes) <= {200}, probes
    assert spent < MAX_HOSTILE_CPU_S, f"the server spent {spent:.2f} CPU s on it"


def test_a_timed_out_request_stops_decoding_its_images(limited) -> None:
    """16 images that take most of a second each to decode: the request times out (504)
    after 3 s, and the server stops decoding once the image in hand is done, instead of
    going on with the rest for nobody; its log says how far it got."""
    big = encode(Image.new("RGB", (6000, 6000), (10, 200, 30)), "PNG")
    response = post(limited.url, "predict_batch", files=[("images", ("big.png", big))] * 16)
    assert response.status_code == 504
    deadline = time.monotonic() + BACKSTOP_S  # the log line is what is waited for
    while not (stopped := request_log(limited.log, "decoding stopped")):
        assert time.monotonic() < deadline, "decoding never stopped"
        time.sleep(0.1)
    [record] = stopped
    assert record["images"] == 16 and 0 < record["decoded"] < 16, record
    assert post(limited.url, "predict", files={"image": GOOD}).status_code == 200
