"""A closed-loop HTTP load generator for multipart upload endpoints, with server RSS sampling.

``concurrency`` workers share one keep-alive ``httpx.AsyncClient``; each sends a request,
waits for the answer, and sends the next, until ``duration_s`` has passed or ``requests``
have been sent. Every answer's status and latency is recorded, every transport failure
(refused, reset, timed out) is counted by kind, and when a server pid is given the resident
memory of that process and all its children is sampled once a second: a leak shows as RSS
growth after warm-up.

By hand, against a running server::

    python -m benchmarks.loadgen --url http://127.0.0.1:3000 --image cat.jpg \\
        --concurrency 32 --duration 30 --server-pid "$(pgrep -of 'bentoml serve')"

The tests (``tests/service/test_serve_load.py``) and serving benchmarks call
:func:`run_load` directly.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

# One request's multipart body: (field name, (file name, bytes, content type)) per file.
Files = Sequence[tuple[str, tuple[str, bytes, str]]]


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
    bodies = itertools.cycle(files)
    issued = itertools.count()
    started = time.perf_counter()
    deadline = math.inf if duration_s is None else started + duration_s

    def more() -> bool:
        return time.perf_counter() < deadline and (requests is None or next(issued) < requests)

    async def worker(client: httpx.AsyncClient) -> None:
        while more():
            sent = time.perf_counter()
            try:
                response = await client.post(url, files=next(bodies), data=form)
            except httpx.TransportError as error:
                result.connection_errors[type(error).__name__] += 1
                if len(result.first_errors) < 20:
                    elapsed = time.perf_counter() - started
                    result.first_errors.append((round(elapsed, 3), repr(error)))
                await asyncio.sleep(0.01)  # a dead server: don't spin
                continue
            result.latencies_s.append(time.perf_counter() - sent)
            result.statuses[response.status_code] += 1

    async def sample_rss() -> None:
        assert server_pid is not None
        while True:
            rss = await asyncio.to_thread(process_tree_rss, server_pid)
            result.rss_samples.append((time.perf_counter() - started, rss))
            await asyncio.sleep(1.0)

    # Idle connections are dropped after 2 s, before the server's keep-alive timeout (uvicorn:
    # 5 s) can close one just as a request goes out on it (a reset that is no server fault).
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        sampler = asyncio.create_task(sample_rss()) if server_pid else None
        try:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        finally:
            result.duration_s = time.perf_counter() - started
            if sampler is not None:
                sampler.cancel()
    if server_pid:  # one last sample at the end of the run
        result.rss_samples.append((result.duration_s, process_tree_rss(server_pid)))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0]
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
