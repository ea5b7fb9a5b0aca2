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
        "convtune",
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
    # The CPU each request cost: the servers' threads and the load generator all worked.
    for server in ("service", "peer"):
        for row in median[server].values():
            cpu = row["cpu_ms_per_request"]
            assert cpu["server_main_threads"] > 0 and cpu["load_generator"] > 0
            parts = cpu["server_main_threads"] + cpu["server_other_threads"]
            assert cpu["server"] == pytest.approx(parts)
    assert "service CPU per request at 2 clients" in table
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


def test_bench_paired_drives_both_configurations_in_alternating_pairs(exported, tmp_path):
    report_file = tmp_path / "paired.json"
    table = exported.run(
        "-m",
        "convtune",
        "bench",
        "paired",
        str(exported.artifact_dir),
        "--a",
        "CONVTUNE_INFERENCE_LANES=0",
        "--pairs",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--concurrency",
        "2",
        "--image-count",
        "3",
        "--image-size",
        "64",
        "--json",
        str(report_file),
        timeout=240,
    )  # fmt: skip  (exits non-zero on any 5xx)
    report = json.loads(report_file.read_text())
    assert report["benchmark"] == "paired" and len(report["rounds"]) == 2
    for pair in report["rounds"]:
        for side in ("a", "b"):
            assert pair[side]["statuses"] == {"200": pair[side]["requests"]} != {}
    median = report["median"]
    assert median["pairs"] == 2 and 0 <= median["pairs_b_lower_p50"] <= 2
    first = report["rounds"][0]
    ratio = first["b"]["throughput_rps"] / first["a"]["throughput_rps"]
    second = report["rounds"][1]
    other = second["b"]["throughput_rps"] / second["a"]["throughput_rps"]
    assert median["rps_ratio"] == pytest.approx((ratio + other) / 2)
    assert "CONVTUNE_INFERENCE_LANES=0" in table and "(defaults)" in table


def test_bench_lanes_measures_both_setups_alone_and_beside_decoding(exported, tmp_path):
    report_file = tmp_path / "lanes.json"
    table = exported.run(
        "-m", "convtune", "bench", "lanes", str(exported.artifact_dir), "--rounds", "1",
        "--seconds", "0.3", "--image-size", "64", "--json", str(report_file),
        timeout=120,
    )  # fmt: skip
    median = json.loads(report_file.read_text())["median"]
    work = median.pop("service work, no HTTP")
    assert work["images_per_s"] > 0 and work["vs_ceiling"] > 0
    assert len(median) == 2 and "one session, every core" in table
    for loads in median.values():
        assert loads["0"]["images_per_s"] > 0 and loads["0"]["decodes_per_s"] == 0
        assert loads["1"]["images_per_s"] > 0 and loads["1"]["decodes_per_s"] > 0
    assert "the service's work without HTTP" in table
