"""A closed-loop HTTP load generator for multipart upload endpoints, with server RSS sampling.

``concurrency`` workers each hold one keep-alive HTTP/1.1 connection; each sends a
request, waits for the answer, and sends the next, until ``duration_s`` has passed or
``requests`` have been sent. Bodies are encoded once (by httpx) and written on a bare
asyncio stream, so that the load generator spends as little CPU as it can on the cores
that the server under test shares with it (docs/benchmarks.md has the figures).

Every answer's status and latency is recorded, every transport failure (refused, reset,
timed out) is counted by kind, and when a server pid is given the resident memory of that
process and all its children is sampled once a second: a leak shows as RSS growth after
warm-up.

By hand, against a running server::

    python -m convtune.benchmarks.loadgen --url http://127.0.0.1:3000 --image cat.jpg \\
        --concurrency 32 --duration 30 --server-pid "$(pgrep -of 'bentoml serve')"

The load test (``tests/service/test_serve_load.py``) runs it so; the serving benchmark
calls :func:`run_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

# One request's multipart body: (field name, (file name, bytes, content type)) per file.
Files = Sequence[tuple[str, tuple[str, bytes, str]]]
MAX_ERRORS_KEPT = 20  # transport errors kept verbatim (the first ones); all are counted


@dataclass
class LoadResult:
    """What a load run saw; latencies in seconds, RSS samples as (seconds, bytes)."""

    concurrency: int
    duration_s: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    first_errors: list[tuple[float, str]] = field(default_factory=list)  # (seconds, error)

    @property
    def requests(self) -> int:
        """Requests that got an answer or failed in transport."""
        return self.statuses.total() + self.connection_errors.total()

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def throughput(self) -> float:
        """Answered requests per second."""
        return self.statuses.total() / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile latency (nearest rank), in milliseconds."""
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1] * 1000

    def rss_at(self, second: float) -> int | None:
        """The first RSS sample taken at or after ``second``."""
        return next((rss for t, rss in self.rss_samples if t >= second), None)

    def rss_growth(self, from_s: float = 5.0) -> float | None:
        """Relative RSS growth from the sample at ``from_s`` to the last one, or None."""
        start = self.rss_at(from_s)
        if start is None or self.rss_samples[-1][0] <= from_s:
            return None
        return self.rss_samples[-1][1] / start - 1

    def summary(self) -> dict[str, Any]:
        growth = self.rss_growth()
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 2),
            "requests": self.requests,
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p95_ms": round(self.percentile_ms(95), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "connection_errors": dict(self.connection_errors),
            "first_errors": self.first_errors,
            "server_errors": self.server_errors,
            "rss_mib_at_5s": _mib(self.rss_at(5.0)),
            "rss_mib_last": _mib(self.rss_samples[-1][1] if self.rss_samples else None),
            "rss_growth_after_5s": None if growth is None else round(growth, 4),
        }

    def table(self) -> str:
        return "\n".join(f"{key:<22} {value}" for key, value in self.summary().items())


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (BentoML serves from a child)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            total += process.memory_info().rss
    return total


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs prepared bodies and reads the status."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: only http://HOST[:PORT]/PATH URLs are supported")
        self.host, self.port = parts.hostname, parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes, content_type: str) -> int:
        """Send one request and read its whole answer; return the status code."""
        try:
            return await asyncio.wait_for(self._exchange(body, content_type), self.timeout_s)
        except BaseException:
            self.close()  # the stream is mid-exchange: unusable
            raise

    async def _exchange(self, body: bytes, content_type: str) -> int:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = (
            f"POST {self.target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")  # no trailers are sent to us
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection") == "close":
            self.close()
        return status

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def _encoded(files: Files, form: Mapping[str, str] | None) -> tuple[bytes, str]:
    """A multipart request's body and content type, encoded by httpx."""
    request = httpx.Request("POST", "http://encode.invalid/", files=files, data=form)
    return request.read(), request.headers["content-type"]


async def run_load(
    url: str,
    files: Sequence[Files],
    *,
    concurrency: int = 32,
    duration_s: float | None = 30.0,
    requests: int | None = None,
    form: Mapping[str, str] | None = None,
    server_pid: int | None = None,
    timeout_s: float = 60.0,
) -> LoadResult:
    """POST to ``url`` from ``concurrency`` workers until ``duration_s`` or ``requests``.

    ``files`` holds one or more request bodies; workers take them in turn. ``form`` adds
    plain fields (``top_k``) to every request.
    """
    if duration_s is None and requests is None:
        raise ValueError("give duration_s, requests or both: the run must end")
    if not files:
        raise ValueError("give at least one request body in files")
    result = LoadResult(concurrency=concurrency)
    bodies = itertools.cycle([_encoded(body, form) for body in files])
    connections = [HttpConnection(url, timeout_s) for _ in range(concurrency)]
    started = time.perf_counter()
    may_send = _request_budget(started, duration_s, requests)
    sampler = asyncio.create_task(_sample_rss(server_pid, result, started)) if server_pid else None
    try:
        await asyncio.gather(
            *(_send_until_done(c, bodies, may_send, result, started) for c in connections)
        )
    finally:
        result.duration_s = time.perf_counter() - started
        if sampler is not None:
            sampler.cancel()
    if server_pid:  # one last sample at the end of the run
        result.rss_samples.append((result.duration_s, process_tree_rss(server_pid)))
    return result


def _request_budget(
    started: float, duration_s: float | None, requests: int | None
) -> Callable[[], bool]:
    """A check each worker makes before a request: True while time and requests are left."""
    deadline = math.inf if duration_s is None else started + duration_s
    issued = itertools.count()
    return lambda: time.perf_counter() < deadline and (requests is None or next(issued) < requests)


async def _send_until_done(
    connection: HttpConnection,
    bodies: Iterator[tuple[bytes, str]],
    may_send: Callable[[], bool],
    result: LoadResult,
    started: float,
) -> None:
    """One worker: send the next body, record its answer or failure, repeat."""
    try:
        while may_send():
            body, content_type = next(bodies)
            sent = time.perf_counter()
            try:
                status = await connection.post(body, content_type)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ValueError) as error:  # fmt: skip
                result.connection_errors[type(error).__name__] += 1
                if len(result.first_errors) < MAX_ERRORS_KEPT:
                    elapsed = time.perf_counter() - started
                    result.first_errors.append((round(elapsed, 3), repr(error)))
                await asyncio.sleep(0.01)  # a dead server: don't spin
                continue
            result.latencies_s.append(time.perf_counter() - sent)
            result.statuses[status] += 1
    finally:
        connection.close()


async def _sample_rss(server_pid: int, result: LoadResult, started: float) -> None:
    """Append the server's RSS to ``result`` once a second, until cancelled."""
    while True:
        rss = await asyncio.to_thread(process_tree_rss, server_pid)
        result.rss_samples.append((time.perf_counter() - started, rss))
        await asyncio.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convtune.benchmarks.loadgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--route", default="/predict")
    parser.add_argument("--field", default="image", help="multipart file field [image]")
    parser.add_argument(
        "--image", action="append", required=True, type=Path,
        help="a file to upload; repeat for several (one per request, in turn)",
    )  # fmt: skip
    parser.add_argument(
        "--per-request", type=int, default=1, help="files in each request [1] (batch routes)"
    )
    parser.add_argument("--form", action="append", default=[], help="extra field NAME=VALUE")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds [30]")
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument("--server-pid", type=int, help="sample this process tree's RSS")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    uploads = [
        (args.field, (p.name, p.read_bytes(), "application/octet-stream")) for p in args.image
    ]
    files = [
        [uploads[(start + i) % len(uploads)] for i in range(args.per_request)]
        for start in range(len(uploads))
    ]
    result = asyncio.run(
        run_load(
            args.url.rstrip("/") + args.route,
            files,
            concurrency=args.concurrency,
            duration_s=args.duration,
            requests=args.requests,
            form=dict(item.split("=", 1) for item in args.form),
            server_pid=args.server_pid,
        )
    )
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps({**result.summary(), "rss_samples": result.rss_samples}))
    return 1 if result.server_errors or result.connection_errors else 0


if __name__ == "__main__":
    sys.exit(main())
