"""``convtune bench serve``: a smoke run with tiny inputs, one short round, every part real;
and the one-line answer when the dev extra it needs is missing.

The smoke run checks that the benchmark works end to end (ceiling, service, peer, table,
JSON), not how fast anything is: benchmarks are not timed tests (docs/benchmarks.md has
the figures).
"""

from __future__ import annotations

import json

import pytest

from convtune.benchmarks import cli

ABSENT = "convtune-test-absent-distribution"  # installed nowhere


def test_bench_serve_without_its_extra_names_the_missing_package_and_the_install(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.setattr(cli, "PEER_NEEDS", ("fastapi", ABSENT))
    assert cli.main(["serve", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (
        f"convtune bench serve needs {ABSENT} from the dev extra: pip install -e '.[dev]'"
    )


def test_bench_serve_without_the_peer_does_not_need_the_peer_packages(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.setattr(cli, "PEER_NEEDS", (ABSENT,))
    assert cli.main(["serve", str(tmp_path), "--no-peer"]) == 2
    message = capsys.readouterr().err
    # Past the check: the benchmark itself ran and refused the empty folder as a model.
    assert ABSENT not in message
    assert message.startswith(f"convtune bench serve: error: {tmp_path} is not a convtune artifact")


@pytest.mark.slow
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
