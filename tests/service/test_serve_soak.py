"""A mixed soak on loopback: 16 ordinary clients, first alone, then beside every kind of
attacker at once, against the suite's server (default limits, what a user gets).

The attackers: 32 connections sending headers a byte at a time, 64 sending bodies a byte
at a time (both reconnect whenever the server drops them), one client posting 20 MiB
multipart bodies the parser would walk byte by byte, and one posting decode bombs (PNGs
declaring a canvas over the pixel limit). The ordinary clients must not notice: at least
99 % answered 200, no 5xx, their p99 latency within 3 × their p99 alone (measured first, in
this test), ``/readyz`` answering throughout, and the server's RSS under ``MAX_RSS_MIB``.
The ordinary load is ``convtune.benchmarks.loadgen`` in a process of its own, as in the
load test; the attackers are threads of this one.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from helpers import address, huge_canvas_png, loadgen_args

pytestmark = pytest.mark.slow

CLIENTS = 16
ALONE_S = 10
BESIDE_ATTACKERS_S = 20
MAX_RSS_MIB = 1024  # the server's process tree: BentoML's arbiter and the one worker
MIN_SUCCESS = 0.99
MAX_P99_RATIO = 3.0
MAX_READYZ_S = 2.0


def ordinary_load(served, exported, probe_images: list[Path], duration_s: float, out: Path) -> dict:
    """16 keep-alive clients posting the probe images to /predict for ``duration_s``."""
    args = loadgen_args(
        served.url, probe_images, concurrency=CLIENTS, duration_s=duration_s,
        server_pid=served.process.pid, summary=out,
    )  # fmt: skip
    # Exits non-zero on any failure: the summary says which, and how many.
    subprocess.run(
        [sys.executable, *args], env=exported.env, capture_output=True,
        timeout=duration_s + 60, check=False,
    )  # fmt: skip
    return json.loads(out.read_text())


class Attackers:
    """Each kind of attacker on threads of its own until ``stop``; what they got back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.readyz: list[tuple[int, float]] = []  # (status, seconds)
        self.refusals: dict[str, set[int]] = {"multipart": set(), "bomb": set()}
        self.threads = [
            threading.Thread(target=self._trickle, args=(32, self._slow_head)),
            threading.Thread(target=self._trickle, args=(64, self._slow_body)),
            threading.Thread(target=self._repeat, args=("multipart", self._hostile_multipart, 1.0)),
            threading.Thread(target=self._repeat, args=("bomb", self._bomb, 0.2)),
            threading.Thread(target=self._probe_readyz),
        ]

    @contextlib.contextmanager
    def attacking(self) -> Iterator[Attackers]:
        for thread in self.threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in self.threads:
                thread.join()

    def _connect(self, start: bytes) -> socket.socket | None:
        with contextlib.suppress(OSError):
            client = socket.create_connection(address(self.url), timeout=5)
            client.sendall(start)
            return client
        return None

    def _slow_head(self) -> socket.socket | None:
        return self._connect(b"POST /predict HTTP/1.1\r\nHost: soak\r\nX-Slow: ")

    def _slow_body(self) -> socket.socket | None:
        return self._connect(
            b"POST /predict HTTP/1.1\r\nHost: soak\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )

    def _trickle(self, count: int, connect: Callable[[], socket.socket | None]) -> None:
        """``count`` connections sending a byte each every half second, reconnected when
        the server closes them."""
        clients = [connect() for _ in range(count)]
        while not self.stop.wait(0.5):
            for index, client in enumerate(clients):
                try:
                    assert client is not None
                    client.sendall(b"x")
                except (OSError, AssertionError):
                    if client is not None:
                        client.close()
                    clients[index] = connect()
        for client in clients:
            if client is not None:
                client.close()

    def _repeat(self, kind: str, attack: Callable[[httpx.Client], int], every_s: float) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.wait(every_s):
                with contextlib.suppress(httpx.TransportError):
                    self.refusals[kind].add(attack(client))

    @staticmethod
    def _hostile_multipart(client: httpx.Client) -> int:
        part = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        padding = b" " * ((20 << 20) - 1000)  # under the byte limit: the parser would see it
        body = b"--b\r\n" + part + b"x\r\n--b" + padding + b"\r\n" + part + b"--b--"
        content_type = {"content-type": "multipart/form-data; boundary=b"}
        return client.post("/predict", content=body, headers=content_type).status_code

    @staticmethod
    def _bomb(client: httpx.Client) -> int:
        files = [("images", ("bomb.png", huge_canvas_png(), "image/png"))] * 8
        return client.post("/predict_batch", files=files).status_code

    def _probe_readyz(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.wait(0.25):
                started = time.monotonic()
                try:
                    status = client.get("/readyz").status_code
                except httpx.TransportError:
                    status = 0
                self.readyz.append((status, time.monotonic() - started))


def test_ordinary_clients_do_not_notice_attackers(served, exported, probe_images, tmp_path):
    alone = ordinary_load(served, exported, probe_images, ALONE_S, tmp_path / "alone.json")
    assert alone["statuses"] == {"200": alone["requests"]}, alone
    with Attackers(served.url).attacking() as attackers:
        time.sleep(2)  # every attacker connected and sending
        beside = ordinary_load(
            served, exported, probe_images, BESIDE_ATTACKERS_S, tmp_path / "beside.json"
        )
    for name, summary in {"alone": alone, "beside attackers": beside}.items():
        print(f"\n{name}:", {k: v for k, v in summary.items() if k != "rss_samples"})
    answered = beside["statuses"].get("200", 0)
    assert answered >= MIN_SUCCESS * beside["requests"], beside
    assert beside["server_errors"] == 0, beside
    assert beside["p99_ms"] <= MAX_P99_RATIO * alone["p99_ms"], (alone, beside)
    peak_rss_mib = max(rss for _, rss in beside["rss_samples"]) / 2**20
    assert peak_rss_mib < MAX_RSS_MIB, beside["rss_samples"]
    # The attackers were refused, with the statuses that name what they did.
    assert attackers.refusals == {"multipart": {400}, "bomb": {400}}
    assert len(attackers.readyz) >= BESIDE_ATTACKERS_S * 2, "/readyz was barely probed"
    assert {status for status, _ in attackers.readyz} == {200}
    assert max(seconds for _, seconds in attackers.readyz) < MAX_READYZ_S, attackers.readyz
