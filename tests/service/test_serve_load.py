"""A bounded load test on loopback: 32 keep-alive clients for 45 s against the real server.

Nothing may fail under load: no 5xx, no refused or reset connection, and no memory growth
after warm-up. Under this load the server's RSS climbs for about its first 30 s and then
holds (docs/benchmarks.md, "Memory under load"); a leak per request keeps climbing, so the
check is the growth over the last 15 s. The load comes from
``python -m convtune.benchmarks.loadgen``, run as a user would run it by hand (with other
numbers); its table is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import json

import pytest
from helpers import loadgen_args

pytestmark = pytest.mark.slow

CONCURRENCY = 32
DURATION_S = 45
WARM_UP_S = 30
MAX_RSS_GROWTH = 0.04


def test_sustained_load_has_no_errors_and_no_memory_growth(
    served, exported, probe_images, tmp_path
) -> None:
    summary_file = tmp_path / "load.json"
    table = exported.run(
        *loadgen_args(
            served.url,
            probe_images,
            concurrency=CONCURRENCY,
            duration_s=DURATION_S,
            server_pid=served.process.pid,
            summary=summary_file,
        ),
        timeout=DURATION_S + 60,
    )  # fmt: skip  (exits non-zero on any 5xx or connection error)
    print(f"\nload on /predict, {CONCURRENCY} clients for {DURATION_S}s:\n{table}")
    summary = json.loads(summary_file.read_text())
    assert summary["connection_errors"] == {}
    assert summary["server_errors"] == 0
    assert summary["statuses"] == {"200": summary["requests"]}
    assert summary["requests"] >= CONCURRENCY * 5, "the server barely answered"
    assert summary["duration_s"] >= DURATION_S
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    last_sample_s = summary["rss_samples"][-1][0]
    assert last_sample_s >= DURATION_S - 1
    warm = next(rss for second, rss in summary["rss_samples"] if second >= WARM_UP_S)
    growth = summary["rss_samples"][-1][1] / warm - 1
    assert growth < MAX_RSS_GROWTH, f"server RSS grew {growth:.1%} after {WARM_UP_S} s"
