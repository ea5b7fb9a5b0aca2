"""A bounded load test on loopback: 32 keep-alive clients against the real server.

Nothing may fail under load: no 5xx, no refused or reset connection, and no memory growth
once warm. The load is counted in requests, not seconds, so a slow or shared machine
sends the same work. Under this load the server's RSS climbs in steps of a few MiB over
its first 7,000 to 10,000 requests and then holds within 0.3 MiB (docs/benchmarks.md,
"Memory under load"); a leak adds to every burst of requests, warm-up only to some. So
after a warm-up the RSS is read between bursts, and the burst that added least is judged.
The load
comes from ``python -m convtune.benchmarks.loadgen``, run as a user would run it by hand
(with other numbers); its tables are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from helpers import loadgen_args

from convtune.benchmarks.loadgen import process_tree_rss

pytestmark = pytest.mark.slow

CONCURRENCY = 32
WARM_UP_REQUESTS = 6000
BURST_REQUESTS = 1000
BURSTS = 3
# A leak of 1 KiB a request adds 1 MiB to every burst.
MAX_LEAST_GROWTH_MIB = 1.0


def burst(served, exported, probe_images: list[Path], requests: int, summary: Path) -> None:
    """``requests`` requests from the load generator, every one answered with 200."""
    table = exported.run(
        *loadgen_args(
            served.url,
            probe_images,
            concurrency=CONCURRENCY,
            requests=requests,
            server_pid=served.process.pid,
            summary=summary,
        ),
    )  # fmt: skip  (exits non-zero on any 5xx or connection error)
    print(f"\n{requests} requests from {CONCURRENCY} clients:\n{table}")
    result = json.loads(summary.read_text())
    assert result["connection_errors"] == {}
    assert result["server_errors"] == 0
    assert result["statuses"] == {"200": requests}, result


def test_sustained_load_has_no_errors_and_no_memory_growth(
    served, exported, probe_images, tmp_path
) -> None:
    burst(served, exported, probe_images, WARM_UP_REQUESTS, tmp_path / "warm-up.json")
    rss_mib = [process_tree_rss(served.process.pid) / 2**20]
    for number in range(BURSTS):
        burst(served, exported, probe_images, BURST_REQUESTS, tmp_path / f"burst{number}.json")
        rss_mib.append(process_tree_rss(served.process.pid) / 2**20)
    print(f"server RSS after warm-up and each burst (MiB): {[round(m, 1) for m in rss_mib]}")
    least = min(after - before for before, after in itertools.pairwise(rss_mib))
    assert least < MAX_LEAST_GROWTH_MIB, f"server RSS grew in every burst: {rss_mib}"
