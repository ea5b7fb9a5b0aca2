"""A smoke run of ``convtune bench serve``: tiny inputs, one short round, every part real.

It checks that the benchmark works end to end (ceiling, service, peer, table, JSON), not
how fast anything is: benchmarks are not timed tests (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_serve_runs_every_part_and_reports_them(exported, tmp_path) -> None:
    report_file = tmp_path / "serve.json"
    table = exported.run(
        "-m",
        "training.cli",
        "bench",
        "serve",
        str(exported.artifact_dir),
        "--rounds",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--concurrency",
        "1,2",
        "--image-count",
        "3",
        "--image-size",
        "64",
        "--ceiling-seconds",
        "0.2",
        "--json",
        str(report_file),
        timeout=240,
    )  # fmt: skip  (exits non-zero on any 5xx)
    report = json.loads(report_file.read_text())
    median = report["median"]
    assert report["benchmark"] == "serve" and len(report["rounds"]) == 1
    assert set(median["ceiling_by_batch"]) == {"1", "2", "4", "8", "16", "32"}
    assert median["ceiling"]["batch_1_latency_ms"] > 0
    assert median["ceiling"]["decode_preprocess_ms"] > 0
    for server in ("service", "peer"):
        assert set(median[server]) == {"1", "2"}
        for row in median[server].values():
            assert row["throughput_rps"] > 0 and row["server_errors"] == 0
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    # Every answer was a 200: the service and the peer classified the uploads.
    for server in ("service", "peer"):
        for row in report["rounds"][0][server].values():
            assert row["statuses"] == {"200": row["requests"]}
    # The goals compare each load with the ceiling measured right before and after it.
    first = report["rounds"][0]
    for row in first["service"].values():
        around = row["ceiling_batch_1"]
        both = (around["before"]["latency_ms"], around["after"]["latency_ms"])
        assert around["latency_ms"] == pytest.approx(sum(both) / 2) and min(both) > 0
    alone = first["service"]["1"]
    overhead = alone["p50_ms"] - alone["ceiling_batch_1"]["latency_ms"]
    assert first["ratios"]["latency_overhead_ms"] == pytest.approx(overhead)
    assert "ceiling b1 around it" in table
    assert set(median["ratios"]) == {
        "service_vs_ceiling", "latency_overhead_ms", "service_vs_peer"
    }  # fmt: skip
    assert "service, 2 clients" in table and "peer, 2 clients" in table
